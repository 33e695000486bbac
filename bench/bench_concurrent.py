"""Cells per hour: K concurrent cells (aullm/concurrent.py) against today's packed
sequential trainer (CellTrainer.run, one cell after another, LLM loaded once), measured
side by side in one run, for the tiny Qwen2 and a ~0.1B Qwen2 built from a config.

    python bench/bench_concurrent.py [--ks 1 2 4 8] [--epochs 2] [--models tiny 0.1b]

Prints, per model and K: seconds for K cells packed sequentially and concurrently, cells
per hour of each, the ratio, and the fraction of wall time spent inside training steps.
Both sides train the same K cells (K folds of a synthetic CASME II, one seed each).
"""

from __future__ import annotations

import argparse
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
        for k in args.ks:
            cells = [ConcurrentCell(key=s, split=loso_split(samples, s, DATASET_AUS["casme2"]), store=store,
                                    variant="all", seed=i + 1) for i, s in enumerate(subjects[:k])]  # fmt: skip
            t0 = time.perf_counter()
            seq_steps = sum(trainer.run(c.split, c.store, c.variant, c.seed, cfg).timing["train_step_seconds"]
                            for c in cells)  # fmt: skip
            seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = conc.run(cells, cfg)
            together = time.perf_counter() - t0
            bad = [r for r in results.values() if isinstance(r, BaseException)]
            if bad:
                raise bad[0]
            conc_steps = sum(r.timing["train_step_seconds"] for r in results.values())
            rows.append((name, k, seq, together, seq_steps / seq, conc_steps / together))
            print(f"  {name} K={k}: sequential {seq:.1f} s, concurrent {together:.1f} s", flush=True)

    print()
    print("| model | K | packed sequential s | concurrent s | cells/h sequential | cells/h concurrent | ratio "
          "| in steps (seq) | in steps (conc) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, k, seq, together, f_seq, f_conc in rows:
        print(f"| {name} | {k} | {seq:.1f} | {together:.1f} | {3600 * k / seq:.0f} | {3600 * k / together:.0f} "
              f"| {seq / together:.2f}x | {f_seq:.0%} | {f_conc:.0%} |")


if __name__ == "__main__":
    main()
