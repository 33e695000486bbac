"""Where every cell stands: result files joined with one batched scheduler query.

A cell's state comes from, in order: its result file (done / failed, durable), then
the scheduler's view of the task that holds it (pending / running / preempted /
timeout / cancelled / failed). A task that ended without writing its cells' results
(SIGKILL, OOM, node failure) leaves those cells failed with the scheduler's reason,
whatever MLflow still says. Imports neither torch nor mlflow: it answers in a second.

A refresh of a 10,000-cell sweep costs one sacct call, one listing and one stat per
result file; the sweep directory's index/ caches (orchestrator.ledger) spare it the
parsing of the manifest, the result files and the sweep file, each checked against what
it summarises. `cost_report` turns the measured cell times into hours spent and left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.ledger import SweepDir, write_cache_json
from orchestrator.sweep.paths import UnsetVariable, anchored_path, env_names
from orchestrator.sweep.profiles import gres_gpu_count
from orchestrator.state.scheduler import SchedulerError, TaskState

logger = logging.getLogger(__name__)

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
    root = os.fspath(sweep.path)
    for sub in sweep.submissions():
        if "tasks" not in sub:
            continue  # collector jobs
        for index, cell_ids in sub["tasks"].items():
            if sub["executor"] == "slurm":
                # a one-task batch is a plain job: its recorded id has no "_<index>"
                job_id = str((sub.get("job_ids") or {}).get(index) or f"{sub['array_job_id']}_{index}")
                log = os.path.join(root, "jobs", job_id, f"{job_id}_0_log.out")
            else:
                job_id = f"local:{sub['batch_id']}:{index}"
                log = os.path.join(root, "logs", f"{sub['batch_id']}.supervisor.log")
            records.append(TaskRecord(job_id, sub["executor"], tuple(cell_ids), sub.get("submitted_at", 0.0), log))
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
    from orchestrator.state.scheduler import query_states

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


def cell_statuses(
    sweep: SweepDir, states: dict[TaskRecord, TaskState] | None = None, *, update_index: bool = False
) -> list[CellStatus]:
    """Every cell's status. `update_index`: refresh the sweep directory's index caches
    (commands that write to the sweep directory anyway: status, collect)."""
    return _statuses_and_results(sweep, states, update_index=update_index)[0]


def _statuses_and_results(
    sweep: SweepDir, states: dict[TaskRecord, TaskState] | None = None, *, update_index: bool = False
) -> tuple[list[CellStatus], dict[str, dict[str, Any]]]:
    """Every cell's status, and the result summaries they were read from. `update_index`:
    refresh the sweep directory's index caches (the `status` command; see ledger)."""
    index = sweep.cell_index(update_index=update_index)
    if states is None:
        states = task_states(sweep)
    # the newest task holding a cell speaks for it
    latest: dict[str, tuple[TaskRecord, TaskState]] = {}
    for record, state in sorted(states.items(), key=lambda kv: kv[0].submitted_at):
        for cid in record.cell_ids:
            latest[cid] = (record, state)
    results = sweep.result_summaries(update_index=update_index)  # {cell_id: {"status":..., "error":...}}
    running_now = sweep.running_markers()  # {cell_id: marker}
    dead_cache: dict[str, str] = {}  # the cells of one task read its log once
    out = []
    for cid, group in zip(index.cell_ids, index.groups):
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
            if record.executor == "slurm" and record.log_path:
                reason += first_dead_process(record.log_path, dead_cache)
            out.append(CellStatus(cid, group, "failed", reason, record.job_id, record.log_path))
    return out, results


# What srun prints in the task's log (rank 0's, where sbatch's own output goes) when one of its
# processes ends badly: "srun: error: <node>: task 1: Exited with exit code 3", "...: tasks
# 0-1: Killed". The first such line is the process that took the task down (with
# --kill-on-bad-exit the others are then killed, and said so after it).
_SRUN_TASK_ERROR = re.compile(r"^srun: error: \S+: tasks? ([0-9,-]+): (.+)$", re.MULTILINE)
_LOG_TAIL_BYTES = 64 * 1024


