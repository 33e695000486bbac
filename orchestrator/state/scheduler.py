"""What Slurm says, asked in one batched call per refresh (never once per cell).

Only the Slurm CLI is used (`sacct`, `scontrol`, `scancel`), as submitit does: it is
what every cluster has, and pyslurm needs headers matching the installed Slurm.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass

# Scheduler commands run by this process, by name ("sacct": 3, ...). The contract "one
# batched sacct per status refresh, never one per cell" is asserted against this.
SCHEDULER_CALLS: Counter[str] = Counter()

# Slurm job states, folded into the few a user acts on.
_STATE_MAP = {
    "PENDING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "STAGE_OUT": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "CANCELLED": "cancelled",
    "REVOKED": "cancelled",
    "PREEMPTED": "preempted",
    "TIMEOUT": "timeout",
}


@dataclass(frozen=True)
class TaskState:
    """The scheduler's view of one array task (or plain job)."""

    job_id: str  # "<array job id>_<task index>" for array tasks
    slurm_state: str  # e.g. "RUNNING", "NODE_FAIL", "CANCELLED"
    state: str  # pending | running | completed | failed | cancelled | preempted | timeout | unknown
    exit_code: str = ""
    reason: str = ""


class SchedulerError(RuntimeError):
    """The scheduler could not be asked (no sacct, accounting down, ...)."""


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    SCHEDULER_CALLS[cmd[0]] += 1
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchedulerError(f"{cmd[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise SchedulerError(f"{' '.join(cmd[:2])} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def fold_state(slurm_state: str) -> str:
    # sacct prints e.g. "CANCELLED by 0"; the first word is the state
    word = slurm_state.split()[0].rstrip("+") if slurm_state.strip() else ""
    return _STATE_MAP.get(word, "unknown")


_ARRAY_RANGE = re.compile(r"^(\d+)_\[(.+)\]$")


def _expand_array_id(job_id: str) -> list[str]:
    """'12_[3-5,7%2]' -> ['12_3', '12_4', '12_5', '12_7'] (sacct compresses pending tasks)."""
    m = _ARRAY_RANGE.match(job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out: list[str] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(f"{base}_{i}" for i in range(int(lo), int(hi) + 1))
        elif part:
            out.append(f"{base}_{part}")
    return out


def parse_sacct(text: str) -> dict[str, TaskState]:
    """Parse `sacct -P -n -X --format=JobID,State,ExitCode,Reason` output."""
    states: dict[str, TaskState] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        job_id, slurm_state = fields[0], fields[1] if len(fields) > 1 else ""
        exit_code = fields[2] if len(fields) > 2 else ""
        reason = fields[3] if len(fields) > 3 else ""
        for jid in _expand_array_id(job_id):
            # sacct lists a requeued task once per attempt, oldest first: the last line wins
            states[jid] = TaskState(jid, slurm_state.split()[0] if slurm_state else "", fold_state(slurm_state), exit_code, reason)
    return states


def query_states(job_ids: list[str]) -> dict[str, TaskState]:
    """One `sacct` call for all the given jobs (array job ids expand to their tasks)."""
    if not job_ids:
        return {}
    ids = ",".join(sorted(set(job_ids)))
    out = _run(["sacct", "-j", ids, "-P", "-n", "-X", "-D", "--format=JobID,State,ExitCode,Reason"])
    return parse_sacct(out)


def max_array_size() -> int:
    """MaxArraySize as the running controller has it (an array's highest index is this - 1)."""
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    if not m:
        raise SchedulerError("scontrol show config did not report MaxArraySize")
    return int(m.group(1))


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *sorted(set(job_ids))])
