"""Fault injection on the real dev Slurm cluster (issue 5, "nothing lost").

Each test runs a tiny sweep (LOSO on the synthetic CASME II, the `no_llm` variant: 3
cells, one per array task, two tasks at a time), hurts it while a cell is training, and
ends by asserting that every cell has exactly one result, all done, and that nothing
else was lost (no temp files, no stray checkpoints).

Faults: `scancel` of a running task then `retry`; `scontrol requeue` of a running task
(the cell resumes from its checkpoint: start_epoch > 0); SIGKILL of a task's Python
then `retry`; the node set DOWN and back to service; the MLflow server stopped
mid-sweep and restarted before `collect`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.ledger import SweepDir
from tests.helpers import (
    GridAssets,
    assert_every_cell_done_once,
    epochs_reported,
    manifest_cell_ids,
    run_cli,
    shared_assets,
    status_json,
    sweep_dict,
    wait_all_finished,
)
from tests.slurm_cluster import ClusterInfo, dev_slurm  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Two LOSO folds of the synthetic CASME II, no_llm variant: the dev node has 2 CPUs, so both
# tasks run in one wave (a third cell would wait for a second wave and add its whole run).
FOLDS = ["sub01", "sub02"]
CELLS = len(FOLDS)
EPOCHS = 20  # long enough to be caught mid-training (about 1.5 s an epoch with two tasks on 2 cores)
SWEEP_TIMEOUT_S = 300


def _write_fault_sweep(root: Path, assets: GridAssets, *, epochs: int = EPOCHS, tracking_uri: str | None = None) -> Path:
    name = f"faults-{secrets.token_hex(3)}"
    spec = sweep_dict(
        assets, output_dir=root / "out", name=name, executor="slurm", cells_per_task=1,
        array_parallelism=2, epochs=epochs, mem="1500M", time_min=20, cross_domain_variants=(),
    )  # fmt: skip
    spec["datasets"]["casme2"]["folds"] = FOLDS
    spec["grid"] = [{"protocol": "loso", "datasets": ["casme2"], "variants": ["no_llm"]}]
    spec["tracking"] = {"uri": tracking_uri, "flush_every": 1, "flush_seconds": 1.0}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _epochs_seen(out_dir: Path) -> dict[str, int]:
    """cell_id -> highest epoch a task log reports (jobs/<id>/<id>_0_log.out)."""
    return epochs_reported(list((out_dir / "jobs").glob("*/*_log.out")))


def _wait_training(out_dir: Path, *, min_epoch: int = 2, timeout_s: float = 180) -> tuple[str, dict[str, Any]]:
    """A cell that is training now (past `min_epoch`) and its running marker (host, pid, slurm ids)."""
    sweep = SweepDir(out_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = _epochs_seen(out_dir)
        markers = sweep.running_markers()
        for cid, epoch in sorted(seen.items()):
            if epoch >= min_epoch and epoch < EPOCHS - 8 and cid in markers and not sweep.result_exists(cid):
                return cid, markers[cid]
        time.sleep(0.3)
    raise TimeoutError(f"no cell of {out_dir} reached epoch {min_epoch} in {timeout_s:.0f} s: {_epochs_seen(out_dir)}")


def _task_id(marker: dict[str, Any]) -> str:
    ids = marker["slurm"]
    return f"{ids['array_job_id']}_{ids['array_task_id']}" if ids.get("array_task_id") else str(ids["job_id"])


def _assert_nothing_lost(out_dir: Path) -> list[dict[str, Any]]:
    """Every cell has exactly one result file, done, trained every epoch; nothing left behind."""
    payloads = list(assert_every_cell_done_once(out_dir).values())
    assert len(payloads) == CELLS
    assert all(len(p["epoch_losses"]) == EPOCHS for p in payloads)  # every done result has them
    return payloads


def _mlflow_status(out_dir: Path, cell_id: str) -> str:
    """The status of the cell's run in the sweep's (embedded) MLflow store."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.config import resolve_uri

    sweep = SweepDir(out_dir)
    cfg = sweep.tracking_config()
    client = MlflowClient(resolve_uri(cfg, out_dir))
    exp = client.get_experiment_by_name(cfg.experiment or sweep.read_manifest()["name"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.cell_id = '{cell_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return str(runs[0].info.status)


def _submit(sweep_file: Path) -> dict[str, Any]:
    return run_cli("submit", sweep_file, "--json").check().json()


@pytest.fixture(scope="module")
def assets(dev_slurm: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> GridAssets:  # noqa: F811
    return shared_assets(tmp_path_factory)


@pytest.fixture
def fault_sweep(assets: GridAssets, tmp_path: Path) -> Any:
    """The sweep file; its jobs are cancelled afterwards whatever happened (a shared cluster)."""
    sweep_file = _write_fault_sweep(tmp_path, assets)
    yield sweep_file
    run_cli("cancel", sweep_file, timeout_s=60)


def test_scancel_then_retry(fault_sweep: Path) -> None:
    out = fault_sweep.parent / "out"
    t0 = time.monotonic()
    _submit(fault_sweep)
    cid, marker = _wait_training(out)
    job = _task_id(marker)
    subprocess.run(["scancel", job], check=True, timeout=30)
    summary = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    states = {f["cell_id"]: f for f in summary["failed"]}
    assert list(states) == [cid] and states[cid]["state"] == "cancelled", summary
    assert summary["counts"]["done"] == CELLS - 1
    # retry re-submits that one cell only; the done ones are never redone
    retried = run_cli("retry", fault_sweep, "--json").check()
    assert json.loads(retried.stdout)["submitted"] == 1
    final = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    assert final["all_done"], final
    payloads = {p["cell_id"]: p for p in _assert_nothing_lost(out)}
    assert payloads[cid]["slurm"]["array_job_id"] != marker["slurm"]["array_job_id"]
    print(f"\n[timing] scancel + retry: {time.monotonic() - t0:.1f} s")


def test_scontrol_requeue_resumes_from_checkpoint(fault_sweep: Path) -> None:
    out = fault_sweep.parent / "out"
    t0 = time.monotonic()
    _submit(fault_sweep)
    cid, marker = _wait_training(out, min_epoch=3)
    job = _task_id(marker)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    final = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    assert final["all_done"], final
    payloads = {p["cell_id"]: p for p in _assert_nothing_lost(out)}
    resumed = payloads[cid]
    # the requeued task went on from its checkpoint: its epoch counter did not restart at 0
    assert resumed["start_epoch"] >= 3, resumed.get("start_epoch")
    assert resumed["attempt"] == 2
    assert resumed["slurm"]["restart_count"] == "1"
    assert all(p["start_epoch"] == 0 for c, p in payloads.items() if c != cid)
    print(f"\n[timing] scontrol requeue: {time.monotonic() - t0:.1f} s (resumed at epoch {resumed['start_epoch']})")


def test_sigkill_of_task_python_then_retry(fault_sweep: Path) -> None:
    out = fault_sweep.parent / "out"
    t0 = time.monotonic()
    _submit(fault_sweep)
    cid, marker = _wait_training(out)
    os.kill(int(marker["pid"]), signal.SIGKILL)  # the dev node is this host
    summary = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    failed = {f["cell_id"]: f for f in summary["failed"]}
    assert list(failed) == [cid], summary
    assert failed[cid]["state"] == "failed" and failed[cid]["reason"], failed[cid]
    # what `status` prints (a separate process, as a user runs it) agrees
    assert status_json(fault_sweep)["counts"]["failed"] == 1
    # MLflow still says RUNNING for the killed cell (its task died mid-epoch); collect
    # reconciles it with the scheduler's view and marks it failed
    run_cli("collect", fault_sweep, timeout_s=300).check()
    assert _mlflow_status(out, cid) == "FAILED"
    retried = run_cli("retry", fault_sweep, "--failed", "--json").check()
    assert json.loads(retried.stdout)["submitted"] == 1
    final = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    assert final["all_done"], final
    _assert_nothing_lost(out)
    print(f"\n[timing] SIGKILL + retry: {time.monotonic() - t0:.1f} s")


def _scontrol_node(host: str, state: str, reason: str | None = None) -> None:
    cmd = ["scontrol", "update", f"nodename={host}", f"state={state}"]
    if reason:
        cmd.append(f"reason={reason}")
    subprocess.run(cmd, check=True, timeout=30, capture_output=True)


def _node_state(host: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", host, "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.strip()


def test_node_down_and_back_to_service(fault_sweep: Path, dev_slurm: ClusterInfo) -> None:  # noqa: F811
    out = fault_sweep.parent / "out"
    host = dev_slurm.hostname
    t0 = time.monotonic()
    _submit(fault_sweep)
    cid, marker = _wait_training(out)
    job = _task_id(marker)
    try:
        _scontrol_node(host, "down", "aullm-fault-test")
        # the running tasks are killed (NODE_FAIL) and, submitted with --requeue, go back to
        # the queue. The dev cluster has ReturnToService=2: slurmd re-registers within a
        # second or two and the node serves again by itself, as a rebooted node does.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            history = subprocess.run(
                ["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True, timeout=30
            ).stdout.split()
            if "NODE_FAIL" in history:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"task {job} did not end NODE_FAIL after its node went down: {history}")
    finally:
        # the cluster is shared: never leave the node down (resume fails when it is up already)
        if any(word in _node_state(host) for word in ("down", "drain", "fail")):
            _scontrol_node(host, "resume")
    # Both tasks died with the node, so for a moment sacct's newest record of each is
    # NODE_FAIL and status says failed with nothing pending, until Slurm requeues them:
    # wait past that window, and fail only if the cells never come back to done.
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    final = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
    while not final["all_done"] and time.monotonic() < deadline:
        time.sleep(3)
        final = wait_all_finished(out, timeout_s=max(1.0, deadline - time.monotonic()))
    assert final["all_done"], final
    payloads = {p["cell_id"]: p for p in _assert_nothing_lost(out)}
    assert payloads[cid]["attempt"] >= 2  # the same cell ran again in the requeued task
    assert _node_state(host) in ("idle", "mixed", "allocated")
    print(f"\n[timing] node down + back: {time.monotonic() - t0:.1f} s (cell resumed at epoch {payloads[cid]['start_epoch']})")


@pytest.mark.mlflow_server
def test_mlflow_outage_is_synced_by_collect(assets: GridAssets, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "mlflow").start()
    sweep_file = _write_fault_sweep(tmp_path, assets, tracking_uri=server.uri)
    out = tmp_path / "out"
    t0 = time.monotonic()
    try:
        _submit(sweep_file)
        _wait_training(out, min_epoch=1)
        server.stop()  # mid-sweep: the tasks must keep training and keep their results
        final = wait_all_finished(out, timeout_s=SWEEP_TIMEOUT_S)
        assert final["all_done"], final
        _assert_nothing_lost(out)
        spool = out / "tracking-spool"
        assert spool.is_dir() and list(spool.iterdir()), "the outage left nothing to sync"
        server.start()  # same port, same store
        collected = run_cli("collect", sweep_file, timeout_s=300).check()
        assert not [p for p in spool.iterdir() if p.suffix in (".jsonl", ".syncing")], collected.stdout
        client = MlflowClient(server.uri)
        name = yaml.safe_load(sweep_file.read_text())["name"]
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("cell_id")]
        by_cell = {r.data.tags["cell_id"]: r for r in runs}
        assert sorted(by_cell) == sorted(manifest_cell_ids(out)), sorted(by_cell)
        for cid, run in by_cell.items():
            assert run.info.status == "FINISHED", (cid, run.info.status)
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted({m.step for m in history}) == list(range(EPOCHS)), (cid, len(history))
    finally:
        run_cli("cancel", sweep_file, timeout_s=60)
        server.stop()
    print(f"\n[timing] MLflow outage + collect: {time.monotonic() - t0:.1f} s (server start {server.startup_seconds:.1f} s)")
