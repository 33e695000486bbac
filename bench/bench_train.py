"""Training cost of one cell with the tiny LLM on the CPU, measured in one run.

Prints: seconds per training step for each variant (side by side), and the share of a
cell's wall time spent outside training steps (process start-up and imports, LLM load,
data read from the cache, model build, prediction). The share is why DESIGN.md §7 packs
several cells per task: that overhead is paid once per task, not once per cell.

    .venv/bin/python bench/bench_train.py [--epochs 5] [--subjects 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=["all", "efp_linear", "prompt_learning", "no_llm"])
    args = parser.parse_args()

    t_import = time.perf_counter()
    import torch

    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split, loso_subjects
    from aullm.data.readers import read_dataset
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm
    from aullm.train import CellTrainer, TrainConfig

    import_s = time.perf_counter() - t_import
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    root = write_synthetic("casme2", work / "casme2", subjects=args.subjects, seed=0)
    llm = build_tiny_llm(work / "tiny", seed=0)
    ClipStore.load(read_dataset("casme2", root), work / "cache")  # warm the cache, as a sweep does

    t0 = time.perf_counter()
    samples = read_dataset("casme2", root)
    store = ClipStore.load(samples, work / "cache")
    data_s = time.perf_counter() - t0
    split = loso_split(samples, loso_subjects(samples)[0], DATASET_AUS["casme2"])
    config = TrainConfig(epochs=args.epochs, lr=1e-3)
    t0 = time.perf_counter()
    trainer = CellTrainer(llm, config)
    load_s = time.perf_counter() - t0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(split.train)} training clips, "
          f"batch = all of them; {args.epochs} epochs")
    print(f"{'variant':<16} {'s/step':>8} {'cell s':>8} {'outside steps':>14}")
    for variant in args.variants:
        r = trainer.run(split, store, variant, 1, config)
        per_step = r.timing["train_step_seconds"] / max(1, r.timing["steps"])
        outside = r.timing["cell_seconds"] - r.timing["train_step_seconds"]
        print(f"{variant:<16} {per_step:8.3f} {r.timing['cell_seconds']:8.2f} {outside / r.timing['cell_seconds']:13.1%}")

    r = trainer.run(split, store, "all", 1, config)
    startup = (t_import - T_PROCESS) + import_s
    one_cell_task = startup + load_s + data_s + r.timing["cell_seconds"]
    steps_s = r.timing["train_step_seconds"]
    print()
    print(f"a task of ONE 'all' cell ({args.epochs} epochs): {one_cell_task:.1f} s wall; training steps "
          f"{steps_s:.1f} s; outside steps {1 - steps_s / one_cell_task:.1%} "
          f"(imports {startup:.1f} s, LLM load {load_s:.1f} s, data {data_s:.2f} s)")
    for k in (4, 8):
        packed = startup + load_s + data_s + k * r.timing["cell_seconds"]
        print(f"a task of {k} cells: outside steps {1 - k * steps_s / packed:.1%}")
    per_step = steps_s / r.timing["steps"]
    print(f"at the paper's 350 epochs one 'all' cell would train {350 * per_step / 60:.1f} min on this CPU")


if __name__ == "__main__":
    main()