def first_dead_process(log_path: str, cache: dict[str, str] | None = None) -> str:
    """What a failed cell's reason adds for a multi-process Slurm task one of whose processes
    died first ("; process 1: Exited with exit code 3"), from srun's own line in the task's
    log; "" when there is none (one process, a log already gone, a task killed whole)."""
    if cache is not None and log_path in cache:
        return cache[log_path]
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        tail = ""
    match = _SRUN_TASK_ERROR.search(tail)
    note = ""
    if match:
        ranks, what = match.groups()
        note = f"; process{'es' if any(c in ranks for c in ',-') else ''} {ranks}: {what.strip()}"
    if cache is not None:
        cache[log_path] = note
    return note


def _job(rec_state: tuple[TaskRecord, TaskState] | None) -> str | None:
    return rec_state[0].job_id if rec_state else None


# --------------------------------------------------------------------------- cost report

# The units a task is charged in: GPUs when it holds any, else CPU cores.
_GPU, _CPU = "GPU", "CPU"


def devices_per_task(resources: Mapping[str, Any]) -> tuple[int, str]:
    """(devices one array task holds, their kind): GPUs from `gpus_per_node` or `gres`
    (gpu:h100:2 -> 2), else the task's CPU cores, `cpus_per_task` for each of its
    `processes_per_task` (the local executor, the dev cluster). A task's processes train
    the same cell together (data parallel), so a cell's wall time holds all of them."""
    gpus = resources.get("gpus_per_node") or gres_gpu_count(resources.get("gres"))
    if gpus:
        return int(gpus), _GPU
    return int(resources.get("cpus_per_task") or 1) * int(resources.get("processes_per_task") or 1), _CPU


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def measured_seconds(summary: Mapping[str, Any]) -> float | None:
    """A finished cell's wall time in its task: started_at -> finished_at of its result
    (training, prediction, its data split and MLflow calls), else the trainer's own
    `timing.cell_seconds`; None when the result carries neither (failed cells)."""
    start, end = _number(summary.get("started_at")), _number(summary.get("finished_at"))
    if start is not None and end is not None and end >= start:
        return end - start
    seconds = _number(summary.get("cell_seconds"))
    return seconds if seconds is not None and seconds >= 0 else None


def cost_report(
    statuses: Sequence[CellStatus], results: Mapping[str, Mapping[str, Any]], resources: Mapping[str, Any]
) -> dict[str, Any]:
    """Device-hours spent so far and an estimate of what the cells not done yet will take.

    Spent: the measured wall time of every done cell x the devices of its task. Left: each
    cell not done (pending, running, failed, ...) at the mean measured time of the done
    cells of its group (dataset/llm/variant); a group with none yet borrows the mean of
    its LLM and variant over all datasets, then of the whole sweep. Task start-up (imports,
    model load) is shared by a task's cells and not in the cell times, so both figures
    are lower bounds of what the scheduler bills.
    """
    devices, kind = devices_per_task(resources)
    by_group: dict[str, list[float]] = defaultdict(list)
    by_llm_variant: dict[str, list[float]] = defaultdict(list)
    measured: list[float] = []
    for st in statuses:
        if st.state != "done":
            continue
        seconds = measured_seconds(results.get(st.cell_id) or {})
        if seconds is None:
            continue
        by_group[st.group].append(seconds)
        by_llm_variant[_llm_variant(st.group)].append(seconds)
        measured.append(seconds)
    group_mean = {g: sum(v) / len(v) for g, v in by_group.items()}
    llm_variant_mean = {g: sum(v) / len(v) for g, v in by_llm_variant.items()}
    sweep_mean = sum(measured) / len(measured) if measured else None
    left_s = 0.0
    sources: Counter[str] = Counter()
    left = [st for st in statuses if st.state != "done"]
    for st in left:
        if st.group in group_mean:
            left_s += group_mean[st.group]
            sources["group"] += 1
        elif _llm_variant(st.group) in llm_variant_mean:
            left_s += llm_variant_mean[_llm_variant(st.group)]
            sources["llm_variant"] += 1
        elif sweep_mean is not None:
            left_s += sweep_mean
            sources["sweep"] += 1
    unit = f"{kind}-hours"
    return {
        "unit": unit,
        "devices_per_task": devices,
        "spent_hours": round(sum(measured) * devices / 3600, 4),
        "measured_cells": len(measured),
        "mean_cell_seconds": round(sweep_mean, 2) if sweep_mean is not None else None,
        "remaining_cells": len(left),
        # None: nothing finished yet to estimate from
        "remaining_hours": round(left_s * devices / 3600, 4) if (sweep_mean is not None or not left) else None,
        "estimated_from": {k: sources.get(k, 0) for k in ("group", "llm_variant", "sweep")},
    }


