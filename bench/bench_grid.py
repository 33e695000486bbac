"""Orchestration cost at scale: `submit --dry-run`, `status` and `collect` on a ~10,000-cell sweep.

The sweep is the paper's full grid (CASME II 26 + SAMM 32 + 4DME 41 subjects, 3 LLMs,
5 variants, cross-domain, no-LLM baseline) over 10 seeds, on synthetic sheets (frames
are not decoded by any of the commands) with three tiny model folders standing in for
the 1.5B checkpoints. The sweep directory then gets what a real submission leaves: the
manifest, a submission record of 1,326 array tasks in 2 arrays, and result files shaped
like jobs/run_cells.py's (test-set probabilities and labels at the real datasets' fold
sizes, 350 epoch losses, timing). Two states are timed:

    half done   every other cell has a result, the rest pending: `status`
    all done    every cell has a result: `status`, `collect --no-mlflow`, `collect`

The embedded MLflow store gets what submit and the jobs leave in it: one parent run per
group (made as submit makes them) and one FINISHED cell run per cell, created under its
parent with its params and a few loss points, its ids recorded in the result file as
jobs/run_cells.py records them. Creating 10,590 runs through the MLflow client takes
about 5 minutes here; `--no-cell-runs` leaves the store empty (collect then only makes
the parents).

Each command runs as a fresh process, as a user types it, several times (the median and
the fastest are printed; the first `status` of a state is shown apart: it reads every
result file that its index does not know yet). Scheduler calls are counted inside the
process by orchestrator.state.scheduler. Run with the dev cluster up (`slurm/dev/up.sh`) so the
calls are real; without Slurm, `status` reports the scheduler unreachable.

Bytecode: commands run with a bytecode cache (PYTHONPYCACHEPREFIX in the work folder,
warmed first), as an installed package runs; a checkout with PYTHONDONTWRITEBYTECODE=1
recompiles the project's modules on every call (~0.1 s more per command).

    .venv/bin/python bench/bench_grid.py [--repeat 5] [--baseline DIR]

--baseline DIR runs the same commands from another checkout of the project (e.g.
`git archive <rev> | tar -x -C DIR`) on the same sweep directory and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEEDS = list(range(1, 11))
# Test clips per LOSO fold, about the real datasets' (CASME II 255 clips / 26 subjects, ...)
CLIPS_PER_FOLD = {"casme2": 10, "samm": 5, "4dme": 7}
EPOCHS = 350


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


COUNTING = textwrap.dedent(
    """
    import sys, atexit, orchestrator.state.scheduler as s
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


def run_counted(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, list[str], str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COUNTING, *args], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    calls: list[str] = []
    for line in proc.stderr.splitlines():
        if line.startswith("SCHEDULER_CALLS="):
            calls = [c for c in line.split("=", 1)[1].split(",") if c]
    return wall, calls, proc.stdout


def fold_subjects(cells: list[Any]) -> dict[str, list[str]]:
    subjects: dict[str, list[str]] = {}
    for c in cells:
        if c.kind == "loso" and c.fold not in subjects.setdefault(c.dataset, []):
            subjects[c.dataset].append(c.fold)
    return subjects


def result_payload(cell: Any, subjects: dict[str, list[str]], now: float) -> dict[str, Any]:
    """A result as jobs/run_cells.py writes it, with made-up but well-formed predictions."""
    import numpy as np

    from aullm.constants import CROSS_DOMAIN_AUS, DATASET_AUS

    rng = np.random.default_rng(zlib.crc32(cell.cell_id.encode()))
    if cell.kind == "loso":
        aus, tested = DATASET_AUS[cell.dataset], [cell.fold]
    else:
        aus, tested = CROSS_DOMAIN_AUS, subjects[cell.test_dataset]
    keys = [f"{cell.test_dataset}/{s}/clip{j}" for s in tested for j in range(CLIPS_PER_FOLD[cell.test_dataset])]
    n = len(keys)
    cell_s = float(rng.uniform(20, 60))
    return {
        "cell_id": cell.cell_id,
        "status": "done",
        "predictions": {
            "sample_keys": keys,
            "subjects": [k.split("/")[1] for k in keys],
            "aus": list(aus),
            "probs": np.round(rng.uniform(0, 1, (n, len(aus))), 7).tolist(),
            "labels": (rng.uniform(0, 1, (n, len(aus))) < 0.2).astype(int).tolist(),
        },
        "epoch_losses": np.round(np.linspace(1.0, 0.1, EPOCHS), 6).tolist(),
        "timing": {"cell_seconds": cell_s, "train_step_seconds": 0.8 * cell_s, "steps": EPOCHS,
                   "predict_seconds": 0.2, "llm_load_seconds": 12.0},
        "start_epoch": 0,
        "attempt": 1,
        "host": "gpu-node-01",
        "slurm": {"job_id": "1", "array_job_id": "900001", "array_task_id": "0"},
        "started_at": now - cell_s - 1,
        "finished_at": now,
    }


