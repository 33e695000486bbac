"""The visual backbone's training pass on the CPU: channels-last activations against the
default layout, side by side in one run, and what that does to one training cell.

Prints the median seconds of forward + backward for a full batch with each layout, their
ratio, the largest difference between the two layouts' outputs, and the seconds of a
whole 'all' cell (tiny LLM) trained with each layout.

    .venv/bin/python bench/bench_backbone.py [--batch 66] [--repeats 5] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=66, help="clips a step (the learning test's training set)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the whole-cell comparison (0: skip it)")
    args = parser.parse_args()

    import torch

    import aullm.model.backbone as backbone
    from aullm.constants import FRAME_SIZE, NUM_FRAMES

    torch.manual_seed(0)
    net = backbone.VisualBackbone(dropout=0.0)
    clips = torch.rand(args.batch, NUM_FRAMES, FRAME_SIZE, FRAME_SIZE) * 255

    def one_pass() -> tuple[float, torch.Tensor]:
        net.zero_grad()
        t0 = time.perf_counter()
        f_mid, f_high = net(clips)
        (f_mid.mean() + f_high.mean()).backward()
        return time.perf_counter() - t0, f_high.detach()

    times: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats + 1):  # the first round warms both paths up and is dropped
        for layout in (False, True):  # interleaved, so a load change hits both alike
            backbone.CHANNELS_LAST_ON_CPU = layout
            seconds, outputs[layout] = one_pass()
            times[layout].append(seconds)
    default, last = statistics.median(times[False][1:]), statistics.median(times[True][1:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} clips "
          f"of {NUM_FRAMES}x{FRAME_SIZE}x{FRAME_SIZE}; median of {args.repeats}, forward + backward")
    print(f"  default layout       {default:7.3f} s")
    print(f"  channels-last        {last:7.3f} s")
    print(f"  ratio default / channels-last: {default / last:.2f}x; "
          f"largest |F_high difference| {(outputs[True] - outputs[False]).abs().max().item():.2e}")
    if args.epochs:
        whole_cell(args.epochs, backbone)


def whole_cell(epochs: int, backbone) -> None:  # noqa: ANN001 (a module)
    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split, loso_subjects
    from aullm.data.readers import read_dataset
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm
    from aullm.train import CellTrainer, TrainConfig

    work = Path(tempfile.mkdtemp(prefix="bench-backbone-"))
    root = write_synthetic("casme2", work / "casme2", subjects=12, seed=0, clips_per_subject=6)
    samples = read_dataset("casme2", root)
    store = ClipStore.load(samples, work / "cache")
    split = loso_split(samples, loso_subjects(samples)[0], DATASET_AUS["casme2"])
    config = TrainConfig(epochs=epochs, lr=1e-3)
    trainer = CellTrainer(build_tiny_llm(work / "tiny", seed=0), config)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(2):
        for layout in (False, True):
            backbone.CHANNELS_LAST_ON_CPU = layout
            r = trainer.run(split, store, "all", 1, config)
            seconds[layout].append(r.timing["train_step_seconds"])
    default, last = min(seconds[False]), min(seconds[True])
    print(f"one 'all' cell, tiny LLM, {len(split.train)} training clips, {epochs} full-batch epochs "
          f"(training steps, best of 2): default {default:.2f} s, channels-last {last:.2f} s, "
          f"ratio {default / last:.2f}x")


if __name__ == "__main__":
    main()
