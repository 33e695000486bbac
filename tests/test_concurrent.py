"""Concurrent cells (aullm/concurrent.py): K cells in one loop give the cells trained alone.

CPU, fp32, one thread. Folds of different sizes and a batch smaller than the training
sets, so the cells have ragged batches and different numbers of steps per epoch.
Each equality has its mutation check: `SHARE_ADAPTERS_FOR_TESTS` (a test-only hook) makes
the cells of a group share one set of LoRA adapters, and the same comparison must fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import aullm.concurrent as concurrent
from aullm.concurrent import ConcurrentCell, ConcurrentTrainer, groups_of
from aullm.constants import DATASET_AUS
from aullm.data.clips import ClipStore
from aullm.data.folds import loso_split, loso_subjects
from aullm.data.readers import read_dataset
from aullm.errors import UserInputError
from aullm.train import CellTrainer, Preempted, TrainConfig
from tests.helpers import one_torch_thread

TOL = 1e-5  # the bound, CPU fp32
EPOCHS = 2
BATCH = 16  # below every training-set size here (26, 33, 37): 2 or 3 steps an epoch, ragged last batches


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from aullm.data.synth import write_synthetic

    root = write_synthetic("casme2", tmp_path_factory.mktemp("data") / "casme2", subjects=4, seed=0)
    samples = read_dataset("casme2", root)
    return samples, ClipStore.load(samples, tmp_path_factory.mktemp("cache"))


def _cell(data, index: int, seed: int, variant: str = "all", **kwargs) -> ConcurrentCell:
    samples, store = data
    subject = loso_subjects(samples)[index]
    split = loso_split(samples, subject, DATASET_AUS["casme2"])
    return ConcurrentCell(key=f"{subject}:{variant}:{seed}", split=split, store=store, variant=variant, seed=seed,
                          **kwargs)  # fmt: skip


def _config(dropout: float) -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, lr=1e-3, batch_size=BATCH, dropout=dropout, lora_dropout=dropout)


@pytest.fixture(scope="module")
def trainers(tiny_llm: Path):
    with one_torch_thread():
        trainer = CellTrainer(tiny_llm, _config(0.0))
        yield trainer, ConcurrentTrainer(trainer)


# fold index, seed: three folds of different sizes, two sharing nothing with the first
CELLS = [(0, 1), (1, 2), (2, 3)]


@pytest.fixture(scope="module")
def alone(data, trainers):
    """Each cell trained by the single-cell trainer (`CellTrainer.run`), dropout off."""
    trainer, _ = trainers
    cfg = _config(0.0)
    out = {}
    for i, seed in CELLS:
        c = _cell(data, i, seed)
        out[c.key] = trainer.run(c.split, c.store, c.variant, c.seed, cfg)
    return out


def _largest_difference(results, reference) -> float:
    worst = 0.0
    for key, r in results.items():
        assert not isinstance(r, BaseException), r
        ref = reference[key]
        assert len(r.epoch_losses) == len(ref.epoch_losses) == EPOCHS
        worst = max(worst, float(np.abs(r.probs - ref.probs).max()),
                    float(np.abs(np.subtract(r.epoch_losses, ref.epoch_losses)).max()))  # fmt: skip
    return worst


def test_training_sets_are_ragged(data) -> None:
    sizes = {len(_cell(data, i, s).split.train) for i, s in CELLS}
    assert len(sizes) > 1, sizes  # folds of different sizes
    assert len({-(-n // BATCH) for n in sizes}) > 1, sizes  # and different numbers of steps


def test_one_concurrent_cell_is_bit_exact(data, trainers, alone) -> None:
    """K=1 takes the single-cell op at every step: the same bits as `CellTrainer.run`."""
    _, conc = trainers
    c = _cell(data, *CELLS[0])
    r = conc.run([c], _config(0.0))[c.key]
    assert np.array_equal(r.probs, alone[c.key].probs)
    assert r.epoch_losses == alone[c.key].epoch_losses


def test_concurrent_cells_equal_cells_alone(data, trainers, alone, monkeypatch) -> None:
    """K=3 (ragged folds, dropout off) within 1e-5 of each cell alone; with the adapters
    shared across cells (mutation), far from it."""
    _, conc = trainers
    results = conc.run([_cell(data, i, s) for i, s in CELLS], _config(0.0))
    worst = _largest_difference(results, alone)
    print(f"K=3 vs alone: largest difference {worst:.3g}")
    assert worst <= TOL

    monkeypatch.setattr(concurrent, "SHARE_ADAPTERS_FOR_TESTS", True)
    mutated = conc.run([_cell(data, i, s) for i, s in CELLS], _config(0.0))
    print(f"K=3 with shared adapters (mutation) vs alone: {_largest_difference(mutated, alone):.3g}")
    assert _largest_difference(mutated, alone) > 100 * TOL


def test_a_cell_does_not_depend_on_its_neighbours(data, trainers, monkeypatch) -> None:
    """Dropout on (backbone, projector, LoRA): X beside {A, B} equals X beside {C, D};
    K=1 is bit-exact against the single-cell trainer with the same dropout draws."""
    trainer, conc = trainers
    cfg = _config(0.3)

    def x_beside(others):
        group = [_cell(data, 3, 5), *(_cell(data, i, s) for i, s in others)]
        return conc.run(group, cfg)[group[0].key]

    x = _cell(data, 3, 5)
    beside_ab = x_beside([(0, 1), (1, 2)])
    beside_cd = x_beside([(2, 3), (0, 7)])
    diff = max(float(np.abs(beside_ab.probs - beside_cd.probs).max()),
               float(np.abs(np.subtract(beside_ab.epoch_losses, beside_cd.epoch_losses)).max()))  # fmt: skip
    print(f"X beside {{A,B}} vs beside {{C,D}} (dropout on): largest difference {diff:.3g}")
    assert diff <= TOL

    alone_x = trainer.run(x.split, x.store, x.variant, x.seed, cfg)
    k1 = conc.run([_cell(data, 3, 5)], cfg)[x.key]
    assert np.array_equal(k1.probs, alone_x.probs) and k1.epoch_losses == alone_x.epoch_losses
    assert np.abs(beside_ab.probs - alone_x.probs).max() <= TOL

    monkeypatch.setattr(concurrent, "SHARE_ADAPTERS_FOR_TESTS", True)
    mutated = x_beside([(2, 3), (0, 7)])
    assert np.abs(mutated.probs - beside_ab.probs).max() > 100 * TOL


def test_preempted_group_resumes_each_cell_from_its_checkpoint(data, trainers, alone, tmp_path) -> None:
    """Stopped after the first epoch, every cell saves its own checkpoint; a second run
    resumes each and ends with the numbers of the uninterrupted cells."""
    _, conc = trainers
    cfg = _config(0.0)

    def group():
        return [_cell(data, i, s, checkpoint_path=tmp_path / f"{i}.pt") for i, s in CELLS]

    calls = iter([False, True])
    with pytest.raises(Preempted):
        conc.run(group(), cfg, should_stop=lambda: next(calls))
    assert all((tmp_path / f"{i}.pt").is_file() for i, _ in CELLS)
    # resumed one by one (concurrent_cells changed to 1 before the requeue) it would lose its
    # adapters: refused, and the checkpoint is kept for a concurrent resume
    first = group()[0]
    with pytest.raises(UserInputError, match="written by a concurrent loop"):
        trainers[0].run(first.split, first.store, first.variant, first.seed, cfg, checkpoint_path=first.checkpoint_path)
    assert first.checkpoint_path.is_file()
    resumed = conc.run(group(), cfg)
    assert all(r.start_epoch == 1 for r in resumed.values())
    assert _largest_difference(resumed, alone) <= TOL
    assert not any((tmp_path / f"{i}.pt").exists() for i, _ in CELLS)  # done: checkpoints gone


def test_a_failing_cell_leaves_the_others_alone(data, trainers, alone) -> None:
    _, conc = trainers

    def fail(epoch: int, _loss: float) -> None:
        raise RuntimeError("injected")

    cells = [_cell(data, *CELLS[0], on_epoch=fail), *(_cell(data, i, s) for i, s in CELLS[1:])]
    results = conc.run(cells, _config(0.0))
    assert isinstance(results[cells[0].key], RuntimeError)
    assert _largest_difference({k: v for k, v in results.items() if k != cells[0].key}, alone) <= TOL


def test_groups_share_a_variant_and_hold_at_most_k() -> None:
    items = ["a1", "b1", "a2", "a3", "b2"]
    assert groups_of(items, 2, key=lambda s: s[0]) == [["a1", "a2"], ["a3"], ["b1", "b2"]]


def test_concurrent_cells_knob_is_validated() -> None:
    """Default auto; 0 and a combination with data-parallel processes are refused, each with
    its own reason (the CLI turns them into one line and exit 2; tests/test_spec.py has the
    table of values)."""
    from pydantic import ValidationError

    from orchestrator.sweep.spec import ResourcesSpec

    assert ResourcesSpec().concurrent_cells == "auto"
    assert ResourcesSpec(concurrent_cells=4).concurrent_cells == 4
    with pytest.raises(ValidationError, match="0 is out of range"):
        ResourcesSpec(concurrent_cells=0)
    with pytest.raises(ValidationError, match="concurrent cells train in one process"):
        ResourcesSpec(concurrent_cells=2, processes_per_task=2, executor="local")


def test_stacked_visual_modules_compute_the_cells_alone(data, trainers, alone, monkeypatch) -> None:
    """VISUAL_MODE "batched" (grouped Conv3d, stacked projector and head weights) computes
    the same cells: within 1e-3, not 1e-5, because oneDNN's grouped Conv3d sums in another
    order (docs/concurrent.md) and Adam carries that through the epochs. A projector that
    reads the wrong features (mutation: F_high for F_mid and F_high together) is far off."""
    _, conc = trainers
    monkeypatch.setattr(concurrent, "VISUAL_MODE", "batched")
    worst = _largest_difference(conc.run([_cell(data, i, s) for i, s in CELLS], _config(0.0)), alone)
    print(f"K=3, stacked visual modules vs alone: largest difference {worst:.3g}")
    assert worst <= 1e-3

    from aullm.model.projector import FeatureProjector

    def without_f_mid(self, f_mid, f_high):  # 'all' reads both: F_mid zeroed, F_high kept
        return torch.cat([torch.zeros_like(f_mid), f_high], dim=-1)

    monkeypatch.setattr(FeatureProjector, "features", without_f_mid)  # the reference cells were trained before
    mutated = _largest_difference(conc.run([_cell(data, i, s) for i, s in CELLS], _config(0.0)), alone)
    print(f"K=3, stacked, projector without F_mid (mutation) vs alone: {mutated:.3g}")
    assert mutated > 1e-2
