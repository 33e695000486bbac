"""Cells per hour: K concurrent cells (aullm/concurrent.py) against today's packed
sequential trainer (CellTrainer.run, one cell after another, LLM loaded once), measured
side by side in one run, for the tiny Qwen2 and a ~0.1B Qwen2 built from a config.

    python bench/bench_concurrent.py [--ks 1 2 4 8] [--epochs 2] [--models tiny 0.1b] [--repeats 3]

Prints, per model and K: seconds for K cells packed sequentially and concurrently, cells
per hour of each, the ratio, and the fraction of wall time spent inside training steps.
Both sides train the same K cells (K folds of a synthetic CASME II, one seed each).

Each pair is timed --repeats times, the two sides in alternating order (a machine that
slows down or warms up over a run weighs on both alike), after one untimed warm-up cell
per model (the first step's one-off costs: oneDNN kernels, the fused optimizer's compile);
the table gives the median of each side and the median of the per-repeat ratios.
Run it on an otherwise idle machine: the ratio of two CPU-bound loops sharing the cores
with other work says little.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_qwen2(out: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> Path:
    """A random Qwen2 of the given shape with the tiny model's tokenizer, saved as a checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aullm.model.tiny import TINY_VOCAB_SIZE, _train_tokenizer

    config = Qwen2Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    print(f"  built Qwen2: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
    model.save_pretrained(out)
    _train_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["tiny", "0.1b"])
    parser.add_argument("--subjects", type=int, default=9, help="synthetic CASME II subjects (folds); >= max K")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per model and K (median reported)")
    args = parser.parse_args()

    from aullm.concurrent import ConcurrentCell, ConcurrentTrainer
    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split, loso_subjects
    from aullm.data.readers import read_dataset
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm
    from aullm.train import CellTrainer, TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench_concurrent_"))
    root = write_synthetic("casme2", tmp / "casme2", subjects=args.subjects, seed=0)
    samples = read_dataset("casme2", root)
    store = ClipStore.load(samples, tmp / "cache")
    subjects = loso_subjects(samples)
    if max(args.ks) > len(subjects):
        raise SystemExit(f"--subjects {args.subjects} < largest K {max(args.ks)}")
    cfg = TrainConfig(epochs=args.epochs, lr=1e-3)
    print(f"machine: {torch.get_num_threads()} torch threads, device cpu; {len(samples)} clips, "
          f"{args.epochs} epochs a cell")  # fmt: skip

    rows = []
    for name in args.models:
        if name == "tiny":
            path = build_tiny_llm(tmp / "tiny", seed=0)
        else:  # ~0.1B: hidden 768, 16 layers, MLP 2560
            path = build_qwen2(tmp / "q01b", hidden=768, layers=16, intermediate=2560, heads=12, kv_heads=2)
        trainer = CellTrainer(path, cfg)
        conc = ConcurrentTrainer(trainer)

        def sequential(cells: list[ConcurrentCell]) -> tuple[float, float]:
            t0 = time.perf_counter()
            steps = sum(trainer.run(c.split, c.store, c.variant, c.seed, cfg).timing["train_step_seconds"]
                        for c in cells)  # fmt: skip
            return time.perf_counter() - t0, steps

        def concurrent(cells: list[ConcurrentCell]) -> tuple[float, float]:
            t0 = time.perf_counter()
            results = conc.run(cells, cfg)
            wall = time.perf_counter() - t0
            bad = [r for r in results.values() if isinstance(r, BaseException)]
            if bad:
                raise bad[0]
            return wall, sum(r.timing["train_step_seconds"] for r in results.values())

        def fold_cells(k: int) -> list[ConcurrentCell]:
            return [ConcurrentCell(key=s, split=loso_split(samples, s, DATASET_AUS["casme2"]), store=store,
                                   variant="all", seed=i + 1) for i, s in enumerate(subjects[:k])]  # fmt: skip

        sequential(fold_cells(1))  # warm-up, untimed
        concurrent(fold_cells(1))
        for k in args.ks:
            cells = fold_cells(k)
            seqs, concs, ratios = [], [], []
            for rep in range(args.repeats):
                first, second = (sequential, concurrent) if rep % 2 == 0 else (concurrent, sequential)
                a, b = first(cells), second(cells)
                s_run, c_run = (a, b) if first is sequential else (b, a)
                seqs.append(s_run)
                concs.append(c_run)
                ratios.append(s_run[0] / c_run[0])
            seq, seq_steps = statistics.median(w for w, _ in seqs), statistics.median(st for _, st in seqs)
            together, conc_steps = statistics.median(w for w, _ in concs), statistics.median(st for _, st in concs)
            ratio = statistics.median(ratios)
            rows.append((name, k, seq, together, ratio, seq_steps / seq, conc_steps / together))
            print(f"  {name} K={k}: sequential {', '.join(f'{w:.1f}' for w, _ in seqs)} s; "
                  f"concurrent {', '.join(f'{w:.1f}' for w, _ in concs)} s", flush=True)

    print()
    print("| model | K | packed sequential s | concurrent s | cells/h sequential | cells/h concurrent | ratio "
          "| in steps (seq) | in steps (conc) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, k, seq, together, ratio, f_seq, f_conc in rows:
        print(f"| {name} | {k} | {seq:.1f} | {together:.1f} | {3600 * k / seq:.0f} | {3600 * k / together:.0f} "
              f"| {ratio:.2f}x | {f_seq:.0%} | {f_conc:.0%} |")


if __name__ == "__main__":
    main()