class CellRuns:
    """Cell runs in the sweep's MLflow store, as the jobs leave them: created under the
    group's parent run (tags, params), a few loss points, FINISHED. Plain client calls:
    `CellRunLogger` would also look for an earlier run of the cell first (the same end
    state, three times slower to build)."""

    def __init__(self, spec: Any, sweep: Any, cells: list[Any]) -> None:
        from mlflow import MlflowClient

        from orchestrator.tracking import config as tracking_config
        from orchestrator.tracking import store as tracking

        self.cfg = sweep.tracking_config()
        self.exp_id = tracking.prepare_store(self.cfg, sweep.path)
        # what submit does before fan-out
        self.parents = tracking.ensure_group_runs(self.cfg, sweep.path, {c.group_id: c.group_tags(spec.name) for c in cells})
        self.uid = tracking.sweep_uid(sweep.path)
        self.client = MlflowClient(tracking_config.resolve_uri(self.cfg, sweep.path))
        self.name = spec.name

    def log(self, cell: Any) -> dict[str, Any]:
        from mlflow.entities import Metric, Param

        from orchestrator.tracking import config as tracking_config

        parent = self.parents[cell.group_id]
        tags = {**cell.tags(self.name), tracking_config.TAG_CELL: cell.cell_id, tracking_config.TAG_SWEEP_UID: self.uid,
                "aullm.attempt": "1", tracking_config.TAG_PARENT: parent}  # fmt: skip
        run_id = self.client.create_run(self.exp_id, tags=tags, run_name=cell.cell_id).info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cell.params().items()],
                              metrics=[Metric("train_loss", 1.0 / (e + 1), now, e) for e in (0, EPOCHS - 1)])  # fmt: skip
        self.client.set_terminated(run_id, "FINISHED")
        return {"run_id": run_id, "parent_run_id": parent}


def fake_submission(sweep_file: Path, *, which: str, cell_runs: bool) -> tuple[Path, int]:
    """Manifest, one submission record and results (and their MLflow runs), as after a real submit.

    which='half': results for every other cell (first call); 'rest': for the others."""
    from orchestrator.sweep.cells import pack
    from orchestrator.launch.prepare import prepare
    from orchestrator.ledger import SweepDir

    spec, _subjects, cells = prepare(str(sweep_file))
    sweep = SweepDir(spec.output_dir)
    if which == "half":
        sweep.write_manifest(spec, cells)
        tasks = pack(cells, spec.resources.cells_per_task)
        half = len(tasks) // 2
        for array_id, chunk in (("900001", tasks[:half]), ("900002", tasks[half:])):
            sweep.record_submission({"executor": "slurm", "array_job_id": array_id,
                                     "tasks": {str(i): [c.cell_id for c in t] for i, t in enumerate(chunk)},
                                     "submitted_at": time.time()})
    runs = CellRuns(spec, sweep, cells) if cell_runs else None
    subjects = fold_subjects(cells)
    now = time.time()
    written = 0
    for i, cell in enumerate(cells):
        if (i % 2 == 0) == (which == "half"):
            payload = result_payload(cell, subjects, now)
            if runs is not None:
                payload["mlflow"] = runs.log(cell)
            sweep.write_result(cell.cell_id, payload)
            written += 1
    return sweep.path, written


