"""Laptop mode: run a sweep's tasks on this machine, at most N at a time, then collect.

Started detached by `aullm-grid submit` for executor `local`. Each task runs through
submitit's LocalExecutor exactly as an array task would on Slurm (same pickled call,
same `jobs.run_cells.run_task`), so local and Slurm results are the same cells.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def supervise(sweep_dir: Path, batch_file: Path) -> int:
    import submitit

    from jobs.run_cells import run_task

    batch = json.loads(batch_file.read_text())
    tasks: list[list[str]] = batch["tasks"]
    workers = max(1, int(batch.get("workers") or 1))
    processes = max(1, int(batch.get("processes_per_task") or 1))
    folder = sweep_dir / "jobs" / batch_file.stem
    # pickled callables are code: owner only, like `jobs/` itself
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local")
    # The local executor kills a job at timeout_min; a laptop sweep has no time limit.
    # With several processes per task it starts them all, as srun does on Slurm.
    executor.update_parameters(timeout_min=7 * 24 * 60, tasks_per_node=processes)
    pending = list(enumerate(tasks))
    running: list[tuple[int, object]] = []
    failures = 0
    while pending or running:
        while pending and len(running) < workers:
            index, cell_ids = pending.pop(0)
            running.append((index, executor.submit(run_task, str(sweep_dir), cell_ids)))
            print(f"task {index}: started ({len(cell_ids)} cells)", flush=True)
        time.sleep(0.5)
        still = []
        for index, job in running:
            if job.done():
                try:
                    # one result per process; every rank returns the same outcomes, rank 0's is read
                    outcomes = job.results()[0]
                    print(f"task {index}: {outcomes}", flush=True)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other tasks
                    failures += 1
                    print(f"task {index}: crashed: {exc}", flush=True)
            else:
                still.append((index, job))
        running = still
    from orchestrator.results.collect import collect_job

    try:
        collect_job(str(sweep_dir))
    except Exception as exc:  # noqa: BLE001
        print(f"collect failed: {exc}", flush=True)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(supervise(Path(sys.argv[1]), Path(sys.argv[2])))
