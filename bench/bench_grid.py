"""Orchestration cost at scale: `submit --dry-run` and one `status` refresh on a ~10,000-cell sweep.

The sweep is the paper's full grid (CASME II 26 + SAMM 32 + 4DME 41 subjects, 3 LLMs,
5 variants, cross-domain, no-LLM baseline) over 10 seeds, on synthetic sheets (frames
are not decoded by either command) with three tiny model folders standing in for the
1.5B checkpoints. For `status`, the sweep directory gets a manifest, a submission
record of 1,324 array tasks in 2 arrays and a result file for every other cell.

Prints wall time of each command (as a fresh process, like a user types it) and the
number of scheduler calls each made (counted inside the process by
orchestrator.scheduler). Run with the dev cluster up (`slurm/dev/up.sh`) so the
scheduler calls are real; without Slurm, `status` reports the scheduler unreachable.

    .venv/bin/python bench/bench_grid.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = list(range(1, 11))


def build(work: Path) -> Path:
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm

    # sheets only matter here; 1 clip per subject keeps the JPEG writing short
    for layout, folder, n in (("casme2", "CASME2", 26), ("samm", "SAMM", 32), ("4dme", "4DME", 41)):
        write_synthetic(layout, work / "data" / folder, subjects=n, seed=0, clips_per_subject=1)
    for name in ("Qwen2-1.5B", "Qwen2.5-1.5B", "DeepSeek-R1-Distill-Qwen-1.5B"):
        build_tiny_llm(work / "models" / name, seed=0)
    full = (REPO / "sweeps" / "full.yaml").read_text()
    sweep = work / "full10.yaml"
    import yaml

    data = yaml.safe_load(full)
    data["output_dir"] = str(work / "out")
    data["seeds"] = SEEDS
    data["resources"] = {"executor": "slurm", "partition": "debug", "cpus_per_task": 1, "mem": 1000,
                         "time": 60, "cells_per_task": 8, "array_parallelism": 64}
    sweep.write_text(yaml.safe_dump(data, sort_keys=False))
    return sweep


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall, proc.stdout


COUNTING = textwrap.dedent(
    """
    import sys, atexit, orchestrator.scheduler as s
    calls = []
    real = s._run
    def counted(cmd, *a, **k):
        calls.append(cmd[0])
        return real(cmd, *a, **k)
    s._run = counted
    atexit.register(lambda: print("SCHEDULER_CALLS=" + ",".join(calls), file=sys.stderr))
    from orchestrator.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def run_counted(args: list[str], env: dict[str, str]) -> tuple[float, list[str], str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COUNTING, *args], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    calls = []
    for line in proc.stderr.splitlines():
        if line.startswith("SCHEDULER_CALLS="):
            calls = [c for c in line.split("=", 1)[1].split(",") if c]
    return wall, calls, proc.stdout


def fake_submission(sweep_file: Path, env: dict[str, str]) -> Path:
    """Manifest, one submission record and results for half the cells, as after a real submit."""
    sys.path.insert(0, str(REPO))
    from orchestrator.cells import pack
    from orchestrator.cli import prepare
    from orchestrator.ledger import SweepDir

    spec, _subjects, cells = prepare(str(sweep_file))
    sweep = SweepDir(spec.output_dir)
    sweep.write_manifest(spec, cells)
    tasks = pack(cells, spec.resources.cells_per_task)
    half = len(tasks) // 2
    for array_id, chunk in (("900001", tasks[:half]), ("900002", tasks[half:])):
        sweep.record_submission({"executor": "slurm", "array_job_id": array_id,
                                 "tasks": {str(i): [c.cell_id for c in t] for i, t in enumerate(chunk)},
                                 "submitted_at": time.time()})
    for i, cell in enumerate(cells):
        if i % 2 == 0:
            sweep.write_result(cell.cell_id, {"cell_id": cell.cell_id, "status": "done", "finished_at": time.time(),
                                              "predictions": {"probs": [[0.5] * 8] * 10, "labels": [[0] * 8] * 10}})
    return sweep.path


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AULLM_DATA": str(work / "data"), "AULLM_MODELS": str(work / "models")}
    os.environ.update(env)
    t0 = time.perf_counter()
    sweep_file = build(work)
    print(f"built synthetic sheets and model folders in {time.perf_counter() - t0:.1f} s ({work})")

    wall, calls, out = run_counted(["submit", str(sweep_file), "--dry-run", "--json"], env)
    plan = json.loads(out)
    print(f"submit --dry-run: {plan['cells']} cells, {plan['tasks']} tasks in {len(plan['arrays'])} arrays: "
          f"{wall:.2f} s wall, {len(calls)} scheduler calls ({', '.join(calls) or 'none'})")

    t0 = time.perf_counter()
    fake_submission(sweep_file, env)
    print(f"(wrote manifest + {plan['cells'] // 2 + plan['cells'] % 2} result files in {time.perf_counter() - t0:.1f} s)")
    wall, calls, out = run_counted(["status", str(sweep_file), "--json"], env)
    summary = json.loads(out) if out.strip().startswith("{") else {}
    print(f"status --json: {summary.get('cells', '?')} cells, counts {summary.get('counts', {})}: "
          f"{wall:.2f} s wall, {len(calls)} scheduler calls ({', '.join(calls) or 'none'})")


if __name__ == "__main__":
    main()
