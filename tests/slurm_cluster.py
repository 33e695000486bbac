"""The real single-node dev Slurm cluster, for tests (DESIGN.md §8: never a mock of sbatch).

    from tests.slurm_cluster import dev_slurm            # a session fixture: ClusterInfo
    from tests.slurm_cluster import ensure_dev_cluster   # or call it yourself

    def test_submit(dev_slurm):
        job = sbatch("--wrap", "echo hi", cwd=tmp_path)
        assert wait_for_sacct([job])[job] == "COMPLETED"

``ensure_dev_cluster`` runs ``slurm/dev/install.sh`` and ``slurm/dev/up.sh``: both return
in about a second when the cluster already runs, so every session may call it. The
cluster is shared by everything on the host and left running afterwards.

A host where the cluster cannot exist (not root and no password-less sudo, no apt and no
Slurm) makes the fixture skip with the reason; ``AULLM_REQUIRE_SLURM=1`` (set it in CI)
turns that skip into a failure, so a CI run can never pass by skipping every Slurm test.
A cluster that should start but does not is always a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aullm.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
DEV_DIR = REPO / "slurm" / "dev"
PROFILES_DIR = REPO / "slurm" / "profiles"

DEFAULT_MAX_ARRAY_SIZE = 1001  # keep in step with slurm/dev/common.sh
MAX_ARRAY_SIZE_LIMIT = 4_000_001  # Slurm's own ceiling
REQUIRE_ENV = "AULLM_REQUIRE_SLURM"

# sacct states after which a job never runs again (a requeued job passes through
# REQUEUED/PREEMPTED and PENDING, which are not final).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


class DevClusterUnavailable(RuntimeError):
    """This host cannot run the dev cluster at all (a reason to skip, not a bug)."""


class DevClusterError(RuntimeError):
    """The dev cluster should have started and did not (always a failure)."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a test needs to know about the running dev cluster (read back from Slurm)."""

    partition: str
    max_array_size: int
    hostname: str
    cluster_name: str
    cpus: int
    real_memory_mb: int


