"""What settings axes cost at plan time: `submit --dry-run` of sweeps/full.yaml as shipped
(seed 1), and of the same file with a 3x2 axis (`--set 'sweep.lr=[1e-5,3e-5,1e-4]'
--set 'sweep.lora_r=[8,16]'`: 6 settings, 6 times the cells), side by side in one run.

Paper-sized synthetic data: the real readers parse sheets of CASME II 26, SAMM 32 and
4DME 41 subjects (1 clip each: a dry run reads the sheets, it decodes no frame), and three
tiny model folders stand in for the 1.5B checkpoints. Each command is a fresh process, as
a user types it, run `--repeat` times, interleaved; medians are printed with the ratio.
The target (issue 14): the 3x2 dry run under 3 s.

    .venv/bin/python bench/bench_axes.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AXES = ["--set", "sweep.lr=[1e-5,3e-5,1e-4]", "--set", "sweep.lora_r=[8,16]"]


def build(work: Path) -> dict[str, str]:
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm

    for layout, folder, n in (("casme2", "CASME2", 26), ("samm", "SAMM", 32), ("4dme", "4DME", 41)):
        write_synthetic(layout, work / "data" / folder, subjects=n, seed=0, clips_per_subject=1)
    for name in ("Qwen2-1.5B", "Qwen2.5-1.5B", "DeepSeek-R1-Distill-Qwen-1.5B"):
        build_tiny_llm(work / "models" / name, seed=0)
    return {"AULLM_DATA": str(work / "data"), "AULLM_MODELS": str(work / "models"), "AULLM_RUNS": str(work / "runs")}


def dry_run(extra: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(REPO / "sweeps" / "full.yaml"), "--dry-run", *extra],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aullm-bench-axes-") as tmp:
        env = {**os.environ, **build(Path(tmp)), "PYTHONPATH": str(REPO)}
        dry_run([], env)  # warm the bytecode and the page cache for both
        walls: dict[str, list[float]] = {"no axis": [], "3x2 axis": []}
        plans: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, extra in (("no axis", []), ("3x2 axis", AXES)):
                wall, plans[name] = dry_run(extra, env)
                walls[name].append(wall)
        for name, w in walls.items():
            p = plans[name]
            print(f"submit --dry-run sweeps/full.yaml [{name}]: {p['cells']} cells, {p['tasks']} tasks: "
                  f"median {statistics.median(w):.2f} s (fastest {min(w):.2f}, {len(w)} runs)")  # fmt: skip
        ratio = statistics.median(walls["3x2 axis"]) / statistics.median(walls["no axis"])
        cells = plans["3x2 axis"]["cells"] / plans["no axis"]["cells"]
        print(f"3x2 axis / no axis: {ratio:.2f}x the time for {cells:.1f}x the cells; "
              f"3x2 median {statistics.median(walls['3x2 axis']):.2f} s (target < 3 s)")


if __name__ == "__main__":
    main()
