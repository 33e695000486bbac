"""The dev Slurm cluster of slurm/dev, for real: jobs, arrays, sacct, MaxArraySize,
requeue and preemption. Each test submits real jobs with sbatch and reads sacct."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aullm.errors import UserInputError

from tests.slurm_cluster import (
    DEFAULT_MAX_ARRAY_SIZE,
    DEV_DIR,
    PROFILES_DIR,
    ClusterInfo,
    dev_slurm,
    ensure_dev_cluster,
    privilege_prefix,
    sacct_states,
    sbatch,
    squeue_state,
    wait_for,
    wait_for_sacct,
)

__all__ = ["dev_slurm"]  # the imported fixture is what registers it in this module

def on_cluster(test: Any) -> Any:
    """Marks a test that runs jobs on the dev cluster (the profile schema checks need none)."""
    return pytest.mark.slurm(pytest.mark.slow(test))

PROFILE_FIELDS = {
    "partition",
    "account",
    "qos",
    "gres",
    "gpus_per_node",
    "cpus_per_task",
    "mem",
    "time",
    "array_parallelism",
    "cells_per_task",
    "extra_sbatch",
}

# Runs a long first time and finishes at once when requeued, logging each start:
# SLURM_RESTART_COUNT is unset on the first run and 1 after one requeue.
RESTARTABLE = (
    'echo "run ${SLURM_RESTART_COUNT:-0}" >> runs.txt; '
    'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi'
)


@pytest.fixture
def jobs() -> Iterator[list[str]]:
    """Job ids a test submitted; whatever is still queued at the end is cancelled, so a
    failing test never leaves a 300 s sleeper on the shared cluster."""
    submitted: list[str] = []
    yield submitted
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True, timeout=30)


@on_cluster
def test_job_and_array_complete_in_sacct(dev_slurm: ClusterInfo, tmp_path: Path, jobs: list[str]) -> None:
    single = sbatch("--mem=100M", "--output=single.out", "--wrap", "echo hi", cwd=tmp_path)
    array = sbatch(
        "--array=0-2", "--mem=100M", "--output=task_%a.out", "--wrap", "echo task $SLURM_ARRAY_TASK_ID",
        cwd=tmp_path,
    )
    jobs += [single, array]

    states = wait_for_sacct([single, f"{array}_0", f"{array}_1", f"{array}_2"])

    assert states == {
        single: "COMPLETED",
        f"{array}_0": "COMPLETED",
        f"{array}_1": "COMPLETED",
        f"{array}_2": "COMPLETED",
    }
    assert (tmp_path / "single.out").read_text() == "hi\n"
    assert [(tmp_path / f"task_{i}.out").read_text() for i in range(3)] == [f"task {i}\n" for i in range(3)]


@on_cluster
def test_cluster_reports_what_was_asked(dev_slurm: ClusterInfo) -> None:
    assert dev_slurm.partition == "debug"
    assert dev_slurm.max_array_size == DEFAULT_MAX_ARRAY_SIZE
    assert dev_slurm.hostname == subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert f"MaxArraySize            = {DEFAULT_MAX_ARRAY_SIZE}" in config
    assert "JobRequeue              = 1" in config


@on_cluster
def test_max_array_size_is_reconfigured_and_restored(
    dev_slurm: ClusterInfo, tmp_path: Path, jobs: list[str]
) -> None:
    # slurmctld caches the limit at its first array submission and a plain
    # `scontrol reconfigure` keeps the stale value: submit one first so this test
    # catches an up.sh that only reconfigures.
    jobs.append(sbatch("--hold", "--array=0-9", "--wrap", "true", cwd=tmp_path))
    try:
        small = ensure_dev_cluster(max_array_size=5)
        assert small.max_array_size == 5
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True)
        assert "MaxArraySize            = 5\n" in config.stdout
        # The limit is real: index 5 needs MaxArraySize 6; 0-4 is accepted (held, then cancelled).
        with pytest.raises(RuntimeError, match="Invalid job array specification"):
            sbatch("--hold", "--array=0-5", "--wrap", "true", cwd=tmp_path)
        jobs.append(sbatch("--hold", "--array=0-4", "--wrap", "true", cwd=tmp_path))
    finally:
        restored = ensure_dev_cluster()
    assert restored.max_array_size == DEFAULT_MAX_ARRAY_SIZE
    jobs.append(sbatch("--hold", f"--array={DEFAULT_MAX_ARRAY_SIZE - 1}", "--wrap", "true", cwd=tmp_path))


@on_cluster
def test_up_is_idempotent(dev_slurm: ClusterInfo) -> None:
    up = subprocess.run(
        [*privilege_prefix(), "bash", str(DEV_DIR / "up.sh")], capture_output=True, text=True, timeout=120
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("slurm-dev already up: cluster=aullm-dev"), up.stdout
    assert f"max_array_size={DEFAULT_MAX_ARRAY_SIZE} " in up.stdout


@on_cluster
def test_up_rejects_a_bad_max_array_size(dev_slurm: ClusterInfo) -> None:
    up = subprocess.run(
        [*privilege_prefix(), "env", "AULLM_DEV_MAX_ARRAY_SIZE=0", "bash", str(DEV_DIR / "up.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 1
    assert "AULLM_DEV_MAX_ARRAY_SIZE='0': allowed is an integer from 1 to 4000001" in up.stderr
    with pytest.raises(UserInputError, match="max_array_size=0"):
        ensure_dev_cluster(max_array_size=0)


@on_cluster
def test_scontrol_requeue_runs_the_job_again(dev_slurm: ClusterInfo, tmp_path: Path, jobs: list[str]) -> None:
    job = sbatch("--mem=100M", "--output=requeue.out", "--wrap", RESTARTABLE, cwd=tmp_path)
    jobs.append(job)
    runs = tmp_path / "runs.txt"
    wait_for(lambda: runs.exists() and squeue_state(job) == "RUNNING", f"job {job} to run", timeout_s=120)

    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
    # Back in the queue: a requeued job waits for its credential to expire (10 s here).
    wait_for(lambda: squeue_state(job) == "PENDING", f"job {job} to be pending again", timeout_s=30)

    assert wait_for_sacct([job], timeout_s=120) == {job: "COMPLETED"}
    assert runs.read_text() == "run 0\nrun 1\n"
    assert sacct_states([job], duplicates=True)[job] == ["REQUEUED", "COMPLETED"]


@on_cluster
def test_urgent_partition_preempts_by_requeue(dev_slurm: ClusterInfo, tmp_path: Path, jobs: list[str]) -> None:
    # The victim takes every CPU, so while it runs no one else's job does, and the
    # urgent job can only evict the victim.
    victim = sbatch(f"--cpus-per-task={dev_slurm.cpus}", "--mem=100M", "--wrap", RESTARTABLE, cwd=tmp_path)
    jobs.append(victim)
    runs = tmp_path / "runs.txt"
    wait_for(lambda: runs.exists() and squeue_state(victim) == "RUNNING", f"job {victim} to run", timeout_s=120)

    urgent = sbatch("--partition=urgent", "--mem=100M", "--wrap", "true", cwd=tmp_path)
    jobs.append(urgent)

    assert wait_for_sacct([urgent], timeout_s=60) == {urgent: "COMPLETED"}
    assert wait_for_sacct([victim], timeout_s=120) == {victim: "COMPLETED"}
    assert runs.read_text() == "run 0\nrun 1\n"
    assert sacct_states([victim], duplicates=True)[victim] == ["PREEMPTED", "COMPLETED"]


def _sbatch_options(profile: dict[str, Any]) -> list[str]:
    """The profile's fields as sbatch options (the real mapping lives in the orchestrator;
    this one only checks that the dev profile's values are acceptable to the dev cluster)."""
    flags = {
        "partition": "--partition",
        "account": "--account",
        "qos": "--qos",
        "gres": "--gres",
        "gpus_per_node": "--gpus-per-node",
        "cpus_per_task": "--cpus-per-task",
        "mem": "--mem",
        "time": "--time",
    }
    options = [f"{flag}={profile[key]}" for key, flag in flags.items() if profile[key] is not None]
    for key, value in profile["extra_sbatch"].items():
        options.append(f"--{key}" if value is True else f"--{key}={value}")
    options.append(f"--array=0-3%{profile['array_parallelism']}")
    return options


@pytest.mark.parametrize("name", ["dev", "h100"])
def test_profiles_have_exactly_the_schema_fields(name: str) -> None:
    profile = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())
    assert set(profile) == PROFILE_FIELDS
    assert isinstance(profile["cpus_per_task"], int) and isinstance(profile["cells_per_task"], int)
    assert isinstance(profile["array_parallelism"], int) and isinstance(profile["extra_sbatch"], dict)
    assert not (profile["gres"] and profile["gpus_per_node"]), "gres and gpus_per_node are exclusive"


@on_cluster
def test_dev_profile_is_accepted_by_the_dev_cluster(dev_slurm: ClusterInfo, tmp_path: Path) -> None:
    profile = yaml.safe_load((PROFILES_DIR / "dev.yaml").read_text())
    assert profile["partition"] == dev_slurm.partition
    # --test-only: slurmctld validates the request and says where it would run, submits nothing.
    check = subprocess.run(
        ["sbatch", "--test-only", *_sbatch_options(profile), "--wrap", "true"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert f"on nodes {dev_slurm.hostname} in partition debug" in check.stderr
