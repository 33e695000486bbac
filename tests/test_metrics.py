"""F1 protocols: agreement with scikit-learn, and the relations between protocols."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from aullm.metrics import (
    PAPER_THRESHOLDS,
    PROTOCOLS,
    ScoreRow,
    mean_std_over_seeds,
    paper_compatible_f1,
    per_fold_mean_f1,
    pooled_binary_f1,
    score_predictions,
)


def fake_predictions(seed: int, n: int = 120, a: int = 5, prevalence: float = 0.2):
    """Rare AUs (as in micro-expression data) and mildly informative probabilities."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, a)) < prevalence).astype(int)
    probs = np.clip(0.35 * labels + rng.random((n, a)) * 0.75, 0, 1)
    folds = rng.integers(0, 8, size=n)
    return probs, labels, folds


def test_thresholds_are_the_scripts_grid() -> None:
    assert len(PAPER_THRESHOLDS) == 16
    assert PAPER_THRESHOLDS[0] == 0.10 and PAPER_THRESHOLDS[-1] == 0.85 and 0.5 in PAPER_THRESHOLDS


@pytest.mark.parametrize("seed", range(4))
def test_pooled_agrees_with_sklearn(seed: int) -> None:
    probs, labels, _ = fake_predictions(seed)
    expected = [f1_score(labels[:, j], probs[:, j] >= 0.5, zero_division=0) for j in range(labels.shape[1])]
    np.testing.assert_allclose(pooled_binary_f1(probs, labels), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_paper_compatible_agrees_with_sklearn(seed: int) -> None:
    probs, labels, _ = fake_predictions(seed)
    expected = [
        max(
            f1_score(labels[:, j], probs[:, j] >= t, average="macro", labels=[0, 1], zero_division=0)
            for t in PAPER_THRESHOLDS
        )
        for j in range(labels.shape[1])
    ]
    np.testing.assert_allclose(paper_compatible_f1(probs, labels), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_paper_compatible_is_inflated(seed: int) -> None:
    probs, labels, _ = fake_predictions(seed)
    paper = paper_compatible_f1(probs, labels)
    honest = pooled_binary_f1(probs, labels)
    # Guaranteed: 0.5 is in the grid, so the max is >= the macro F1 at 0.5, per AU.
    at_half = np.array([
        f1_score(labels[:, j], probs[:, j] >= 0.5, average="macro", labels=[0, 1], zero_division=0)
        for j in range(labels.shape[1])
    ])
    assert (paper >= at_half - 1e-12).all()
    # For rare AUs the free negative-class F1 lifts the leaky number above the honest one.
    assert paper.mean() > honest.mean()


def test_per_fold_mean_differs_from_pooled() -> None:
    # Fold "a": one positive, found -> F1 1. Fold "b": no positive, one false alarm -> F1 0.
    probs = np.array([[0.9], [0.1], [0.8], [0.2]])
    labels = np.array([[1], [0], [0], [0]])
    folds = ["a", "a", "b", "b"]
    assert per_fold_mean_f1(probs, labels, folds)[0] == pytest.approx(0.5)
    assert pooled_binary_f1(probs, labels)[0] == pytest.approx(2 / 3)  # tp=1, fp=1, fn=0


def test_score_predictions_rows() -> None:
    probs, labels, folds = fake_predictions(0, a=4)
    aus = [2, 4, 7, 12]
    scores = score_predictions(probs, labels, aus, folds)
    assert tuple(scores) == PROTOCOLS
    for protocol, row in scores.items():
        assert list(row.per_au) == aus
        assert row.average == pytest.approx(np.mean(list(row.per_au.values())))
    honest = pooled_binary_f1(probs, labels)
    assert scores["pooled_binary@0.5"].per_au[7] == pytest.approx(honest[2])
    per_fold = [
        [f1_score(labels[folds == f, j], probs[folds == f, j] >= 0.5, zero_division=0) for f in np.unique(folds)]
        for j in range(4)
    ]
    assert scores["per_fold_mean"].average == pytest.approx(np.mean(np.mean(per_fold, axis=1)))


def test_score_predictions_rejects_bad_shapes() -> None:
    probs, labels, folds = fake_predictions(0, a=4)
    with pytest.raises(ValueError, match="AU names"):
        score_predictions(probs, labels, [2, 4, 7], folds)
    with pytest.raises(ValueError, match="probabilities"):
        score_predictions(probs * 3, labels, [2, 4, 7, 12], folds)
    with pytest.raises(ValueError, match="fold_ids"):
        score_predictions(probs, labels, [2, 4, 7, 12], folds[:-1])


def test_mean_std_over_seeds() -> None:
    rows = [ScoreRow({1: 0.4, 2: 0.6}, 0.5), ScoreRow({1: 0.6, 2: 0.8}, 0.7)]
    mean, std = mean_std_over_seeds(rows)
    assert mean.per_au == pytest.approx({1: 0.5, 2: 0.7}) and mean.average == pytest.approx(0.6)
    # sample std (ddof=1) of (0.5, 0.7) = 0.1 * sqrt(2)
    assert std.average == pytest.approx(0.1 * 2**0.5) and std.per_au[1] == pytest.approx(0.1 * 2**0.5)
    one_mean, one_std = mean_std_over_seeds(rows[:1])
    assert one_mean == rows[0] and one_std.average == 0.0 and one_std.per_au == {1: 0.0, 2: 0.0}
    with pytest.raises(ValueError, match="different AUs"):
        mean_std_over_seeds([rows[0], ScoreRow({1: 0.1, 4: 0.2}, 0.15)])


def test_row_round_trips_through_json_dict() -> None:
    row = ScoreRow({2: 0.25, 12: 0.5}, 0.375)
    assert ScoreRow.from_dict(row.to_dict()) == row


def test_metrics_do_not_import_torch() -> None:
    code = "import sys, aullm.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], timeout=60).returncode == 0