def _llm_variant(group: str) -> str:
    """'casme2/qwen2-1.5b/all' -> 'qwen2-1.5b/all'."""
    return group.split("/", 1)[-1]


def cost_line(cost: Mapping[str, Any]) -> str:
    """The cost report as one line of text."""
    unit, devices = cost["unit"], cost["devices_per_task"]
    kind = unit.split("-")[0]
    spent = (f"cost: {cost['spent_hours']:.2f} {unit} spent on {cost['measured_cells']} measured cells "
             f"({devices} {kind}{'s' if devices != 1 else ''} per task)")  # fmt: skip
    if not cost["remaining_cells"]:
        return spent + "; nothing left"
    if cost["remaining_hours"] is None:
        return spent + f"; {cost['remaining_cells']} cells left, no finished cell yet to estimate them from"
    src = cost["estimated_from"]
    how = ", ".join(f"{n} from {label}" for label, n in (("their group", src["group"]),
                    ("their LLM/variant", src["llm_variant"]), ("the sweep mean", src["sweep"])) if n)  # fmt: skip
    return spent + f"; about {cost['remaining_hours']:.2f} {unit} left for {cost['remaining_cells']} cells ({how})"


def summarize(statuses: list[CellStatus], cost: dict[str, Any] | None = None) -> dict[str, Any]:
    groups: dict[str, Counter] = defaultdict(Counter)
    for s in statuses:
        groups[s.group][s.state] += 1
    total = Counter(s.state for s in statuses)
    summary = {
        "cells": len(statuses),
        "counts": {k: total.get(k, 0) for k in CELL_STATES},
        "groups": {g: {k: c.get(k, 0) for k in CELL_STATES if c.get(k, 0)} for g, c in sorted(groups.items())},
        # vars(), not dataclasses.asdict: asdict deep-copies every field (0.2 s for 5,000 cells)
        "failed": [dict(vars(s)) for s in statuses if s.state in NEEDS_RETRY],
        "all_done": bool(statuses) and total.get("done", 0) == len(statuses),
    }
    if cost is not None:
        summary["cost"] = cost
    return summary


