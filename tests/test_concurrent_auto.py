"""`resources.concurrent_cells: auto` (aullm/concurrent.py): how K is chosen.

The choice itself is pure arithmetic over measured bytes (tables below). The measurement
trains two cells for two steps through the concurrent loop's own code and reads the CUDA
allocator; on the CPU those steps run with a stand-in for the allocator's counters, so
that what the measurement must not do (leave a trace in the cells trained after it) is
checked here too. The real CUDA reading is behind the `gpu` marker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aullm.concurrent import (
    GIB,
    ConcurrentCell,
    ConcurrentTrainer,
    auto_without_measuring,
    choose_concurrent_cells,
    describe_auto,
)
from aullm.constants import DATASET_AUS, MAX_CONCURRENT_CELLS
from aullm.data.clips import ClipStore
from aullm.data.folds import loso_split, loso_subjects
from aullm.data.readers import read_dataset
from aullm.train import CellTrainer, TrainConfig
from tests.helpers import one_torch_thread

# (case, free bytes, per-cell bytes, cells in the loop, usable fraction, cap, K)
CHOOSER_CASES = [
    ("fits several", 80 * GIB, 9 * GIB, 20, 0.9, 64, 8),  # 72 GiB usable / 9
    ("per cell above free", 8 * GIB, 9 * GIB, 20, 0.9, 64, 1),  # never 0: one cell trains as always
    ("per cell above usable, below free", 10 * GIB, 9.5 * GIB, 20, 0.9, 64, 1),
    ("exactly the usable share", 100, 30, 20, 0.9, 64, 3),  # 3 * 30 == 90: K * per_cell <= usable
    ("just under it", 99, 30, 20, 0.9, 64, 2),  # 89.1 usable
    ("the reserve costs a cell", 100, 25, 20, 0.9, 64, 3),  # 4 without the reserve
    ("no reserve", 100, 25, 20, 1.0, 64, 4),
    ("half usable", 100, 25, 20, 0.5, 64, 2),
    ("fewer cells than room", 1000 * GIB, 1 * GIB, 3, 0.9, 64, 3),
    ("one cell", 1000 * GIB, 1 * GIB, 1, 0.9, 64, 1),
    ("the cap", 1000 * GIB, 1 * GIB, 200, 0.9, 64, 64),
    ("a lower cap", 1000 * GIB, 1 * GIB, 200, 0.9, 8, 8),
    ("nothing free", 0, 1 * GIB, 20, 0.9, 64, 1),
    ("nothing measured", 80 * GIB, 0, 20, 0.9, 64, 20),  # bounded by the cells, not a division by 0
]


@pytest.mark.parametrize(("free", "per_cell", "cells", "fraction", "cap", "k"), [c[1:] for c in CHOOSER_CASES],
                         ids=[c[0] for c in CHOOSER_CASES])  # fmt: skip
def test_chooser_takes_the_largest_k_that_fits(free: int, per_cell: int, cells: int, fraction: float, cap: int,
                                               k: int) -> None:  # fmt: skip
    chosen = choose_concurrent_cells(int(free), int(per_cell), cells=cells, usable_fraction=fraction, cap=cap)
    assert chosen == k
    if chosen > 1:
        assert chosen * int(per_cell) <= int(free) * fraction  # fits
    if chosen < min(cells, cap):
        assert (chosen + 1) * int(per_cell) > int(free) * fraction  # and one more would not


def test_chooser_defaults_are_the_documented_ones() -> None:
    assert choose_concurrent_cells(100 * GIB, 10 * GIB, cells=100) == 9  # 90% usable
    assert choose_concurrent_cells(10_000 * GIB, GIB, cells=1000) == MAX_CONCURRENT_CELLS == 64


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_chooser_refuses_a_meaningless_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="usable_fraction"):
        choose_concurrent_cells(GIB, GIB, cells=2, usable_fraction=fraction)


@pytest.mark.parametrize(
    ("device", "has_llm", "processes", "deepspeed", "why"),
    [
        ("cpu", True, 1, False, "CPU"),
        ("cuda", True, 1, False, None),  # the only case that measures
        ("cuda", True, 1, True, "DeepSpeed"),
        ("cuda", True, 4, False, "4 processes"),
        ("cuda", False, 1, False, "no LLM"),
        ("cpu", False, 1, False, "no LLM"),
        ("cpu", True, 2, False, "2 processes"),
        ("mps", True, 1, False, "MPS"),
    ],
)
def test_auto_is_one_without_measuring_except_on_one_gpu_process(
    device: str, has_llm: bool, processes: int, deepspeed: bool, why: str | None
) -> None:
    assert auto_without_measuring(device, has_llm=has_llm, processes=processes, deepspeed=deepspeed) == why


@pytest.mark.parametrize(
    ("k", "per_cell", "free", "cells", "line"),
    [
        (7, 9.1, 71.3, 20, "7 (per cell 9.1 GiB measured, 71.3 GiB free, 90% usable: room for 7)"),
        (3, 9.1, 71.3, 3, "3 (per cell 9.1 GiB measured, 71.3 GiB free, 90% usable: room for 7, 3 cells to train)"),
        (1, 90.0, 71.3, 20, "1 (per cell 90.0 GiB measured, 71.3 GiB free, 90% usable: room for 0)"),
        (64, 1.0, 139.0, 200, "64 (per cell 1.0 GiB measured, 139.0 GiB free, 90% usable: room for 125, at most 64)"),
    ],
)
def test_the_log_line_says_what_was_measured_and_what_bound_k(k: int, per_cell: float, free: float, cells: int,
                                                               line: str) -> None:  # fmt: skip
    per, fr = int(per_cell * GIB), int(free * GIB)
    assert choose_concurrent_cells(fr, per, cells=cells) == k
    assert describe_auto(k, per, fr, cells=cells) == line


# ---------------------------------------------------------------- the measurement's steps


class FakeMemory:
    """The allocator's counters as the measurement reads them; on the CPU nothing counts
    bytes, so these are set numbers: what is checked is the arithmetic and the steps."""

    def __init__(self, *, allocated: int, peak: int, free: int) -> None:
        self._allocated, self._peak, self._free = allocated, peak, free
        self.calls: list[str] = []

    def settle(self) -> None:
        self.calls.append("settle")

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def allocated(self) -> int:
        self.calls.append("allocated")
        return self._allocated

    def peak(self) -> int:
        self.calls.append("peak")
        return self._peak

    def free(self) -> int:
        self.calls.append("free")
        return self._free


EPOCHS = 2
BATCH = 16


def _config() -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, lr=1e-3, batch_size=BATCH, dropout=0.3, lora_dropout=0.3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from aullm.data.synth import write_synthetic

    root = write_synthetic("casme2", tmp_path_factory.mktemp("data") / "casme2", subjects=4, seed=0)
    samples = read_dataset("casme2", root)
    return samples, ClipStore.load(samples, tmp_path_factory.mktemp("cache"))


def _cell(data, index: int, seed: int) -> ConcurrentCell:
    samples, store = data
    subject = loso_subjects(samples)[index]
    split = loso_split(samples, subject, DATASET_AUS["casme2"])
    return ConcurrentCell(key=f"{subject}:all:{seed}", split=split, store=store, variant="all", seed=seed)


@pytest.fixture(scope="module")
def trainers(tiny_llm: Path):
    with one_torch_thread():
        trainer = CellTrainer(tiny_llm, _config())
        yield trainer, ConcurrentTrainer(trainer)


def test_measurement_trains_the_two_biggest_cells_and_halves_their_peak(data, trainers, monkeypatch) -> None:
    _, conc = trainers
    cells = [_cell(data, i, seed) for i, seed in [(0, 1), (1, 2), (2, 3), (3, 4)]]
    sizes = sorted((len(c.split.train) for c in cells), reverse=True)
    started: list[int] = []
    real_start = conc._start
    monkeypatch.setattr(conc, "_start", lambda cell, cfg: started.append(len(cell.split.train)) or real_start(cell, cfg))
    memory = FakeMemory(allocated=3 * GIB, peak=3 * GIB + 2 * 777, free=0)
    assert conc.measure_cell_bytes(cells, _config(), memory) == 777
    assert sorted(started, reverse=True) == sizes[:2]
    # the peak is read after the steps, counted from what was allocated before them, and
    # the measured cells are let go before anyone reads the free memory
    assert memory.calls == ["settle", "allocated", "reset_peak", "peak", "settle"]


def test_choose_k_measures_then_reads_the_free_memory(data, trainers) -> None:
    _, conc = trainers
    cells = [_cell(data, i, seed) for i, seed in [(0, 1), (1, 2), (2, 3)]]
    memory = FakeMemory(allocated=GIB, peak=GIB + 2 * 10 * GIB, free=25 * GIB)  # 10 GiB a cell, 22.5 usable
    k, why = conc.choose_k(cells, _config(), memory)
    assert (k, why) == (2, "2 (per cell 10.0 GiB measured, 25.0 GiB free, 90% usable: room for 2)")
    assert memory.calls[-1] == "free"
    assert conc.choose_k(cells[:1], _config(), FakeMemory(allocated=0, peak=0, free=0)) == (1, "1 (one cell to train)")


def test_a_measurement_leaves_no_trace_in_the_cells_trained_after_it(data, trainers) -> None:
    """Dropout on, K=1 after a measurement: the same bits as without it (every cell starts
    from its own seed), and the task's first training step is still the cells' own."""
    trainer, conc = trainers
    cfg = _config()
    before = conc.run([_cell(data, 0, 1)], cfg)[_cell(data, 0, 1).key]
    trainer.first_step_at = None  # a task that has trained nothing yet
    trainer.training_started.clear()
    conc.measure_cell_bytes([_cell(data, 0, 1), _cell(data, 1, 2)], cfg, FakeMemory(allocated=0, peak=0, free=0))
    assert trainer.first_step_at is None and not trainer.training_started.is_set()  # MLflow waits for it
    after = conc.run([_cell(data, 0, 1)], cfg)[_cell(data, 0, 1).key]
    assert np.array_equal(after.probs, before.probs) and after.epoch_losses == before.epoch_losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_measurement_reads_the_allocator(data, tiny_llm: Path) -> None:
    """What the CPU cannot show: the bytes are real, K follows from them, and the cells
    trained after a measurement are those trained without one."""
    trainer = CellTrainer(tiny_llm, _config())
    assert trainer.device.type == "cuda"
    conc = ConcurrentTrainer(trainer)
    cells = [_cell(data, i, seed) for i, seed in [(0, 1), (1, 2), (2, 3)]]
    cfg = _config()
    before = conc.run([_cell(data, 0, 1)], cfg)[_cell(data, 0, 1).key]
    allocated = torch.cuda.memory_allocated()
    per_cell = conc.measure_cell_bytes(cells, cfg)
    assert per_cell > 0
    assert torch.cuda.memory_allocated() <= allocated  # nothing of the measured cells is left
    k, why = conc.choose_k(cells, cfg)
    print(f"\n[concurrent auto] tiny model on {torch.cuda.get_device_name()}: {why}")
    assert 1 <= k <= len(cells) and why.startswith(f"{k} (per cell ")
    after = conc.run([_cell(data, 0, 1)], cfg)[_cell(data, 0, 1).key]
    assert np.abs(after.probs - before.probs).max() <= 1e-5
