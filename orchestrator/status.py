"""Where every cell stands: result files joined with one batched scheduler query.

A cell's state comes from, in order: its result file (done / failed, durable), then
the scheduler's view of the task that holds it (pending / running / preempted /
timeout / cancelled / failed). A task that ended without writing its cells' results
(SIGKILL, OOM, node failure) leaves those cells failed with the scheduler's reason,
whatever MLflow still says. Imports neither torch nor mlflow: it answers in a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.ledger import SweepDir
from orchestrator.scheduler import SchedulerError, TaskState

# sacct lags a fresh submission (about a second on an idle controller, longer on a busy
# one): a task it does not know yet is pending for this long, after which "unknown" means
# the accounting lost it (purged, another cluster) and its cells need a retry.
ACCOUNTING_GRACE_S = 600.0

CELL_STATES = ("done", "running", "pending", "preempted", "timeout", "failed", "cancelled", "not_submitted")
# States after which a cell needs `aullm-grid retry` (or a re-submit) to finish.
NEEDS_RETRY = frozenset({"failed", "timeout", "cancelled", "preempted"})


@dataclass(frozen=True)
class TaskRecord:
    """One task of one submission: which scheduler id runs which cells."""

    job_id: str  # Slurm "<array>_<index>", or "local:<batch>:<index>"
    executor: str
    cell_ids: tuple[str, ...]
    submitted_at: float
    log_path: str | None


@dataclass
class CellStatus:
    cell_id: str
    group: str
    state: str
    reason: str = ""
    job_id: str | None = None
    log_path: str | None = None


def task_records(sweep: SweepDir) -> list[TaskRecord]:
    records = []
    for sub in sweep.submissions():
        if "tasks" not in sub:
            continue  # collector jobs
        for index, cell_ids in sub["tasks"].items():
            if sub["executor"] == "slurm":
                # a one-task batch is a plain job: its recorded id has no "_<index>"
                job_id = str((sub.get("job_ids") or {}).get(index) or f"{sub['array_job_id']}_{index}")
                log = sweep.path / "jobs" / job_id / f"{job_id}_0_log.out"
            else:
                job_id = f"local:{sub['batch_id']}:{index}"
                log = sweep.path / "logs" / f"{sub['batch_id']}.supervisor.log"
            records.append(TaskRecord(job_id, sub["executor"], tuple(cell_ids), sub.get("submitted_at", 0.0), str(log)))
    return records


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def is_fresh(record: TaskRecord, now: float | None = None) -> bool:
    """Submitted so recently that the scheduler's accounting may not list it yet."""
    return (time.time() if now is None else now) - record.submitted_at < ACCOUNTING_GRACE_S


def task_states(sweep: SweepDir) -> dict[TaskRecord, TaskState]:
    """The scheduler's view of every task of the sweep: ONE sacct call for all Slurm arrays."""
    from orchestrator.scheduler import query_states

    records = task_records(sweep)
    slurm_arrays = sorted({r.job_id.split("_")[0] for r in records if r.executor == "slurm"})
    slurm_states = query_states(slurm_arrays) if slurm_arrays else {}
    local_alive = {
        sub["batch_id"]: pid_alive(int(sub["supervisor_pid"]))
        for sub in sweep.submissions()
        if sub.get("executor") == "local" and sub.get("host", os.uname().nodename) == os.uname().nodename
    }
    out: dict[TaskRecord, TaskState] = {}
    for r in records:
        if r.executor == "slurm":
            out[r] = slurm_states.get(r.job_id, TaskState(r.job_id, "", "unknown"))
        else:
            batch = r.job_id.split(":")[1]
            alive = local_alive.get(batch, False)
            out[r] = TaskState(r.job_id, "RUNNING" if alive else "ENDED", "running" if alive else "completed")
    return out