def group_progress(statuses: Sequence[CellStatus], progress: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: done, running, pending, failed (needs a retry) and not_submitted counts, and
    the slowest running cell's epoch of N, from the progress files. A running cell without
    one has not reached its first epoch: on Slurm every cell of a running task counts as
    running, also those waiting behind the cell it trains, so such cells are the slowest
    only when no cell of the group has progress yet (shown as "starting")."""
    out: dict[str, dict[str, Any]] = {}
    for st in statuses:
        row = out.setdefault(st.group, {"done": 0, "running": 0, "pending": 0, "failed": 0, "not_submitted": 0,
                                        "slowest": None})  # fmt: skip
        kind = "failed" if st.state in NEEDS_RETRY else st.state
        row[kind] = row.get(kind, 0) + 1
        if st.state != "running":
            continue
        p = progress.get(st.cell_id) or {}
        epoch, epochs = _int(p.get("epoch"), 0), _int(p.get("epochs"), 0)
        rank = (0, epoch / epochs) if epochs else (1, 0.0)  # cells with progress first
        slowest = row["slowest"]
        if slowest is None or rank < slowest["rank"]:
            row["slowest"] = {"cell_id": st.cell_id, "epoch": epoch, "epochs": epochs or None, "rank": rank}
    for row in out.values():
        if row["slowest"] is not None:
            row["slowest"].pop("rank")
    return dict(sorted(out.items()))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def estimate_eta(
    statuses: Sequence[CellStatus],
    results: Mapping[str, Mapping[str, Any]],
    progress: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Wall-clock time until every pending and running cell is done.

    Each cell still to run costs the mean measured time of its group's done cells (the
    sweep's mean where its group has none yet); a running cell costs the part of it that its
    progress file says is left (epoch e of N: (1 - e/N) of the mean). The sum is shared by
    the tasks running now (distinct jobs of the running cells, at least one): tasks run
    their cells one after the other, and side by side with each other. Failed and never
    submitted cells wait for the user and are not counted. `seconds` is None while no
    cell has finished to measure."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for st in statuses:
        if st.state == "done" and (seconds := measured_seconds(results.get(st.cell_id) or {})) is not None:
            by_group[st.group].append(seconds)
    all_times = [t for ts in by_group.values() for t in ts]
    sweep_mean = sum(all_times) / len(all_times) if all_times else None
    left_s, cells_left, unknown = 0.0, 0, False
    tasks = {st.job_id or st.cell_id for st in statuses if st.state == "running"}
    for st in statuses:
        if st.state not in ("running", "pending"):
            continue
        cells_left += 1
        times = by_group.get(st.group)
        mean = sum(times) / len(times) if times else sweep_mean
        if mean is None:
            unknown = True
            continue
        share = 1.0
        if st.state == "running":
            p = progress.get(st.cell_id) or {}
            epoch, epochs = _int(p.get("epoch"), 0), _int(p.get("epochs"), 0)
            share = max(0.0, 1.0 - epoch / epochs) if epochs else 1.0
        left_s += mean * share
    parallel = max(1, len(tasks))
    seconds = None if (unknown or (cells_left and sweep_mean is None)) else left_s / parallel
    return {"seconds": round(seconds, 1) if seconds is not None else None, "parallel_tasks": parallel,
            "cells_left": cells_left, "mean_cell_seconds": round(sweep_mean, 2) if sweep_mean is not None else None}  # fmt: skip


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no cell finished yet)"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def sweep_summary(sweep: SweepDir, *, cells: bool = False) -> dict[str, Any]:
    """One status refresh: `summarize` of every cell, with the cost report, per-group
    progress and the ETA; `cells`: every cell's state too (``status --json``)."""
    statuses, results = _statuses_and_results(sweep, update_index=True)
    summary = summarize(statuses, cost_report(statuses, results, sweep.cell_index().resources))
    progress = sweep.read_progress(st.cell_id for st in statuses if st.state == "running")
    summary["group_progress"] = group_progress(statuses, progress)
    summary["eta"] = estimate_eta(statuses, results, progress)
    _point_at_task_logs(sweep, summary["failed"][:50])
    if cells:
        summary["cell_states"] = [
            {**vars(st), **{k: progress[st.cell_id].get(k) for k in ("epoch", "epochs", "elapsed_s")}}
            if st.cell_id in progress else dict(vars(st)) for st in statuses
        ]  # fmt: skip
    return summary


def _point_at_task_logs(sweep: SweepDir, failed: list[dict[str, Any]]) -> None:
    """A local task's cells share the supervisor's log, which holds no cell's traceback:
    name the task log that ran the cell instead, where there is one (each log read once)."""
    local = {f["cell_id"]: f for f in failed if str(f.get("job_id") or "").startswith("local:")}
    if not local:
        return
    batches = {str(f["job_id"]).split(":")[1] for f in local.values()}
    for cid, path in _task_logs_naming(sweep, batches, set(local)).items():
        local[cid]["log_path"] = str(path)


def _task_logs_naming(sweep: SweepDir, batches: set[str], cell_ids: set[str]) -> dict[str, Path]:
    """cell id -> the newest task log of these local batches that mentions the cell."""
    found: dict[str, Path] = {}
    for batch in sorted(batches):
        logs = sorted((sweep.path / "jobs" / batch).glob("*/*_log.out"), key=lambda p: p.stat().st_mtime)
        for log in logs:
            try:
                text = log.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for cid in cell_ids:
                if f"cell {cid} " in text:
                    found[cid] = log
    return found


def next_steps(summary: Mapping[str, Any], sweep_arg: str) -> list[str]:
    """The commands worth running next, given where the sweep stands."""
    import shlex

    arg = shlex.quote(str(sweep_arg))
    counts = summary["counts"]
    steps = []
    if summary["failed"]:
        steps.append(f"aullm-grid retry {arg} --failed")
        steps += [f"aullm-grid logs {arg} {f['cell_id']}" for f in summary["failed"][:3]]
    if counts.get("running") or counts.get("pending"):
        steps.append(f"aullm-grid status {arg} --watch")
    elif summary["all_done"]:
        steps.append(f"aullm-grid collect {arg}")
    elif counts.get("not_submitted"):
        steps.append(f"aullm-grid submit {arg}")
    return steps


def _epoch_text(cell: Mapping[str, Any]) -> str:
    # no progress file yet: the task is loading its data and model
    return f"epoch {cell['epoch']} of {cell['epochs']}" if cell.get("epochs") else "starting"


def progress_line(summary: Mapping[str, Any]) -> str:
    """The sweep in one line (what `--watch` prints when the output is not a terminal)."""
    n, counts = summary["cells"], summary["counts"]
    failed = sum(counts.get(k, 0) for k in NEEDS_RETRY)
    slow = [(g, r["slowest"]) for g, r in summary.get("group_progress", {}).items() if r.get("slowest")]
    running = f"{counts.get('running', 0)} running"
    if slow:
        group, cell = min(slow, key=lambda gc: (gc[1]["epoch"] / gc[1]["epochs"]) if gc[1]["epochs"] else 0.0)
        running += f" (slowest {group}: {_epoch_text(cell)})"
    eta = summary.get("eta") or {}
    tail = "" if summary["all_done"] else f"; ETA {format_duration(eta.get('seconds'))}"
    return (f"{time.strftime('%H:%M:%S')} {counts.get('done', 0)}/{n} done, {running}, "
            f"{counts.get('pending', 0)} pending, {failed} failed{tail}")  # fmt: skip


def status_renderable(summary: dict[str, Any], sweep_path: Path, sweep_arg: str | None = None) -> Any:
    """The status as one rich renderable (printed once, or refreshed by `--watch`)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    n, counts = summary["cells"], summary["counts"]
    table = Table(title=f"{sweep_path}", title_justify="left")
    table.add_column("group (dataset/llm/variant)")
    rows = summary.get("group_progress") or {}
    cols = ["done", "running", "pending", "failed"] + (["not_submitted"] if counts.get("not_submitted") else [])
    for k in cols:
        table.add_column(k.replace("_", " "), justify="right")
    table.add_column("slowest running")
    for group, r in rows.items():
        slow = r.get("slowest")
        where = _epoch_text(slow) if slow else ""
        table.add_row(escape(group), *[str(r.get(k, 0) or "") for k in cols], where)
    bar = Table.grid()  # alone, a ProgressBar ends no line inside a Group
    bar.add_row(ProgressBar(total=max(n, 1), completed=counts.get("done", 0), width=50))
    parts: list[Any] = [table, bar]
    shown = [k for k in CELL_STATES if counts.get(k)]
    eta = summary.get("eta") or {}
    line = " ".join(f"{k}={counts[k]}" for k in shown) + f"  ({counts.get('done', 0)}/{n} done)"
    if not summary["all_done"] and eta.get("cells_left"):
        line += (f"; ETA {format_duration(eta.get('seconds'))} ({eta['cells_left']} cells left, "
                 f"{eta['parallel_tasks']} task{'s' if eta['parallel_tasks'] != 1 else ''} running)")  # fmt: skip
    parts.append(Text(line))
    if summary.get("cost"):
        parts.append(Text(cost_line(summary["cost"])))
    for f in summary["failed"][:50]:
        # one line per cell whatever the terminal's width, and the reason verbatim: DeepSpeed's
        # and pydantic's messages hold [brackets] that rich would take for markup
        parts.append(Text.assemble((f["state"], "red"), f" {f['cell_id']}: {f['reason']}  log: {f['log_path']}"))
    if len(summary["failed"]) > 50:
        parts.append(Text(f"... and {len(summary['failed']) - 50} more (use --json)"))
    if sweep_arg is not None:
        parts += [Text(f"next: {step}") for step in next_steps(summary, sweep_arg)]
    return Group(*parts)


def render(summary: dict[str, Any], sweep_path: Path, sweep_arg: str | None = None) -> None:
    from rich.console import Console

    # soft wrap: a failed cell's reason and log path stay on one line, whatever the width
    Console(soft_wrap=True, highlight=False).print(status_renderable(summary, sweep_path, sweep_arg))


def watch(sweep: SweepDir, interval: float, sweep_arg: str, *,
          stop_when: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:  # fmt: skip
    """Refresh the status every `interval` seconds until no cell is pending or running
    (or `stop_when(summary)`); return the last summary. On a terminal: one rich display
    redrawn in place; otherwise one plain line per refresh (no screen-control codes, so
    a log file or a pipe reads well)."""
    done = stop_when or (lambda sm: not (sm["counts"].get("running") or sm["counts"].get("pending")))
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.live import Live

        summary = sweep_summary(sweep)
        with Live(status_renderable(summary, sweep.path), console=Console(), auto_refresh=False) as live:
            while not done(summary):
                time.sleep(interval)
                summary = sweep_summary(sweep)
                live.update(status_renderable(summary, sweep.path), refresh=True)
        return summary
    while True:
        summary = sweep_summary(sweep)
        print(progress_line(summary), flush=True)
        if done(summary):
            return summary
        time.sleep(interval)


# --------------------------------------------------------------------------- sweep file -> directory

# A refresh should not pay for pydantic and the full sweep validation (~0.3 s) every time:
# once `load_sweep` has accepted a sweep file, its fingerprint is kept in the sweep
# directory, and while the file (and what it depends on) is unchanged, its output_dir is
# read from the YAML alone. Anything unexpected falls back to `load_sweep`.
_VALIDATED_FILE = "sweep-files.json"


def _fingerprint(sweep_file: Path, raw: bytes, data: Any) -> str:
    """Everything `load_sweep`'s verdict on this file depends on: its bytes, the
    environment variables it names, the home folder (`~`) and its resource profile."""
    digest = hashlib.sha256(raw)
    for var in sorted(env_names(raw.decode("utf-8", "replace"))):
        digest.update(f"\0env {var}={os.environ.get(var)!r}".encode())
    digest.update(f"\0home {os.path.expanduser('~')}".encode())
    resources = data.get("resources") if isinstance(data, dict) else None
    profile = resources.get("profile") if isinstance(resources, dict) else None
    if profile is not None:
        from orchestrator.sweep.profiles import find_profile

        found = find_profile(str(profile), sweep_file)
        digest.update(f"\0profile {profile!r} {found}\0".encode())
        if found is not None:
            digest.update(found.read_bytes())
    return digest.hexdigest()


def _read_sweep_file(sweep_file: Path) -> tuple[bytes, Any]:
    import yaml

    raw = sweep_file.read_bytes()
    return raw, yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _output_dir_of(sweep_file: Path, data: Any) -> Path | None:
    """`output_dir` resolved as the spec does (env, `~`, relative to the file's folder)."""
    value = data.get("output_dir") if isinstance(data, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return Path(anchored_path(value, sweep_file.resolve().parent))
    except UnsetVariable:
        return None


def _validated_sweep_dir(sweep_file: str) -> SweepDir | None:
    """The sweep directory, if this exact sweep file was validated there before."""
    try:
        path = Path(sweep_file)
        raw, data = _read_sweep_file(path)
        out = _output_dir_of(path, data)
        if out is None:
            return None
        record = json.loads((out / "index" / _VALIDATED_FILE).read_text(encoding="utf-8"))
        if record.get("validated", {}).get(str(path.resolve())) != _fingerprint(path, raw, data):
            return None
        sweep = SweepDir(out)
        return sweep if sweep.has_manifest() else None
    except Exception as exc:  # noqa: BLE001 - any doubt: the full validation decides
        logger.debug("status: %s not in the validation cache, validating it (%s: %s)", sweep_file, type(exc).__name__, exc)
        return None


def _remember_validated(sweep_file: str, sweep: SweepDir, before: str | None) -> None:
    try:
        path = Path(sweep_file)
        raw, data = _read_sweep_file(path)
        after = _fingerprint(path, raw, data)
        if after != before:
            return  # the file changed while it was validated: remember nothing
        target = sweep.index_dir / _VALIDATED_FILE
        try:
            record = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        validated = dict(record.get("validated") or {}) if isinstance(record, dict) else {}
        if validated.get(str(path.resolve())) != after:
            validated[str(path.resolve())] = after
            write_cache_json(target, {"format": 1, "validated": validated})
    except Exception as exc:  # noqa: BLE001 - a cache: never fail the command for it
        logger.debug("status: validation of %s not cached (%s: %s)", sweep_file, type(exc).__name__, exc)
        return


def locate_sweep(sweep_file: str) -> SweepDir:
    """The sweep directory a sweep file names. Raises UserInputError exactly as
    `load_sweep` does; skips it for a file validated unchanged before."""
    quick = _validated_sweep_dir(sweep_file)
    if quick is not None:
        return quick
    from orchestrator.sweep.spec import load_sweep

    try:
        path = Path(sweep_file)
        raw, data = _read_sweep_file(path)
        before: str | None = _fingerprint(path, raw, data)
    except Exception as exc:  # noqa: BLE001 - load_sweep reports what is wrong with the file
        logger.debug("status: %s has no fingerprint, so it will not be cached (%s: %s)", sweep_file, type(exc).__name__, exc)
        before = None
    sweep = SweepDir(load_sweep(sweep_file).output_dir)
    if before is not None and sweep.has_manifest():
        _remember_validated(sweep_file, sweep, before)
    return sweep


def resolve_sweep(sweep_arg: str) -> SweepDir:
    """SWEEP as every command takes it: a sweep file, or the sweep directory it names."""
    from aullm.errors import UserInputError

    path = Path(sweep_arg)
    if path.is_dir():
        sweep = SweepDir(path)
        if not sweep.has_manifest():
            raise UserInputError(f"{sweep_arg}: not a sweep directory (no manifest.json); give the sweep file "
                                 "or the output_dir of a submitted sweep")  # fmt: skip
        return sweep
    if not path.exists():
        raise UserInputError(f"{sweep_arg}: no such sweep file or sweep directory")
    return locate_sweep(sweep_arg)


def sweep_file_of(sweep_arg: str) -> str:
    """The sweep file behind SWEEP: itself, or the one a sweep directory was submitted from
    (recorded in its manifest), for the commands that re-read the file (submit, retry)."""
    from aullm.errors import UserInputError

    path = Path(sweep_arg)
    if not path.is_dir():
        return sweep_arg
    sweep = resolve_sweep(sweep_arg)
    # the snapshot submit wrote (the file with its --set overrides applied) over the file it
    # came from: re-reading the bare file would drop the overrides and fail the settings check
    if sweep.resolved_sweep_path.is_file():
        return str(sweep.resolved_sweep_path)
    recorded = sweep.read_manifest().get("sweep_file")
    if not recorded or not Path(recorded).is_file():
        raise UserInputError(f"{sweep_arg}: its manifest names no sweep file that still exists "
                             f"({recorded or 'none recorded'}); give the sweep file instead")  # fmt: skip
    return str(recorded)


def _submitted_sweeps_here() -> list[tuple[str, SweepDir]]:
    """Without a SWEEP argument: the sweeps submitted from ./sweeps/*.yaml, each once (two
    files naming one output_dir are one sweep: the first file names it)."""
    from aullm.errors import UserInputError

    found: dict[Path, tuple[str, SweepDir]] = {}
    for path in sorted(Path("sweeps").glob("*.yaml")):
        try:
            sweep = locate_sweep(str(path))
        except UserInputError:
            continue
        if sweep.has_manifest():
            found.setdefault(sweep.path.resolve(), (str(path), sweep))
    return list(found.values())


def status_main(args: Any) -> int:
    from aullm.errors import UserInputError

    if args.sweep is None:
        sweeps = _submitted_sweeps_here()
        if not sweeps:
            raise UserInputError("no SWEEP given and no submitted sweep under ./sweeps; name a sweep file")
        if args.json:
            payload = [_status_payload(arg, sweep) for arg, sweep in sweeps]
            print(json.dumps({"command": "status", "sweeps": payload}, indent=2))
            return 0
        for arg, sweep in sweeps:
            render(sweep_summary(sweep), sweep.path, arg)
        return 0
    sweep = resolve_sweep(args.sweep)
    if not sweep.has_manifest():
        raise UserInputError(f"{args.sweep}: not submitted yet (no manifest in {sweep.path})")
    interval = getattr(args, "watch", None)
    try:
        if args.json:
            print(json.dumps(_status_payload(args.sweep, sweep), indent=2))
            return 0
        if interval:
            watch(sweep, float(interval), args.sweep)
        render(sweep_summary(sweep), sweep.path, args.sweep)
    except SchedulerError as exc:
        print(f"aullm-grid: error: cannot ask the scheduler: {exc}", file=sys.stderr)
        return 1
    return 0


def _status_payload(sweep_arg: str, sweep: SweepDir) -> dict[str, Any]:
    summary = sweep_summary(sweep, cells=True)
    return {"command": "status", "sweep": sweep_arg, "sweep_dir": str(sweep.path.resolve()), **summary,
            "next": next_steps(summary, sweep_arg)}  # fmt: skip


# --------------------------------------------------------------------------- logs


def cell_log_paths(sweep: SweepDir, cell_id: str) -> list[Path]:
    """The log files of the newest task that ran (or runs) `cell_id`: a Slurm task's
    stdout and stderr; for the local executor, the task log that mentions the cell."""
    records = [r for r in task_records(sweep) if cell_id in r.cell_ids]
    if not records:
        return []
    record = max(records, key=lambda r: r.submitted_at)
    if record.executor == "slurm" and record.log_path:
        out = Path(record.log_path)
        return [p for p in (out, out.with_name(out.name.replace("_log.out", "_log.err"))) if p.is_file()]
    batch = record.job_id.split(":")[1]
    found = _task_logs_naming(sweep, {batch}, {cell_id}).get(cell_id)
    if found is not None:
        err = found.with_name(found.name.replace("_log.out", "_log.err"))
        return [found, *([err] if err.is_file() else [])]
    return [Path(record.log_path)] if record.log_path and Path(record.log_path).is_file() else []


def logs_main(args: Any) -> int:
    """`aullm-grid logs SWEEP CELL [--lines N | --all]`: print a cell's task log."""
    from aullm.errors import UserInputError

    sweep = resolve_sweep(args.sweep)
    if args.cell not in set(sweep.cell_index().cell_ids):
        raise UserInputError(f"{args.sweep}: no cell '{args.cell}' in this sweep (see `aullm-grid status {args.sweep} --json`)")
    paths = cell_log_paths(sweep, args.cell)
    texts = {}
    for path in paths:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        texts[str(path)] = lines if args.all else lines[-args.lines :]
    if args.json:
        print(json.dumps({"command": "logs", "sweep": args.sweep, "sweep_dir": str(sweep.path.resolve()),
                          "cell_id": args.cell, "logs": texts}, indent=2))  # fmt: skip
        return 0
    if not paths:
        print(f"no log yet for {args.cell} (not started?); see `aullm-grid status {args.sweep}`")
        return 0
    for path, lines in texts.items():
        print(f"==> {path} <==")
        print("\n".join(lines))
    return 0
