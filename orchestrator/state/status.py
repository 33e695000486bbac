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
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
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
            out.append(CellStatus(cid, group, "failed", reason, record.job_id, record.log_path))
    return out, results


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


def sweep_summary(sweep: SweepDir) -> dict[str, Any]:
    """One status refresh: `summarize` of every cell, with the cost report."""
    statuses, results = _statuses_and_results(sweep, update_index=True)
    return summarize(statuses, cost_report(statuses, results, sweep.cell_index().resources))


def render(summary: dict[str, Any], sweep_path: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
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
    if summary.get("cost"):
        console.print(cost_line(summary["cost"]), markup=False, highlight=False, soft_wrap=True)
    for f in summary["failed"][:50]:
        # one line per cell whatever the terminal's width, and the reason verbatim: DeepSpeed's
        # and pydantic's messages hold [brackets] that rich would take for markup
        console.print(f"[red]{f['state']}[/red] {f['cell_id']}: {escape(str(f['reason']))}  log: {f['log_path']}",
                      soft_wrap=True, highlight=False)
    if len(summary["failed"]) > 50:
        console.print(f"... and {len(summary['failed']) - 50} more (use --json)")


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


def _submitted_sweeps_here() -> list[str]:
    """Without a SWEEP argument: every sweeps/*.yaml of this folder that was submitted."""
    from aullm.errors import UserInputError

    found = []
    for path in sorted(Path("sweeps").glob("*.yaml")):
        try:
            if locate_sweep(str(path)).has_manifest():
                found.append(str(path))
        except UserInputError:
            continue
    return found


def status_main(args: Any) -> int:
    from aullm.errors import UserInputError

    if args.sweep is None:
        sweeps = _submitted_sweeps_here()
        if not sweeps:
            raise UserInputError("no SWEEP given and no submitted sweep under ./sweeps; name a sweep file")
        code = 0
        for path in sweeps:
            args.sweep = path
            code = max(code, status_main(args))
        return code
    sweep = locate_sweep(args.sweep)
    if not sweep.has_manifest():
        raise UserInputError(f"{args.sweep}: not submitted yet (no manifest in {sweep.path})")
    interval = getattr(args, "watch", None)
    while True:
        try:
            summary = sweep_summary(sweep)
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
