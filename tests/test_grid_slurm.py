"""The whole grid on the real dev Slurm cluster (slurm/dev), end to end.

`aullm-grid submit` queues a demo-shaped sweep (14 cells, 3 per task: 6 array tasks,
at most 2 at once) plus a collector job that depends on the arrays (`afterany`);
Slurm runs them; every cell leaves exactly one result file; `status --json` (one sacct
per refresh) reports all done; a second `submit` queues nothing; the same sweep run by
the local executor gives the same predictions. A second test lowers the cluster's
MaxArraySize and checks that a sweep is cut into several arrays that all run.

No mock anywhere: real sbatch/sacct through submitit, the real training code in the
jobs, the embedded MLflow store shared by concurrent tasks.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import shlex
import stat
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator import cli
from orchestrator.ledger import SweepDir
from orchestrator.state.scheduler import SCHEDULER_CALLS, TaskState
from orchestrator.sweep.spec import ResourcesSpec
from orchestrator.state.status import ACCOUNTING_GRACE_S, cell_statuses, task_records
from orchestrator.launch.submit import slurm_parameters
from tests.helpers import (
    CliResult,
    cell_predictions,
    manifest_cell_ids,
    result_files,
    run_cli,
    shared_assets,
    shared_local_run,
    status_json,
    wait_all_finished,
    write_sweep,
)
from tests.slurm_cluster import (
    DEFAULT_MAX_ARRAY_SIZE,
    ClusterInfo,
    dev_slurm,  # noqa: F401 - the session fixture
    ensure_dev_cluster,
    wait_for_sacct,
)

EXPECTED_CELLS = 3 * 2 + 3 * 2 + 2  # LOSO folds x {all, no_llm} on both datasets + the cross-domain pair x 2
MEM_MB = 3000  # per task; two run side by side on the dev node
SWEEP_TIMEOUT_S = 600


def e2e(test: Any) -> Any:
    """The end-to-end tests: they need the dev cluster and take minutes (the rest run anywhere)."""
    return pytest.mark.slurm(pytest.mark.slow(test))


def _sacct_rows(job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """JobID -> {state, start, end} (datetimes; None while unknown) for these jobs and their array tasks."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Start,End"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    rows: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        job, state, start, end = line.split("|")

        def when(text: str) -> dt.datetime | None:
            return None if text in ("Unknown", "None", "") else dt.datetime.fromisoformat(text)

        rows[job] = {"state": state.split()[0], "start": when(start), "end": when(end)}
    return rows


def _jobs_named(name: str, since: dt.datetime) -> set[str]:
    """Every Slurm job of the sweep (array tasks and collector, by job name) since `since`."""
    names = f"{name},{name}-collect"
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID", "--name", names, "-S", since.strftime("%Y-%m-%dT%H:%M:%S")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return set(out.split())


@dataclass
class SlurmRun:
    sweep_file: Path
    out_dir: Path
    job_name: str
    started: dt.datetime
    submit: CliResult
    submit_json: dict[str, Any]
    submit_returned_at: dt.datetime
    status_after_submit: dict[str, Any]
    final_status: dict[str, Any]
    collector_state: str
    sweep_seconds: float

    @property
    def array_ids(self) -> list[str]:
        return list(self.submit_json["array_job_ids"])

    @property
    def collector_id(self) -> str:
        return str(self.submit_json["collector_job_id"])


def _run_on_slurm(sweep_file: Path, out_dir: Path, job_name: str) -> SlurmRun:
    """Submit, look at status at once, wait for every cell and for the collector job."""
    started = dt.datetime.now().replace(microsecond=0) - dt.timedelta(seconds=2)
    t0 = time.perf_counter()
    submit = run_cli("submit", sweep_file, "--json").check()
    returned = dt.datetime.now()
    submit_json = submit.json()
    try:
        status_after = status_json(sweep_file)
        final = wait_all_finished(out_dir, timeout_s=SWEEP_TIMEOUT_S)
        collector = wait_for_sacct([str(submit_json["collector_job_id"])], timeout_s=300)
    except BaseException:
        # leave the shared cluster quiet: cancel this sweep's jobs (and only them)
        run_cli("cancel", sweep_file)
        raise
    return SlurmRun(
        sweep_file, out_dir, job_name, started, submit, submit_json, returned, status_after, final,
        collector[str(submit_json["collector_job_id"])], time.perf_counter() - t0,
    )