def privilege_prefix() -> list[str]:
    """How to run the scripts as root: directly, or through password-less sudo."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is not None:
        probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["sudo", "-n", "--preserve-env=AULLM_DEV_MAX_ARRAY_SIZE"]
    raise DevClusterUnavailable(
        "the dev Slurm cluster needs root: run the tests as root, give this user "
        "password-less sudo, or start it with `sudo slurm/dev/up.sh` (and the "
        "MaxArraySize the test needs) before the tests"
    )


def _check_host() -> None:
    if not sys.platform.startswith("linux"):
        raise DevClusterUnavailable(f"the dev Slurm cluster runs on Linux only, not {sys.platform}")
    installed = shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if installed is None and shutil.which("apt-get") is None:
        raise DevClusterUnavailable("Slurm is not installed and apt-get is not available to install it")


def _run_script(name: str, prefix: list[str], env: dict[str, str], timeout_s: float) -> str:
    cmd = [*prefix, "bash", str(DEV_DIR / name)]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise DevClusterError(f"slurm/dev/{name} did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-25:])
        raise DevClusterError(f"slurm/dev/{name} exited {proc.returncode}:\n{tail}")
    return proc.stdout


def _scontrol_fields(*args: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show ... -o`` (one line per record; first record)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    fields: dict[str, str] = {}
    for token in out.splitlines()[0].split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def dev_cluster_info() -> ClusterInfo:
    """Describe the running dev cluster, as Slurm itself reports it."""
    config: dict[str, str] = {}
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    hostname = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    node = _scontrol_fields("node", hostname)
    partitions = subprocess.run(
        ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    default = next((p.rstrip("*") for p in partitions if p.endswith("*")), partitions[0])
    return ClusterInfo(
        partition=default,
        max_array_size=int(config["MaxArraySize"]),
        hostname=hostname,
        cluster_name=config["ClusterName"],
        cpus=int(node["CPUTot"]),
        real_memory_mb=int(node["RealMemory"]),
    )


def _running_cluster() -> ClusterInfo | None:
    """The running cluster if status.sh finds every daemon up and the node usable."""
    try:
        status = subprocess.run(
            ["bash", str(DEV_DIR / "status.sh")], capture_output=True, timeout=60, stdin=subprocess.DEVNULL
        )
        return dev_cluster_info() if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def ensure_dev_cluster(max_array_size: int | None = None, *, timeout_s: float = 900) -> ClusterInfo:
    """Install (if needed) and start the dev cluster; return once it runs jobs and answers sacct.

    ``max_array_size`` None means the default (1001), so that a session always gets a
    known cluster; a different value reconfigures the running cluster (a test that sets
    it must restore the default afterwards: other tests on this host share the cluster).

    Raises DevClusterUnavailable when the host cannot run it (skip), DevClusterError when
    it should have started and did not (fail), UserInputError for a bad max_array_size.
    """
    size = DEFAULT_MAX_ARRAY_SIZE if max_array_size is None else max_array_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_ARRAY_SIZE_LIMIT:
        raise UserInputError(
            f"ensure_dev_cluster: max_array_size={max_array_size!r}: allowed is an integer "
            f"from 1 to {MAX_ARRAY_SIZE_LIMIT}"
        )
    _check_host()
    try:
        prefix = privilege_prefix()
    except DevClusterUnavailable:
        # Without root a running cluster (started once with sudo) is still usable as
        # long as it is healthy and has the limit asked for: it just cannot be changed.
        running = _running_cluster()
        if running is not None and running.max_array_size == size:
            return running
        raise
    env = {**os.environ, "AULLM_DEV_MAX_ARRAY_SIZE": str(size), "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s
    _run_script("install.sh", prefix, env, timeout_s)
    _run_script("up.sh", prefix, env, max(60.0, deadline - time.monotonic()))
    info = dev_cluster_info()
    if info.max_array_size != size:
        raise DevClusterError(f"up.sh returned but slurmctld reports MaxArraySize={info.max_array_size}, not {size}")
    return info


def make_dev_slurm_fixture(
    max_array_size: int | None = None, *, scope: Any = "session", name: str = "dev_slurm"
) -> Callable[..., ClusterInfo]:
    """A pytest fixture that yields a running dev cluster's ClusterInfo (or skips, see module doc).

    Import the result into a conftest.py or a test module under the returned name.
    """

    @pytest.fixture(scope=scope, name=name)
    def _dev_slurm() -> ClusterInfo:
        try:
            return ensure_dev_cluster(max_array_size)
        except DevClusterUnavailable as exc:
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"{REQUIRE_ENV}=1 but {exc}", pytrace=False)
            pytest.skip(str(exc))
        except DevClusterError as exc:
            pytest.fail(str(exc), pytrace=False)

    return _dev_slurm


dev_slurm = make_dev_slurm_fixture()


# --------------------------------------------------------------- job helpers for tests


def sbatch(*args: str, cwd: str | os.PathLike[str]) -> str:
    """Submit with real ``sbatch --parsable``; return the job id (a string, as sacct prints it)."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={os.fspath(cwd)}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def sacct_states(job_ids: Iterable[str], *, duplicates: bool = False) -> dict[str, list[str]]:
    """One batched ``sacct`` call: every allocation's states, in order, keyed by JobID.

    Array tasks appear as ``<id>_<index>`` once they have started (a still-pending rest
    shows as ``<id>_[2-5]``). ``duplicates`` adds the earlier runs of a requeued job
    (states such as REQUEUED or PREEMPTED before the final one).
    """
    ids = ",".join(job_ids)
    cmd = ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State"]
    if duplicates:
        cmd.insert(1, "-D")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    states: dict[str, list[str]] = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        # "CANCELLED by 0" -> "CANCELLED"
        states.setdefault(job, []).append(state.split()[0] if state else state)
    return states


def squeue_state(job_id: str) -> str | None:
    """The job's state as squeue shows it (PENDING, RUNNING, ...), None once it left the queue."""
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    return out[0] if out else None


def wait_for_sacct(
    job_ids: Sequence[str], *, timeout_s: float = 120, poll_s: float = 0.5
) -> dict[str, str]:
    """Poll sacct until every id in ``job_ids`` has a terminal state; return id -> state.

    sacct lags a finished task by about a second, and array tasks appear only once
    started: polling until each expected id is final covers both.
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, list[str]] = {}
    while True:
        last = sacct_states({j.split("_")[0] for j in job_ids})
        final = {j: last[j][-1] for j in job_ids if j in last and last[j][-1] in TERMINAL_STATES}
        if len(final) == len(job_ids):
            return final
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s sacct still says {last} for {list(job_ids)}")
        time.sleep(poll_s)


def wait_for(predicate: Callable[[], bool], what: str, *, timeout_s: float = 60, poll_s: float = 0.2) -> None:
    """Poll ``predicate`` until true; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
