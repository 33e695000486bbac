"""Array tasks of several processes (`resources.processes_per_task`), one per GPU.

Every process of a task trains each cell on the whole (full-batch) training split with
the same seeds, and DDP averages their identical gradients: a cell's predictions must be
those of a one-process task. The reference is the same sweep run by the `debug`
executor, in one process, no Slurm needed; every run uses one thread per process.

On the real dev Slurm cluster (2 CPUs: one task of two gloo processes at a time):
- a 4-cell sweep, 2 cells per task, runs to done with exactly one result per cell, each
  saying world size 2, and the predictions of the one-process run;
- SIGUSR2 sent to rank 0 alone mid-training stops both ranks at the same epoch (rank 1
  ends its task "preempted", not with a broken all-reduce), rank 0 writes the checkpoint
  and requeues the task, and the requeued task resumes from it to the reference result.
The local executor (submitit's LocalExecutor starts the processes) is checked the same way.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from aullm.errors import UserInputError
from orchestrator.ledger import SweepDir
from orchestrator.sweep.spec import ResourcesSpec, load_sweep
from orchestrator.launch.submit import slurm_parameters
from tests.helpers import (
    TWO_FOLDS,
    GridAssets,
    array_submission_script,
    assert_every_cell_done_once,
    cell_predictions,
    epochs_reported,
    fail_unless_the_node_fits,
    run_cli,
    two_fold_sweep,
    submit_and_wait,
    wait_all_finished,
)
from tests.slurm_cluster import ClusterInfo, dev_slurm  # noqa: F401 - the session fixture

PROCESSES = 2
EPOCHS = 2
PREEMPT_EPOCHS = 20  # long enough to be caught mid-training
SWEEP_TIMEOUT_S = 900
# Probabilities are stored rounded to 1e-7. Measured gap: 0 (DDP's mean of two identical
# gradients is exact); a wrong gradient scale or ranks drawing different dropout masks
# would show far above this.
PROB_ATOL = 1e-6


def _sweep_file(root: Path, assets: GridAssets, *, executor: str, processes: int, epochs: int = EPOCHS,
                **kwargs: Any) -> Path:  # fmt: skip
    """`two_fold_sweep` under a fresh name; `kwargs` (folds, variants, cells_per_task) go to it."""
    return two_fold_sweep(assets, root, executor=executor, processes=processes, epochs=epochs,
                          name=f"mp-{secrets.token_hex(3)}", mem="3000M", **kwargs)  # fmt: skip


def _submit_reference(sweep_file: Path) -> Path:
    """Run a debug-executor sweep: one process, inside the CLI."""
    run_cli("submit", sweep_file, "--json", timeout_s=SWEEP_TIMEOUT_S).check()
    out = sweep_file.parent / "out"
    _assert_one_done_result_per_cell(out, world_size=1)
    return out


def _assert_one_done_result_per_cell(out_dir: Path, *, world_size: int) -> dict[str, dict[str, Any]]:
    payloads = assert_every_cell_done_once(out_dir)
    assert {p["world_size"] for p in payloads.values()} == {world_size}
    return payloads


def _assert_same_predictions(out_dir: Path, reference_dir: Path) -> float:
    """Every cell's probabilities equal the reference run's (same samples, same order); the largest gap."""
    ours, reference = cell_predictions(out_dir), cell_predictions(reference_dir)
    assert sorted(ours) == sorted(reference)
    worst = 0.0
    for cid, ref in reference.items():
        assert ours[cid]["sample_keys"] == ref["sample_keys"]
        np.testing.assert_array_equal(ours[cid]["labels"], ref["labels"])
        np.testing.assert_allclose(ours[cid]["probs"], ref["probs"], rtol=0, atol=PROB_ATOL, err_msg=cid)
        worst = max(worst, float(np.abs(ours[cid]["probs"] - ref["probs"]).max()))
    # the predictions are not all alike: equality above says something
    assert np.ptp(np.concatenate([r["probs"].ravel() for r in reference.values()])) > 1e-3
    return worst


def _rank_logs(out_dir: Path, rank: int) -> list[Path]:
    return sorted((out_dir / "jobs").glob(f"*/*_{rank}_log.out"))


# ------------------------------------------------------------------ spec and sbatch mapping (fast)


def test_processes_map_to_tasks_per_node_on_one_node() -> None:
    params = slurm_parameters(ResourcesSpec(executor="slurm", processes_per_task=4, gpus_per_node=4))
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 4, 4)
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]  # a dead process ends its task
    one = slurm_parameters(ResourcesSpec(executor="slurm"))
    assert "tasks_per_node" not in one and "slurm_srun_args" not in one
    # srun (Slurm >= 22.05) must hand each process the CPUs sbatch gave it
    assert any("SRUN_CPUS_PER_TASK" in line for line in params["slurm_setup"])


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"processes_per_task": 2, "gpus_per_node": 4}, "processes_per_task 2 with gpus_per_node 4"),
        ({"processes_per_task": 4, "gres": "gpu:h100:2"}, "processes_per_task 4 with gres 'gpu:h100:2'"),
        ({"gres": "gpu:h100:4"}, "set processes_per_task: 4"),
        ({"executor": "debug", "processes_per_task": 2}, "needs executor slurm or local"),
        ({"processes_per_task": 0}, "field 'resources.processes_per_task': 0 must be >= 1"),
    ],
)
def test_impossible_process_and_gpu_combinations_are_one_line_errors(
    tmp_path: Path, resources: dict[str, Any], expected: str
) -> None:
    spec = {
        "name": "t", "output_dir": "out", "datasets": {"casme2": {"root": "data/casme2"}},
        "llms": {"tiny": {"path": "models/tiny"}}, "grid": [{"datasets": ["casme2"], "variants": ["all"]}],
        "resources": {"executor": "slurm", **resources},
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserInputError) as err:
        load_sweep(path)
    message = str(err.value)
    assert expected in message and message.startswith(f"{path}: field 'resources") and "\n" not in message


def test_a_gpu_profile_leaves_the_process_count_to_the_sweep(tmp_path: Path) -> None:
    (tmp_path / "h100x4.yaml").write_text(yaml.safe_dump({"partition": "gpu", "gres": "gpu:h100:4"}))
    spec = {
        "name": "t", "output_dir": "out", "datasets": {"casme2": {"root": "data/casme2"}},
        "llms": {"tiny": {"path": "models/tiny"}}, "grid": [{"datasets": ["casme2"], "variants": ["all"]}],
        "resources": {"executor": "slurm", "profile": "h100x4.yaml", "processes_per_task": 4},
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    resources = load_sweep(path).resources
    assert (resources.processes_per_task, resources.gpus_per_task) == (4, 4)
    # CPU-only processes (gloo) need no GPU at all
    assert ResourcesSpec(executor="local", processes_per_task=3).gpus_per_task is None


# ------------------------------------------------------------------ rendezvous (fast, threads)


def _in_threads(target: Any, ranks: tuple[int, ...], *, stagger_s: float = 0.0,
                within_s: float = 60.0) -> list[threading.Thread]:  # fmt: skip
    """`target(rank)` for each rank on its own thread, started in that order `stagger_s`
    apart, all joined within `within_s` together: the threads, for the caller to see that
    none still waits."""
    threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in ranks]
    for t in threads:
        t.start()
        time.sleep(stagger_s)
    deadline = time.monotonic() + within_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return threads


def _both_ranks(folder: Path, key: str) -> list[Any]:
    """Ranks 1 and 0 of a 2-process task as threads, rank 1 first (it waits for rank 0's port)."""
    from jobs.process_group import rendezvous_store

    stores: list[Any] = [None, None]

    def join(rank: int) -> None:
        stores[rank] = rendezvous_store(folder, key, rank=rank, world_size=2, host="127.0.0.1")

    _in_threads(join, (1, 0), stagger_s=0.2)
    return stores


def test_the_ranks_of_a_task_find_each_other_through_its_folder(tmp_path: Path) -> None:
    """Rank 0 listens on a port the OS gives it (not one drawn from the job id, which a busy
    node may already use) and publishes it in the job folder; rank 1 connects to it."""
    stores = _both_ranks(tmp_path, "7_1.0.rendezvous")
    assert stores[0] is not None and stores[1] is not None
    assert stores[1].port == stores[0].port == int((tmp_path / "7_1.0.rendezvous.port").read_text())
    stores[0].set("from-rank-0", "hello")
    assert stores[1].get("from-rank-0") == b"hello"


def test_a_requeued_task_never_reads_its_previous_attempts_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm's restart count names the attempt: the first attempt's file (its store long gone:
    a dead port here) is not what the requeued ranks read."""
    from jobs.process_group import rendezvous_key

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = rendezvous_key("7_1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = rendezvous_key("7_1")
    assert first != second and "7_1" in first and "7_1" in second
    (tmp_path / f"{first}.port").write_text("1")  # nothing listens on port 1
    stores = _both_ranks(tmp_path, second)
    assert stores[1] is not None and stores[1].port == stores[0].port != 1


def test_a_rank_whose_rank_0_never_comes_fails_naming_the_file(tmp_path: Path) -> None:
    import datetime

    from jobs.process_group import rendezvous_store

    with pytest.raises(TimeoutError, match="did not publish its port in .*7_1.0.rendezvous.port within 1 s"):
        rendezvous_store(tmp_path, "7_1.0.rendezvous", rank=1, world_size=2, host="127.0.0.1",
                         timeout=datetime.timedelta(seconds=1))  # fmt: skip


def test_rank_0_fails_within_the_rendezvous_timeout_naming_the_rank_that_never_came(tmp_path: Path) -> None:
    """Rank 0 of a 3-process task whose rank 2 never starts: a RendezvousError after the
    rendezvous timeout that names rank 2, not the store's 30-min wait for a store key that
    `init_process_group` would end in."""
    import datetime

    from jobs.process_group import COLLECTIVE_TIMEOUT, RendezvousError, meet, rendezvous_store

    key, second = "7_1.0.rendezvous", datetime.timedelta(seconds=1)
    errors: list[BaseException | None] = [None, None]

    def rank(r: int) -> None:
        store = rendezvous_store(tmp_path, key, rank=r, world_size=3, host="127.0.0.1")
        store.set_timeout(COLLECTIVE_TIMEOUT)  # what the collectives wait; meet must not
        try:
            meet(store, rank=r, world_size=3, timeout=second)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors[r] = exc

    threads = _in_threads(rank, (0, 1), within_s=30)  # 30x the rendezvous timeout
    assert not any(t.is_alive() for t in threads), "a rank still waits for rank 2"
    for r, exc in enumerate(errors):
        assert isinstance(exc, RendezvousError), (r, exc)
        assert str(exc) == f"rank {r}: rank(s) 2 of this task's 3 processes did not start within 1 s"
        assert exc.rank == r


def test_ranks_that_all_come_meet(tmp_path: Path) -> None:
    from jobs.process_group import meet

    stores = _both_ranks(tmp_path, "7_1.0.rendezvous")
    done: list[int] = []

    def rank(r: int) -> None:
        meet(stores[r], rank=r, world_size=2)
        done.append(r)

    _in_threads(rank, (1, 0))
    assert sorted(done) == [0, 1]


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process() -> Iterator[None]:
    """Every run of this module computes with one thread per process (the CLI's environment
    reaches the debug, local and Slurm tasks): thread counts change float sums, and 20
    epochs grow that into gaps of 1e-5 that would hide what the comparison is about."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.mark.slow
def test_local_executor_two_processes_give_the_one_process_predictions(
    assets: GridAssets, two_fold_reference: Path, tmp_path: Path
) -> None:
    sweep_file = _sweep_file(tmp_path, assets, executor="local", processes=PROCESSES)
    t0 = time.monotonic()
    run_cli("submit", sweep_file, "--wait", timeout_s=SWEEP_TIMEOUT_S).check()
    out = sweep_file.parent / "out"
    _assert_one_done_result_per_cell(out, world_size=PROCESSES)
    worst = _assert_same_predictions(out, two_fold_reference)
    assert all("process 1 of 2" in log.read_text() for log in _rank_logs(out, 1))
    print(f"\n[multiprocess] local, 2 processes: {time.monotonic() - t0:.1f} s; largest probability gap {worst:.1e}")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_two_process_tasks_give_the_one_process_predictions(
    dev_slurm: ClusterInfo, assets: GridAssets, two_fold_reference: Path, tmp_path: Path  # noqa: F811
) -> None:
    fail_unless_the_node_fits(dev_slurm.cpus, PROCESSES)
    sweep_file = _sweep_file(tmp_path, assets, executor="slurm", processes=PROCESSES)
    out = sweep_file.parent / "out"
    t0 = time.monotonic()
    submitted = submit_and_wait(sweep_file, timeout_s=SWEEP_TIMEOUT_S)
    assert submitted["tasks"] == 2
    payloads = _assert_one_done_result_per_cell(out, world_size=PROCESSES)
    worst = _assert_same_predictions(out, two_fold_reference)
    for cid, payload in payloads.items():
        ref = json.loads((two_fold_reference / "results" / f"{cid}.json").read_text())
        np.testing.assert_allclose(payload["epoch_losses"], ref["epoch_losses"], rtol=1e-5, err_msg=cid)
    # sbatch asked for the processes, srun started them, and both ranks ran every cell
    script = array_submission_script(out, submitted)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script
    collector = submitted["collector_job_id"]
    assert "--ntasks-per-node" not in (out / "jobs" / collector / f"{collector}_submission.sh").read_text()
    rank1 = _rank_logs(out, 1)
    assert len(rank1) == 2 and all("2 cells (done 2)" in log.read_text() for log in rank1), rank1
    print(f"\n[multiprocess] slurm, 2 processes per task: {time.monotonic() - t0:.1f} s; largest probability gap {worst:.1e}")


# A task of two processes whose rank 1 dies before it joins rank 0 (a test-only hook: exit 3)
ONE_CELL = {"variants": ["no_llm"], "folds": TWO_FOLDS[:1], "cells_per_task": 1}


def test_a_bad_rendezvous_timeout_is_refused_at_submit(
    assets: GridAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tasks read $AULLM_RENDEZVOUS_TIMEOUT_S from the environment they inherit: a value
    they would refuse is refused by submit, exit 2, one line, nothing written."""
    sweep_file = _sweep_file(tmp_path, assets, executor="local", processes=PROCESSES, **ONE_CELL)
    monkeypatch.setenv("AULLM_RENDEZVOUS_TIMEOUT_S", "5min")
    result = run_cli("submit", sweep_file, timeout_s=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "AULLM_RENDEZVOUS_TIMEOUT_S='5min'" in line and "number of seconds above 0" in line, line
    assert not (sweep_file.parent / "out").exists()


@pytest.mark.slow
def test_a_rank_dead_at_start_fails_the_local_task_naming_it_in_each_cell(
    assets: GridAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's LocalExecutor leaves rank 0 running when rank 1 dies: rank 0 gives up at the
    rendezvous timeout (10 s here, 5 min by default), not the 30-min collective one, and its
    cell's failure names the rank that never came."""
    sweep_file = _sweep_file(tmp_path, assets, executor="local", processes=PROCESSES, **ONE_CELL)
    monkeypatch.setenv("AULLM_TEST_EXIT_BEFORE_RENDEZVOUS", "1")
    monkeypatch.setenv("AULLM_RENDEZVOUS_TIMEOUT_S", "10")
    assert run_cli("submit", sweep_file, "--wait", timeout_s=240).returncode == 1
    summary = wait_all_finished(sweep_file.parent / "out", timeout_s=60)
    (failed,) = summary["failed"]
    assert failed["reason"] == "RendezvousError: rank 0: rank(s) 1 of this task's 2 processes did not start within 10 s", failed


@pytest.mark.slurm
@pytest.mark.slow
def test_a_rank_dead_at_start_ends_its_slurm_task_at_once(
    dev_slurm: ClusterInfo, assets: GridAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """On Slurm, srun's --kill-on-bad-exit ends the task when rank 1 dies, instead of rank 0
    waiting for it: with the rendezvous timeout at 10 min, the task still ends within the
    4 min this test waits."""
    fail_unless_the_node_fits(dev_slurm.cpus, PROCESSES)
    sweep_file = _sweep_file(tmp_path, assets, executor="slurm", processes=PROCESSES, **ONE_CELL)
    monkeypatch.setenv("AULLM_TEST_EXIT_BEFORE_RENDEZVOUS", "1")
    monkeypatch.setenv("AULLM_RENDEZVOUS_TIMEOUT_S", "600")
    out = sweep_file.parent / "out"
    try:
        run_cli("submit", sweep_file, "--json").check()
        summary = wait_all_finished(out, timeout_s=240)
    finally:
        run_cli("cancel", sweep_file, timeout_s=60)
    (failed,) = summary["failed"]
    # the process that took the task down, from srun's line in the task's log; not rank 0,
    # which srun killed after it
    # (the job's own exit code is that of whichever process Slurm counts: 3, or 9 for the kill)
    assert failed["reason"].startswith("FAILED (exit "), failed
    assert failed["reason"].endswith("); process 1: Exited with exit code 3"), failed
    print(f"\n[multiprocess] rank 1 dead at start: {failed['reason']}")


SRUN_LOG = """submitit INFO (2026-12-06 07:29:21,255) - Starting with JobEnvironment(job_id=812, ...)
srun: error: vm: task 1: Exited with exit code 3
srun: launch/slurm: _step_signal: Terminating StepId=812.0
slurmstepd-vm: error: *** STEP 812.0 ON vm CANCELLED AT 2026-12-06T07:29:21 ***
srun: error: vm: task 0: Killed
srun: Force Terminated StepId=812.0
"""


@pytest.mark.parametrize(
    ("log", "note"),
    [
        (SRUN_LOG, "; process 1: Exited with exit code 3"),  # as srun wrote it in the test above
        ("srun: error: gpu07: tasks 0-3: Killed\n", "; processes 0-3: Killed"),
        ("x" * 70_000 + "\nsrun: error: n1: task 2: Segmentation fault (core dumped)\n", "; process 2: Segmentation fault (core dumped)"),
        ("Traceback ...\nRuntimeError: boom\n", ""),  # one process: nothing from srun
    ],
    ids=["first-line-wins", "several", "far-in-a-long-log", "none"],
)
def test_the_first_process_srun_reports_dead_is_named(tmp_path: Path, log: str, note: str) -> None:
    from orchestrator.state.status import first_dead_process

    path = tmp_path / "812_0_log.out"
    path.write_text(log)
    assert first_dead_process(str(path)) == note
    assert first_dead_process(str(tmp_path / "gone.out")) == ""


def _wait_training(out_dir: Path, *, min_epoch: int, timeout_s: float = 300) -> dict[str, Any]:
    """The running marker (rank 0's pid, slurm ids) of a cell rank 0 reports past `min_epoch`."""
    sweep = SweepDir(out_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        markers = sweep.running_markers()
        for cid, epoch in epochs_reported(_rank_logs(out_dir, 0)).items():
            if min_epoch <= epoch < PREEMPT_EPOCHS - 8 and cid in markers:
                return markers[cid]
        time.sleep(0.3)
    raise TimeoutError(f"no cell of {out_dir} reached epoch {min_epoch} in {timeout_s:.0f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_to_rank0_alone_stops_both_ranks_and_the_task_resumes(
    dev_slurm: ClusterInfo, assets: GridAssets, tmp_path: Path  # noqa: F811
) -> None:
    one_cell = {"variants": ["no_llm"], "folds": TWO_FOLDS[:1], "cells_per_task": 1, "epochs": PREEMPT_EPOCHS}
    reference = _submit_reference(_sweep_file(tmp_path / "reference", assets, executor="debug", processes=1, **one_cell))
    sweep_file = _sweep_file(tmp_path / "preempted", assets, executor="slurm", processes=PROCESSES, **one_cell)
    out = sweep_file.parent / "out"
    try:
        run_cli("submit", sweep_file, "--json").check()
        marker = _wait_training(out, min_epoch=3)
        # the time-limit warning, to one process only: the ranks must still agree to stop
        os.kill(int(marker["pid"]), signal.SIGUSR2)
        wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    finally:
        run_cli("cancel", sweep_file, timeout_s=60)
    (payload,) = _assert_one_done_result_per_cell(out, world_size=PROCESSES).values()
    assert payload["start_epoch"] >= 3 and len(payload["epoch_losses"]) == PREEMPT_EPOCHS
    assert payload["attempt"] == 2 and payload["slurm"]["restart_count"] == "1"  # requeued by rank 0
    (rank1_log,) = _rank_logs(out, 1)
    rank1 = rank1_log.read_text()
    # rank 1 got no signal, yet left the first run through the agreed stop, not a broken all-reduce
    assert "1 cells (preempted 1)" in rank1 and "1 cells (done 1)" in rank1, rank1[-3000:]
    assert "Traceback" not in rank1, rank1[-3000:]
    worst = _assert_same_predictions(out, reference)
    print(f"\n[multiprocess] USR2 to rank 0: resumed at epoch {payload['start_epoch']}; largest probability gap {worst:.1e}")
