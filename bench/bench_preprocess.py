"""How much the decode-once frame cache saves, measured in one run.

Writes a CASME II-sized synthetic set (26 subjects, ~255 clips) into a temporary folder,
then times `ClipStore.load` cold (every JPEG decoded, cache written) and warm (cache
read), and prints both with their ratio. The real CASME II clips are longer (200 fps),
so the absolute cold time on real data is larger; the ratio is what carries over.

    PYTHONPATH=. .venv/bin/python bench/bench_preprocess.py [--subjects 26] [--workers N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from aullm.data import ClipStore, read_dataset, write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="casme2", choices=("casme2", "samm", "4dme"))
    parser.add_argument("--subjects", type=int, default=None, help="default: the real set's size")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: CPUs, at most 8)")
    parser.add_argument("--warm-repeats", type=int, default=3, help="warm loads to time (the best is reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        start = time.perf_counter()
        root = write_synthetic(args.layout, Path(tmp) / args.layout, subjects=args.subjects, seed=0)
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        samples = read_dataset(args.layout, root)
        read_s = time.perf_counter() - start
        frames = sum(s.num_frames for s in samples)

        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        cold = ClipStore.load(samples, cache, workers=args.workers)
        cold_s = time.perf_counter() - start
        assert cold.decoded == frames

        warm_s = float("inf")
        for _ in range(args.warm_repeats):
            start = time.perf_counter()
            warm = ClipStore.load(samples, cache, workers=args.workers)
            warm_s = min(warm_s, time.perf_counter() - start)
            assert warm.decoded == 0

        size_mb = sum(p.stat().st_size for p in cold.cache_files) / 1e6
        print(
            f"dataset: synthetic {args.layout}, {len({s.subject for s in samples})} subjects, "
            f"{len(samples)} clips, {frames} frames"
        )
        print(f"generate:           {generate_s:8.2f} s")
        print(f"read_dataset:       {read_s:8.3f} s")
        print(f"ClipStore cold:     {cold_s:8.3f} s  (decode {frames} JPEGs, write {size_mb:.1f} MB cache)")
        print(f"ClipStore warm:     {warm_s:8.3f} s  (best of {args.warm_repeats}, cache read only)")
        print(f"cold / warm ratio:  {cold_s / warm_s:8.1f} x")


if __name__ == "__main__":
    main()