@pytest.fixture(scope="module")
def slurm_run(dev_slurm: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> SlurmRun:  # noqa: F811
    if dev_slurm.real_memory_mb < 2 * MEM_MB:
        pytest.fail(f"the dev node has {dev_slurm.real_memory_mb} MB; two {MEM_MB} MB tasks must fit")
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("grid-slurm")
    name = f"grid-slurm-{secrets.token_hex(3)}"  # its own job name: sacct can tell its jobs apart
    sweep_file = write_sweep(
        root / "sweep.yaml", assets, output_dir=root / "out", name=name, executor="slurm",
        partition=dev_slurm.partition, mem=f"{MEM_MB}M", time_min=20, cells_per_task=3, array_parallelism=2,
    )
    run = _run_on_slurm(sweep_file, root / "out", f"aullm-{name}")
    print(
        f"\n[timing] slurm submit returned in {run.submit.seconds:.1f} s; whole sweep ({EXPECTED_CELLS} cells, "
        f"{run.submit_json['tasks']} tasks, collector included) {run.sweep_seconds:.1f} s"
    )
    return run


# ------------------------------------------------------------------ the demo-shaped sweep


@e2e
def test_submit_returns_before_the_jobs_finish(slurm_run: SlurmRun) -> None:
    sub = slurm_run.submit_json
    assert sub["submitted"] == EXPECTED_CELLS
    assert sub["tasks"] == 6  # 7 LLM cells and 7 no-LLM cells, at most 3 per task, one LLM per task
    assert len(slurm_run.array_ids) == 1 and sub["collector_job_id"]
    # right after submit, nothing is done yet and every cell is queued or training
    counts = slurm_run.status_after_submit["counts"]
    assert counts["done"] < EXPECTED_CELLS
    assert counts["pending"] + counts["running"] == EXPECTED_CELLS - counts["done"]
    assert counts["pending"] > 0  # array_parallelism 2: most tasks must still wait
    # and no array task had ended when submit returned (sacct times are whole seconds)
    rows = _sacct_rows(slurm_run.array_ids)
    ends = [r["end"] for job, r in rows.items() if "_" in job]
    assert len(ends) == 6 and all(ends)
    assert min(ends) >= slurm_run.submit_returned_at.replace(microsecond=0)


@e2e
def test_every_cell_has_exactly_one_done_result(slurm_run: SlurmRun) -> None:
    cell_ids = manifest_cell_ids(slurm_run.out_dir)
    assert len(cell_ids) == EXPECTED_CELLS
    files = result_files(slurm_run.out_dir)
    assert sorted(p.stem for p in files) == sorted(cell_ids)
    assert not [p for p in (slurm_run.out_dir / "results").iterdir() if p.name.startswith(".")]
    payloads = [json.loads(p.read_text()) for p in files]
    assert {p["status"] for p in payloads} == {"done"}
    # each result names the array task that wrote it: the very task it was packed into
    array_id = slurm_run.array_ids[0]
    (record,) = [r for r in SweepDir(slurm_run.out_dir).submissions() if "tasks" in r]
    written_by = {p["cell_id"]: (p["slurm"]["array_job_id"], p["slurm"]["array_task_id"]) for p in payloads}
    assert written_by == {cid: (array_id, index) for index, cids in record["tasks"].items() for cid in cids}
    assert sorted(len(c) for c in record["tasks"].values()) == [2, 2, 2, 2, 3, 3]


@e2e
def test_collector_ran_after_every_array_task(slurm_run: SlurmRun) -> None:
    assert slurm_run.collector_state == "COMPLETED"
    rows = _sacct_rows([*slurm_run.array_ids, slurm_run.collector_id])
    tasks = {job: r for job, r in rows.items() if "_" in job}
    assert len(tasks) == 6 and {r["state"] for r in tasks.values()} == {"COMPLETED"}
    collector = rows[slurm_run.collector_id]
    assert collector["start"] >= max(r["end"] for r in tasks.values())
    script = (slurm_run.out_dir / "jobs" / slurm_run.collector_id / f"{slurm_run.collector_id}_submission.sh").read_text()
    assert f"--dependency=afterany:{':'.join(slurm_run.array_ids)}" in script
    summary = json.loads((slurm_run.out_dir / "results_tables" / "summary.json").read_text())
    assert {g["status"] for g in summary["groups"]} == {"complete"}
    assert len(summary["groups"]) == 6  # casme2, samm, casme2->samm x {all, no_llm}


@e2e
def test_status_json_all_done_with_one_sacct_call(slurm_run: SlurmRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm_run.final_status["all_done"] is True
    assert status_json(slurm_run.sweep_file)["all_done"] is True  # the command itself, as a user runs it
    before = SCHEDULER_CALLS.copy()
    assert cli.main(["status", str(slurm_run.sweep_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert SCHEDULER_CALLS - before == Counter({"sacct": 1})  # one batched query, not one per cell or task
    assert summary["all_done"] is True
    assert summary["counts"]["done"] == EXPECTED_CELLS
    assert summary["failed"] == []


@e2e
def test_second_submit_submits_nothing(slurm_run: SlurmRun) -> None:
    jobs_before = _jobs_named(slurm_run.job_name, slurm_run.started)
    assert jobs_before  # the name filter finds the first submission's jobs
    record_before = (slurm_run.out_dir / "jobs.json").read_text()
    result = run_cli("submit", slurm_run.sweep_file, "--json").check().json()
    assert result["submitted"] == 0 and result["skipped_done"] == EXPECTED_CELLS and result["tasks"] == 0
    assert "array_job_ids" not in result
    assert (slurm_run.out_dir / "jobs.json").read_text() == record_before
    time.sleep(1.5)  # sacct lags sbatch by about a second: give a stray job time to show up
    assert _jobs_named(slurm_run.job_name, slurm_run.started) == jobs_before


@e2e
def test_jobs_run_the_submitters_python_offline_in_private_folders(slurm_run: SlurmRun) -> None:
    jobs = slurm_run.out_dir / "jobs"
    folders = [p for p in jobs.iterdir() if p.is_dir() and not p.is_symlink()]
    assert stat.S_IMODE(jobs.stat().st_mode) == 0o700
    assert folders and {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
    array_id = slurm_run.array_ids[0]
    script = (jobs / array_id / f"{array_id}_submission.sh").read_text()
    # the job's python is the submitter's (the venv's), not whatever `python` is on the node
    assert f"{shlex.quote(sys.executable)} -u -m submitit.core._submit" in script
    for line in ("export HF_HUB_OFFLINE=1", "#SBATCH --requeue", f"#SBATCH --mem={MEM_MB}",
                 "#SBATCH --array=0-5%2", "#SBATCH --partition=debug", "#SBATCH --time=20"):
        assert line in script, line
    logs = sorted(jobs.glob(f"{array_id}_*/{array_id}_*_0_log.out"))
    assert len(logs) == 6
    for log in logs:
        text = log.read_text()
        # the task summary line: no DeepSpeed import unless a sweep configures it (5 s per task)
        assert "deepspeed imported: no" in text, log
        assert "Traceback" not in text, log
        # and how long its start-up took (bench/bench_overhead.py reads the same line)
        first_step = re.search(r"first training step ([0-9.]+) s after the process started", text)
        assert first_step, log
        print(f"{log.name}: first training step {first_step.group(1)} s after the process started")


@e2e
def test_concurrent_tasks_shared_the_embedded_mlflow_store(slurm_run: SlurmRun) -> None:
    from orchestrator.tracking.config import SPOOL_DIR
    from orchestrator.tracking.store import find_runs_by_cell

    sweep = SweepDir(slurm_run.out_dir)
    runs = find_runs_by_cell(sweep.tracking_config(), sweep.path)
    assert sorted(runs) == sorted(manifest_cell_ids(slurm_run.out_dir))
    assert {r.status for r in runs.values()} == {"FINISHED"}
    # no task lost the store and fell back to its offline spool
    spool = slurm_run.out_dir / SPOOL_DIR
    assert not spool.exists() or not any(spool.iterdir())


@e2e
def test_local_executor_gives_the_same_predictions(
    slurm_run: SlurmRun, tmp_path_factory: pytest.TempPathFactory
) -> None:
    local = shared_local_run(tmp_path_factory)
    local.submit.check()
    print(f"\n[timing] local sweep (submit --wait): {local.submit.seconds:.1f} s")
    on_slurm = cell_predictions(slurm_run.out_dir)
    here = cell_predictions(local.out_dir)
    assert sorted(here) == sorted(on_slurm) and len(here) == EXPECTED_CELLS
    for cell_id, ref in on_slurm.items():
        got = here[cell_id]
        assert got["status"] == ref["status"] == "done"
        assert got["sample_keys"] == ref["sample_keys"], cell_id
        np.testing.assert_array_equal(got["labels"], ref["labels"])
        assert got["probs"].shape == ref["probs"].shape
        assert np.allclose(got["probs"], ref["probs"], atol=1e-6, rtol=0), cell_id


# ------------------------------------------------------------------ a small MaxArraySize


@e2e
def test_small_max_array_size_splits_the_sweep_into_arrays_that_all_run(
    dev_slurm: ClusterInfo, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> None:
    """MaxArraySize 2 and 7 one-cell tasks: 4 arrays of 2, 2, 2 and 1 task. The last is a
    batch of one, which submitit sends as a plain job ("123", not "123_0"): status and
    the collector's dependency must follow it too."""
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("grid-small-arrays")
    out_dir = root / "out"
    name = f"grid-arrays-{secrets.token_hex(3)}"
    sweep_file = write_sweep(
        root / "sweep.yaml", assets, output_dir=out_dir, name=name, executor="slurm",
        partition=dev_slurm.partition, mem=f"{MEM_MB}M", cells_per_task=1, array_parallelism=2, epochs=1,
        loso_variants=("no_llm",), cross_domain_variants=("no_llm",),
    )
    info = ensure_dev_cluster(max_array_size=2)
    try:
        assert info.max_array_size == 2
        plan = run_cli("submit", sweep_file, "--dry-run", "--json").check().json()
        assert plan["max_array_size"] == 2 and plan["tasks"] == 7
        assert [a["task_count"] for a in plan["arrays"]] == [2, 2, 2, 1]
        started = time.perf_counter()
        submit = run_cli("submit", sweep_file, "--json").check()
    finally:
        # Slurm checks the limit at submission only: put the shared cluster back at once,
        # while the arrays run (queued and running jobs survive the slurmctld restart).
        restored = ensure_dev_cluster()
    assert restored.max_array_size == DEFAULT_MAX_ARRAY_SIZE
    result = submit.json()
    array_ids = [str(a) for a in result["array_job_ids"]]
    collector_id = str(result["collector_job_id"])
    try:
        assert len(array_ids) == 4 and len(set(array_ids)) == 4
        records = [r for r in SweepDir(out_dir).submissions() if "tasks" in r]
        assert [r["array_job_id"] for r in records] == array_ids
        assert [len(r["tasks"]) for r in records] == [2, 2, 2, 1]
        task_ids = [jid for r in records for jid in r["job_ids"].values()]
        assert task_ids[-1] == array_ids[-1]  # the batch of one is a plain job
        assert all(t.startswith(f"{r['array_job_id']}_") for r in records[:3] for t in r["job_ids"].values())

        # while it runs, status follows every task, the plain job included (nothing unknown)
        final = wait_all_finished(out_dir, timeout_s=SWEEP_TIMEOUT_S)
        wait_for_sacct([collector_id], timeout_s=300)
    except BaseException:
        run_cli("cancel", sweep_file)
        raise
    print(f"\n[timing] MaxArraySize-2 sweep (7 cells in {len(array_ids)} arrays): {time.perf_counter() - started:.1f} s")
    assert final["all_done"] is True and final["counts"]["done"] == 7
    rows = _sacct_rows([*array_ids, collector_id])
    tasks = {job: r for job, r in rows.items() if job in task_ids}
    assert sorted(tasks) == sorted(task_ids)
    assert {r["state"] for r in tasks.values()} == {"COMPLETED"}
    assert rows[collector_id]["state"] == "COMPLETED"
    assert rows[collector_id]["start"] >= max(r["end"] for r in tasks.values())
    script = (out_dir / "jobs" / collector_id / f"{collector_id}_submission.sh").read_text()
    assert f"--dependency=afterany:{':'.join(array_ids)}" in script
    files = result_files(out_dir)
    assert sorted(p.stem for p in files) == sorted(manifest_cell_ids(out_dir))
    ids = [json.loads(p.read_text())["slurm"] for p in files]
    written_by = {i["array_job_id"] or i["job_id"] for i in ids}  # a plain job has no array id
    assert written_by == set(array_ids)  # every array ran its cells
    assert (out_dir / "results_tables" / "summary.json").is_file()


# ------------------------------------------------------------------ fast checks of the same contracts (no cluster)


def _sweep_with(tmp_path: Path, *records: dict[str, Any]) -> SweepDir:
    """A sweep directory holding a two-cell manifest and the given submission records."""
    sweep = SweepDir(tmp_path / "sweep")
    sweep.path.mkdir(parents=True)
    (sweep.path / "manifest.json").write_text(json.dumps({
        "format": 1, "name": "t", "spec": {},
        "cells": [{"cell_id": "a", "group": "g"}, {"cell_id": "b", "group": "g"}],
    }))
    for record in records:
        sweep.record_submission(record)
    return sweep


def test_a_batch_of_one_is_followed_by_its_plain_job_id(tmp_path: Path) -> None:
    now = time.time()
    sweep = _sweep_with(
        tmp_path,
        {"executor": "slurm", "array_job_id": "41", "tasks": {"0": ["a"]}, "job_ids": {"0": "41_0"}, "submitted_at": now},
        # submitit submits a one-task batch without --array: Slurm knows it as "42", never "42_0"
        {"executor": "slurm", "array_job_id": "42", "tasks": {"0": ["b"]}, "job_ids": {"0": "42"}, "submitted_at": now},
    )
    records = {r.cell_ids: r for r in task_records(sweep)}
    assert records[("a",)].job_id == "41_0"
    assert records[("b",)].job_id == "42"
    assert records[("b",)].log_path == str(sweep.path / "jobs" / "42" / "42_0_log.out")


def test_records_without_job_ids_still_name_array_tasks(tmp_path: Path) -> None:
    sweep = _sweep_with(tmp_path, {"executor": "slurm", "array_job_id": "7", "tasks": {"0": ["a"], "1": ["b"]}})
    assert sorted(r.job_id for r in task_records(sweep)) == ["7_0", "7_1"]


def test_a_task_sacct_does_not_know_is_pending_only_while_fresh(tmp_path: Path) -> None:
    now = time.time()
    sweep = _sweep_with(
        tmp_path,
        {"executor": "slurm", "array_job_id": "50", "tasks": {"0": ["a"]}, "submitted_at": now - 2},
        {"executor": "slurm", "array_job_id": "51", "tasks": {"0": ["b"]}, "submitted_at": now - ACCOUNTING_GRACE_S - 60},
    )
    states = {r: TaskState(r.job_id, "", "unknown") for r in task_records(sweep)}
    by_cell = {s.cell_id: s for s in cell_statuses(sweep, states)}
    assert by_cell["a"].state == "pending" and "accounting" in by_cell["a"].reason  # sacct lags a fresh submit
    assert by_cell["b"].state == "failed" and "51_0" in by_cell["b"].reason  # long gone from accounting


def test_slurm_parameters_keep_jobs_offline_requeueable_and_thread_bound() -> None:
    params = slurm_parameters(ResourcesSpec(partition="debug", mem="3000M", time=20, cpus_per_task=4))
    setup = "\n".join(params["slurm_setup"])
    assert "export HF_HUB_OFFLINE=1" in setup and "export TRANSFORMERS_OFFLINE=1" in setup
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}" in setup
    assert params["slurm_additional_parameters"]["requeue"] is True
    assert params["slurm_additional_parameters"]["mem"] == 3000
    assert params["timeout_min"] == 20 and params["cpus_per_task"] == 4 and params["slurm_partition"] == "debug"


@e2e
def test_two_simultaneous_submits_submit_each_cell_once(
    dev_slurm: ClusterInfo, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> None:
    """Two `submit`s of one sweep started at the same moment: the sweep-directory lock
    makes the second see the first's (still unaccounted) jobs, so no cell is queued twice."""
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("grid-concurrent")
    sweep_file = write_sweep(
        root / "sweep.yaml", assets, output_dir=root / "out", name=f"grid-conc-{secrets.token_hex(3)}",
        executor="slurm", partition=dev_slurm.partition, mem=f"{MEM_MB}M", time_min=20, cells_per_task=2,
        loso_variants=("no_llm",), cross_domain_variants=("no_llm",),
    )
    cmd = [sys.executable, "-m", "orchestrator.cli", "submit", str(sweep_file), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    submitted = sorted(json.loads(o[0])["submitted"] for o in outs)
    cells = manifest_cell_ids(root / "out")
    assert submitted == [0, len(cells)]
    queued = [cid for sub in SweepDir(root / "out").submissions() for ids in sub.get("tasks", {}).values() for cid in ids]
    assert sorted(queued) == sorted(cells)  # every cell in exactly one task
    wait_all_finished(root / "out", timeout_s=SWEEP_TIMEOUT_S)
    assert sorted(p.stem for p in result_files(root / "out")) == sorted(cells)


@pytest.mark.slurm
def test_a_collector_sbatch_refuses_is_reported_not_raised(
    dev_slurm: ClusterInfo, tmp_path: Path  # noqa: F811
) -> None:
    from types import SimpleNamespace

    from orchestrator.launch.submit import _submit_collector_or_say_why

    # A partition the cluster does not have: the real sbatch refuses the collector.
    spec = SimpleNamespace(name="refused", resources=ResourcesSpec(partition="no-such-partition", mem="100M", time=5))
    sweep = SweepDir(tmp_path / "out")
    folder = tmp_path / "out" / "jobs"
    folder.mkdir(parents=True)
    job_id, why = _submit_collector_or_say_why(spec, sweep, folder, ["1"])
    assert job_id is None
    assert why is not None and "collector job not submitted" in why and "aullm-grid collect" in why
    assert "\n" not in why
    assert not [s for s in sweep.submissions() if s.get("collector_job_id")]
