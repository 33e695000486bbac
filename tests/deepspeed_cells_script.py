"""Train cells in THIS process, with or without DeepSpeed, and save what tests compare.

    python tests/deepspeed_cells_script.py OUT.npz --data ROOT --cache DIR --llm DIR --epochs N
        [--deepspeed CONFIG.json] [--checkpoint-dir DIR [--stop-at EPOCH]] CELL [CELL...]

CELL is `<subject>:<variant>:<seed>`. Run alone (one process: the trainer joins its
one-rank group) or under `torchrun --nproc_per_node 2` (rank 0 writes OUT.npz). For each
cell: probabilities, epoch losses, the epoch it started at, and after it the process's
resident memory and how many prepared models (DeepSpeed engines) are still alive.

With `--stop-at E` each cell is preempted before epoch E (its checkpoint is left in
--checkpoint-dir); a second run with the same --checkpoint-dir and no --stop-at resumes.

Test-only breakages, to see the tests fail when a property is broken:
  --break keep-engines   hold every cell's engine (a leak between packed cells)
  --break skip-engine-load  resume without the engine's optimizer state
  --break no-destroy     never destroy an engine (its ZeRO hooks stay on the shared LoRA weights)
  --break no-adapter-reset  a cell starts from the LoRA weights the previous cell left
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--llm", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--deepspeed")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--break", dest="breakage", choices=("keep-engines", "skip-engine-load", "no-destroy", "no-adapter-reset"))
    parser.add_argument("cells", nargs="+")
    args = parser.parse_args(argv)

    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split
    from aullm.data.readers import read_dataset
    from aullm.train import CellTrainer, Preempted, TrainConfig

    samples = read_dataset("casme2", args.data)
    store = ClipStore.load(samples, Path(args.cache))
    config = TrainConfig(epochs=args.epochs, lr=1e-3, precision="fp32", deepspeed=args.deepspeed)
    trainer = CellTrainer(args.llm, config)
    # Every prepared model, weakly: how many are still alive after their cell. (gc.get_objects
    # cannot count them: the trainer freezes survivors out of the collector's lists.)
    prepared: list[weakref.ref] = []
    kept: list[object] = []
    prepare = trainer.accelerator.prepare

    def watched_prepare(*objs: object) -> tuple:
        out = prepare(*objs)
        prepared.append(weakref.ref(out[0]))
        if args.breakage == "keep-engines":
            kept.extend(out)
        return out

    trainer.accelerator.prepare = watched_prepare  # type: ignore[method-assign]
    if args.breakage == "no-destroy":
        from deepspeed.runtime.engine import DeepSpeedEngine

        DeepSpeedEngine.destroy = lambda self: None  # type: ignore[method-assign]
    if args.breakage == "no-adapter-reset":
        trainer.llm.reset_adapters = lambda seed: None  # type: ignore[method-assign]
    if args.breakage == "skip-engine-load":
        CellTrainer._load_engine = lambda self, path, model: None  # type: ignore[method-assign]

    arrays: dict[str, np.ndarray] = {}
    for spec in args.cells:
        subject, variant, seed = spec.split(":")
        split = loso_split(samples, subject, DATASET_AUS["casme2"])
        ckpt = args.checkpoint_dir / f"{spec.replace(':', '_')}.pt" if args.checkpoint_dir else None
        epochs_seen = {"n": 0}

        def stop() -> bool:
            epochs_seen["n"] += 1
            return args.stop_at is not None and epochs_seen["n"] > args.stop_at

        try:
            result = trainer.run(split, store, variant, int(seed), config, checkpoint_path=ckpt, should_stop=stop)
        except Preempted:
            arrays[spec + ":preempted"] = np.array(1)
            continue
        arrays[spec] = result.probs
        arrays[spec + ":losses"] = np.array(result.epoch_losses)
        arrays[spec + ":start_epoch"] = np.array(result.start_epoch)
        gc.collect()
        arrays[spec + ":rss_mb"] = np.array(_rss_mb())
        arrays[spec + ":live_models"] = np.array(sum(1 for ref in prepared if ref() is not None))
    arrays["world_size"] = np.array(trainer.accelerator.num_processes)
    arrays["distributed_type"] = np.array(str(trainer.accelerator.distributed_type))
    if trainer.accelerator.is_main_process:
        np.savez(args.out, **arrays)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