def cell_statuses(sweep: SweepDir, states: dict[TaskRecord, TaskState] | None = None) -> list[CellStatus]:
    manifest = sweep.read_manifest()
    if states is None:
        states = task_states(sweep)
    # the newest task holding a cell speaks for it
    latest: dict[str, tuple[TaskRecord, TaskState]] = {}
    for record, state in sorted(states.items(), key=lambda kv: kv[0].submitted_at):
        for cid in record.cell_ids:
            latest[cid] = (record, state)
    results = sweep.result_summaries()  # {cell_id: {"status":..., "error":..., "finished_at":...}}
    running_now = sweep.running_markers()  # {cell_id: marker}
    out = []
    for cell in manifest["cells"]:
        cid = cell["cell_id"]
        group = cell["group"]
        res = results.get(cid)
        rec_state = latest.get(cid)
        if res is not None and res.get("status") == "done":
            out.append(CellStatus(cid, group, "done", job_id=_job(rec_state)))
            continue
        if rec_state is None:
            state = "failed" if res is not None else "not_submitted"
            out.append(CellStatus(cid, group, state, reason=(res or {}).get("error", "")))
            continue
        record, ts = rec_state
        live = ts.state in ("pending", "running")
        if res is not None and not (live and record.submitted_at > res.get("finished_at", 0)):
            out.append(CellStatus(cid, group, "failed", res.get("error", ""), record.job_id, record.log_path))
        elif ts.state == "running":
            state = "running" if (record.executor == "slurm" or cid in running_now) else "pending"
            out.append(CellStatus(cid, group, state, job_id=record.job_id, log_path=record.log_path))
        elif ts.state == "pending":
            out.append(CellStatus(cid, group, "pending", ts.reason if ts.reason not in ("None", "") else "", record.job_id, record.log_path))
        elif ts.state in ("preempted", "timeout", "cancelled"):
            out.append(CellStatus(cid, group, ts.state, ts.slurm_state, record.job_id, record.log_path))
        elif ts.state == "unknown":
            if is_fresh(record):
                out.append(CellStatus(cid, group, "pending", "not yet in accounting", record.job_id, record.log_path))
            else:
                reason = f"the scheduler has no record of job {record.job_id} (purged from accounting?)"
                out.append(CellStatus(cid, group, "failed", reason, record.job_id, record.log_path))
        else:  # completed or failed without a result file: the task died under this cell
            reason = ts.slurm_state if ts.state == "failed" else "task ended without writing this cell's result"
            if ts.exit_code and ts.exit_code != "0:0":
                reason += f" (exit {ts.exit_code})"
            out.append(CellStatus(cid, group, "failed", reason, record.job_id, record.log_path))
    return out


def _job(rec_state: tuple[TaskRecord, TaskState] | None) -> str | None:
    return rec_state[0].job_id if rec_state else None


def summarize(statuses: list[CellStatus]) -> dict[str, Any]:
    groups: dict[str, Counter] = defaultdict(Counter)
    for s in statuses:
        groups[s.group][s.state] += 1
    total = Counter(s.state for s in statuses)
    return {
        "cells": len(statuses),
        "counts": {k: total.get(k, 0) for k in CELL_STATES},
        "groups": {g: {k: c.get(k, 0) for k in CELL_STATES if c.get(k, 0)} for g, c in sorted(groups.items())},
        "failed": [asdict(s) for s in statuses if s.state in NEEDS_RETRY],
        "all_done": bool(statuses) and total.get("done", 0) == len(statuses),
    }


def render(summary: dict[str, Any], sweep_path: Path) -> None:
    from rich.console import Console
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    console = Console()
    n, counts = summary["cells"], summary["counts"]
    table = Table(title=f"{sweep_path}", title_justify="left")
    table.add_column("group (dataset/llm/variant/seed)")
    shown = [k for k in CELL_STATES if counts.get(k)]
    for k in shown:
        table.add_column(k, justify="right")
    for group, c in summary["groups"].items():
        table.add_row(group, *[str(c.get(k, "")) for k in shown])
    console.print(table)
    console.print(ProgressBar(total=max(n, 1), completed=counts.get("done", 0), width=50))
    console.print(" ".join(f"{k}={counts[k]}" for k in shown) + f"  ({counts.get('done', 0)}/{n} done)")
    for f in summary["failed"][:50]:
        console.print(f"[red]{f['state']}[/red] {f['cell_id']}: {f['reason']}  log: {f['log_path']}")
    if len(summary["failed"]) > 50:
        console.print(f"... and {len(summary['failed']) - 50} more (use --json)")


def _submitted_sweeps_here() -> list[str]:
    """Without a SWEEP argument: every sweeps/*.yaml of this folder that was submitted."""
    from aullm.errors import UserInputError
    from orchestrator.spec import load_sweep

    found = []
    for path in sorted(Path("sweeps").glob("*.yaml")):
        try:
            if SweepDir(load_sweep(path).output_dir).has_manifest():
                found.append(str(path))
        except UserInputError:
            continue
    return found


def status_main(args: Any) -> int:
    from aullm.errors import UserInputError
    from orchestrator.spec import load_sweep

    if args.sweep is None:
        sweeps = _submitted_sweeps_here()
        if not sweeps:
            raise UserInputError("no SWEEP given and no submitted sweep under ./sweeps; name a sweep file")
        code = 0
        for path in sweeps:
            args.sweep = path
            code = max(code, status_main(args))
        return code
    spec = load_sweep(args.sweep)
    sweep = SweepDir(spec.output_dir)
    if not sweep.has_manifest():
        raise UserInputError(f"{args.sweep}: not submitted yet (no manifest in {sweep.path})")
    interval = getattr(args, "watch", None)
    while True:
        try:
            summary = summarize(cell_statuses(sweep))
        except SchedulerError as exc:
            print(f"aullm-grid: error: cannot ask the scheduler: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            if interval:
                print("\033[2J\033[H", end="")
            render(summary, sweep.path)
        if not interval or summary["all_done"]:
            return 0
        time.sleep(float(interval))