def timed_runs(label: str, args: list[str], envs: dict[str, tuple[dict[str, str], Path]], repeat: int,
               first_apart: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run one command `repeat` times for each code version (interleaved); print the figures."""
    walls: dict[str, list[float]] = {name: [] for name in envs}
    firsts: dict[str, float] = {}
    calls_seen: dict[str, list[str]] = {}
    out_seen: dict[str, str] = {}
    for round_ in range(repeat + (1 if first_apart else 0)):
        for name, (env, cwd) in envs.items():
            wall, calls, out = run_counted(args, env, cwd)
            if first_apart and round_ == 0:
                firsts[name] = wall
            else:
                walls[name].append(wall)
            calls_seen[name], out_seen[name] = calls, out
    for name in envs:
        w = walls[name]
        first = f"first {firsts[name]:.2f} s, then " if name in firsts else ""
        print(f"  {label} [{name}]: {first}median {statistics.median(w):.2f} s (fastest {min(w):.2f}, "
              f"{len(w)} runs); {len(calls_seen[name])} scheduler calls ({', '.join(calls_seen[name]) or 'none'})")
    if "baseline" in envs:
        ratio = statistics.median(walls["baseline"]) / statistics.median(walls["this"])
        print(f"  {label}: baseline / this = {ratio:.1f}x")
    return {"median": statistics.median(walls["this"]), "out": out_seen["this"], "calls": calls_seen["this"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each command (default 5)")
    parser.add_argument("--baseline", type=Path, help="a checkout of another revision to time side by side")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-cell-runs", action="store_true", help="no MLflow cell runs in the store (saves ~5 min)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "AULLM_DATA": str(work / "data"),
                "AULLM_MODELS": str(work / "models"), "PYTHONPYCACHEPREFIX": str(work / "pycache")}  # fmt: skip
    base_env.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.update({k: base_env[k] for k in ("HF_HUB_OFFLINE", "AULLM_DATA", "AULLM_MODELS")})
    envs: dict[str, tuple[dict[str, str], Path]] = {"this": ({**base_env, "PYTHONPATH": str(REPO)}, REPO)}
    if args.baseline:
        envs["baseline"] = ({**base_env, "PYTHONPATH": str(args.baseline.resolve())}, args.baseline.resolve())
    t0 = time.perf_counter()
    sweep_file = build(work)
    warm = "import orchestrator.cli, orchestrator.state.status, orchestrator.sweep.spec, orchestrator.launch.submit, orchestrator.results.collect"
    for env, cwd in envs.values():  # compile every module once into the bytecode cache
        subprocess.run([sys.executable, "-c", warm + ", orchestrator.results.tables, orchestrator.results.summary_runs"],
                       env=env, cwd=cwd, check=True)  # fmt: skip
    load = os.getloadavg()
    print(f"built synthetic sheets and model folders in {time.perf_counter() - t0:.1f} s ({work}); "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    dry = timed_runs("submit --dry-run", ["submit", str(sweep_file), "--dry-run", "--json"], envs, args.repeat)
    plan = json.loads(dry["out"])
    print(f"  ({plan['cells']} cells, {plan['tasks']} tasks in {len(plan['arrays'])} arrays)")

    t0 = time.perf_counter()
    sweep_dir, written = fake_submission(sweep_file, which="half", cell_runs=not args.no_cell_runs)
    size = sum(p.stat().st_size for p in (sweep_dir / "results").iterdir()) / written / 1e3
    runs = "" if args.no_cell_runs else " and their MLflow cell runs"
    print(f"half done: manifest, 2 arrays and {written} result files ({size:.0f} kB each){runs} written in "
          f"{time.perf_counter() - t0:.1f} s")
    st = timed_runs("status --json", ["status", str(sweep_file), "--json"], envs, args.repeat, first_apart=True)
    summary = json.loads(st["out"])
    print(f"  ({summary['cells']} cells, counts {({k: v for k, v in summary['counts'].items() if v})})")
    timed_runs("status (text)", ["status", str(sweep_file)], envs, args.repeat)

    t0 = time.perf_counter()
    _, written = fake_submission(sweep_file, which="rest", cell_runs=not args.no_cell_runs)
    print(f"all done: {written} more result files{runs} written in {time.perf_counter() - t0:.1f} s")
    st = timed_runs("status --json", ["status", str(sweep_file), "--json"], envs, args.repeat, first_apart=True)
    summary = json.loads(st["out"])
    print(f"  ({summary['cells']} cells, counts {({k: v for k, v in summary['counts'].items() if v})}); "
          f"this version's {summary.get('cost', {}).get('spent_hours', '?')} {summary.get('cost', {}).get('unit', '')} spent")
    collect_repeat = max(1, min(args.repeat, 3))
    timed_runs("collect --no-mlflow", ["collect", str(sweep_file), "--no-mlflow"], envs, collect_repeat)
    # MLflow summary runs: the first collect fills the parents submit made (metrics, tags,
    # artifacts) and attaches the cell runs, later ones update them; timed for this version
    # only (a baseline run would find the work done).
    col = timed_runs("collect (MLflow summary runs)", ["collect", str(sweep_file)], {"this": envs["this"]},
                     collect_repeat, first_apart=True)  # fmt: skip
    last = col["out"].strip().splitlines()[-1]
    print(f"  ({last[last.find('MLflow'):]})")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
