"""AU detection F1 under three protocols that must never be mixed (DESIGN.md §6).

- `pooled_binary@0.5` (the headline; Varanka et al., TAFFC 2023): pool the predictions
  of every fold of a group, then per AU the binary F1 of the positive class at a fixed
  0.5 threshold on probabilities; average over AUs.
- `paper_compatible` (LEAKY, shown only as a labelled side column): what the authors'
  script computes: per AU the mean of positive- and negative-class F1, maximised over
  thresholds 0.10..0.85 (step 0.05) *chosen on the test predictions themselves*.
- `per_fold_mean`: binary F1 at 0.5 inside each fold, averaged over folds. LOSO folds
  hold a handful of clips, so many folds have no positive of an AU and score 0 there
  (zero_division=0): this number is systematically different from the pooled one.

Pure numpy + scikit-learn: `orchestrator.results.collect` scores without importing torch.
F1 is computed from confusion counts with numpy (vectorised over thresholds); the
tests check it against `sklearn.metrics.f1_score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

PROTOCOLS: tuple[str, ...] = ("pooled_binary@0.5", "paper_compatible", "per_fold_mean")
HEADLINE_PROTOCOL = "pooled_binary@0.5"
LEAKY_PROTOCOLS: frozenset[str] = frozenset({"paper_compatible"})
THRESHOLD = 0.5
# 0.10, 0.15, ..., 0.85 (16 values), rounded so that 0.35 is 0.35 and not 0.35000000000000003.
PAPER_THRESHOLDS: NDArray[np.float64] = np.round(np.arange(10, 86, 5) / 100.0, 2)


@dataclass(frozen=True)
class ScoreRow:
    """F1 per AU (keyed by AU number) and their unweighted average, as fractions in [0, 1]."""

    per_au: dict[int, float]
    average: float

    def to_dict(self) -> dict[str, object]:
        return {"per_au": {str(k): v for k, v in self.per_au.items()}, "average": self.average}

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreRow":
        return cls(per_au={int(k): float(v) for k, v in d["per_au"].items()}, average=float(d["average"]))


def _as_arrays(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim == 1:
        p = p[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probs {p.shape} and labels {y.shape} must both be (N, A)")
    if p.shape[0] == 0:
        raise ValueError("no predictions to score")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("probs must be finite probabilities in [0, 1] (apply the sigmoid first)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    return p, y.astype(np.int64)


def _f1_from_counts(tp: NDArray, fp: NDArray, fn: NDArray) -> NDArray[np.float64]:
    """F1 = 2tp / (2tp + fp + fn), 0 where the denominator is 0 (sklearn's zero_division=0)."""
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.astype(np.float64)


def _binary_f1(pred: NDArray[np.bool_], y: NDArray[np.int64]) -> NDArray[np.float64]:
    """Positive-class F1 along axis 0 (samples): pred and y broadcast to (N, ...)."""
    pos = y.astype(bool)
    tp = np.sum(pred & pos, axis=0)
    fp = np.sum(pred & ~pos, axis=0)
    fn = np.sum(~pred & pos, axis=0)
    return _f1_from_counts(tp, fp, fn)


def pooled_binary_f1(probs: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Per-AU binary F1 (positive class) at probability >= 0.5, zero_division=0. Shape (A,)."""
    p, y = _as_arrays(probs, labels)
    return _binary_f1(p >= THRESHOLD, y)


def per_subject_micro_f1(probs: ArrayLike, labels: ArrayLike, subjects: Sequence[str]) -> dict[str, float | None]:
    """Each subject's F1 over all its (sample, AU) decisions at probability >= 0.5, in order of
    first appearance; None when the subject has no positive label and no positive prediction
    (F1 undefined: nothing to find, nothing found). Micro rather than per-AU: a subject holds a
    handful of clips, so most of its AUs have no positive and a per-AU F1 would be 0 by
    convention, drowning the outliers the per-subject plot is for. The counts of each sample
    row are summed per subject with one bincount each (a mask per subject cost a second on
    10,000 cells)."""
    p, y = _as_arrays(probs, labels)
    if len(subjects) != p.shape[0]:
        raise ValueError(f"{len(subjects)} subjects for {p.shape[0]} predictions")
    pred, pos = p >= THRESHOLD, y.astype(bool)
    names, first, inverse = np.unique(np.asarray(subjects), return_index=True, return_inverse=True)
    counts = [np.bincount(inverse, weights=(a & b).sum(axis=1), minlength=len(names))
              for a, b in ((pred, pos), (pred, ~pos), (~pred, pos))]  # fmt: skip
    out: dict[str, float | None] = {}
    for i in np.argsort(first, kind="stable"):
        tp, fp, fn = (int(c[i]) for c in counts)
        out[str(names[i])] = None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return out


def paper_compatible_f1(probs: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Per-AU max over thresholds 0.10..0.85 of mean(F1 positive class, F1 negative class).

    LEAKY: the threshold is chosen on the very predictions being scored (the test
    folds), and the negative-class F1 of these rare AUs is high for free. This is the
    authors' script's number, reported beside the honest one for comparison only.
    """
    p, y = _as_arrays(probs, labels)
    pred = p[None, :, :] >= PAPER_THRESHOLDS[:, None, None]  # (thresholds, N, A)
    yb = y[None].astype(bool)
    tp = np.sum(pred & yb, axis=1)
    fp = np.sum(pred & ~yb, axis=1)
    fn = np.sum(~pred & yb, axis=1)
    tn = np.sum(~pred & ~yb, axis=1)
    f1_pos = _f1_from_counts(tp, fp, fn)
    f1_neg = _f1_from_counts(tn, fn, fp)  # the negative class: roles of fp and fn swap
    return ((f1_pos + f1_neg) / 2.0).max(axis=0)


def per_fold_mean_f1(probs: ArrayLike, labels: ArrayLike, fold_ids: Sequence[object] | ArrayLike) -> NDArray[np.float64]:
    """Per-AU binary F1 at 0.5 computed inside each fold, then averaged over folds (equal weight)."""
    p, y = _as_arrays(probs, labels)
    folds = np.asarray(fold_ids)
    if folds.shape != (p.shape[0],):
        raise ValueError(f"fold_ids must have one entry per sample ({p.shape[0]}), got shape {folds.shape}")
    pred = p >= THRESHOLD
    per_fold = [_binary_f1(pred[folds == f], y[folds == f]) for f in np.unique(folds)]
    return np.mean(per_fold, axis=0)


def _row(aus: Sequence[int], values: NDArray[np.float64]) -> ScoreRow:
    per_au = {int(au): float(v) for au, v in zip(aus, values)}
    return ScoreRow(per_au=per_au, average=float(np.mean(values)))


def score_predictions(
    probs: ArrayLike,
    labels: ArrayLike,
    aus: Sequence[int],
    fold_ids: Sequence[object] | ArrayLike,
) -> dict[str, ScoreRow]:
    """Score pooled predictions (N, A) of a group of folds under every protocol in PROTOCOLS.

    `aus` names the A columns; `fold_ids` gives each sample's fold (used only by
    `per_fold_mean`). Averages are unweighted over AUs.
    """
    p, y = _as_arrays(probs, labels)
    if len(aus) != p.shape[1]:
        raise ValueError(f"{len(aus)} AU names for {p.shape[1]} prediction columns")
    if len(set(aus)) != len(aus):
        raise ValueError(f"duplicate AUs in {list(aus)}")
    return {
        "pooled_binary@0.5": _row(aus, pooled_binary_f1(p, y)),
        "paper_compatible": _row(aus, paper_compatible_f1(p, y)),
        "per_fold_mean": _row(aus, per_fold_mean_f1(p, y, fold_ids)),
    }


def mean_std_over_seeds(rows: Sequence[ScoreRow]) -> tuple[ScoreRow, ScoreRow]:
    """Mean and standard deviation over seeds, per AU and for the average.

    Sample standard deviation (ddof=1), the usual "mean ± std over n runs" in papers;
    0.0 when there is a single seed (no spread can be estimated, and NaN would break
    tables). The std of the average is the spread of the per-seed averages, not the
    mean of the per-AU stds.
    """
    if not rows:
        raise ValueError("mean_std_over_seeds: no rows")
    aus = list(rows[0].per_au)
    for r in rows[1:]:
        if list(r.per_au) != aus:
            raise ValueError(f"rows score different AUs: {aus} vs {list(r.per_au)}")
    table = np.array([[r.per_au[a] for a in aus] + [r.average] for r in rows], dtype=np.float64)
    mean = table.mean(axis=0)
    std = table.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros_like(mean)
    mean_row = ScoreRow({a: float(v) for a, v in zip(aus, mean[:-1])}, float(mean[-1]))
    std_row = ScoreRow({a: float(v) for a, v in zip(aus, std[:-1])}, float(std[-1]))
    return mean_row, std_row
