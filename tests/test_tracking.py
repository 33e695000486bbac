"""orchestrator.tracking.store against real MLflow stores: the embedded sqlite store and, behind
the ``mlflow_server`` marker, a real ``mlflow server`` that is stopped and restarted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aullm.errors import UserInputError
from orchestrator.tracking import cell_logger, config, store, sync

from tests.mlflow_server import free_port, start_mlflow_server

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def template_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private AULLM_CACHE_DIR for this module (never the user's ~/.cache). The first
    prepare_store in it pays MLflow's schema migration (5-30 s here); later sweeps copy
    the migrated template."""
    return tmp_path_factory.mktemp("aullm-cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, template_cache: Path) -> Iterator[None]:
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AULLM_CACHE_DIR", str(template_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The process-wide "store was down a moment ago" memory must not leak between tests.
    cell_logger._last_failure.clear()
    yield
    cell_logger._last_failure.clear()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return tmp_path / "sweep"


def _client(cfg: config.TrackingConfig, sweep_dir: Path):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.resolve_uri(cfg, sweep_dir))


def _down_uri() -> str:
    """An http URI where nothing listens: connection refused, the quick kind of outage."""
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- module basics


def test_import_does_not_load_mlflow() -> None:
    code = "import sys, orchestrator.tracking.store, orchestrator.tracking.sync, orchestrator.tracking.cell_logger; print(sorted({'mlflow','torch'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_config_validation_and_uri(tmp_path: Path) -> None:
    assert config.resolve_uri(config.TrackingConfig(None, "e"), tmp_path) == (
        f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    )
    assert config.resolve_uri(config.TrackingConfig("http://h:5000", "e"), tmp_path) == "http://h:5000"
    with pytest.raises(UserInputError, match=r"tracking\.uri.*allowed"):
        config.TrackingConfig("htp//oops", "e")
    with pytest.raises(UserInputError, match=r"tracking\.experiment"):
        config.TrackingConfig(None, " ")
    with pytest.raises(UserInputError, match=r"tracking\.flush_every"):
        config.TrackingConfig(None, "e", flush_every=0)


def test_prepare_store_is_idempotent_and_uses_the_template(
    tmp_path: Path, template_cache: Path
) -> None:
    cfg = config.TrackingConfig(None, "grid")
    store.prepare_store(cfg, tmp_path / "warm-up")  # builds the template if no test did yet
    assert list(template_cache.glob("mlflow-*-empty.db"))
    t0 = time.perf_counter()
    exp_id = store.prepare_store(cfg, tmp_path / "s")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert store.prepare_store(cfg, tmp_path / "s") == exp_id
    again = time.perf_counter() - t0
    print(f"prepare_store, migrated template cached: fresh dir {first:.2f} s, again {again:.3f} s")
    client = _client(cfg, tmp_path / "s")
    exp = client.get_experiment(exp_id)
    assert exp.name == "grid"
    assert exp.artifact_location == (tmp_path / "s" / "mlflow" / "artifacts").resolve().as_uri()
    # the copy is a private store: nothing from the warm-up sweep is in it
    assert [e.name for e in client.search_experiments()] == ["grid"]  # Default hidden (docs/mlflow.md)
    state = json.loads((tmp_path / "s" / "mlflow" / "tracking.json").read_text())
    assert len(state["sweep_uid"]) == 32 and list(state["experiments"].values()) == [exp_id]
    assert store.sweep_uid(tmp_path / "s") == state["sweep_uid"]


def test_logger_on_unprepared_sweep_prepares_under_the_lock(
    tmp_path: Path, template_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that finds no prepared store must not let MLflow create the sqlite file on its
    own (that happens outside our lock, and 8 such processes corrupt the store): it goes
    through prepare, which installs the template. A marker experiment in a copy of the
    template proves which path created the store."""
    cfg = config.TrackingConfig(None, "grid")
    store.prepare_store(cfg, tmp_path / "warm-up")
    marked = tmp_path / "marked-cache"
    marked.mkdir()
    [template] = template_cache.glob("mlflow-*-empty.db")
    (marked / template.name).write_bytes(template.read_bytes())
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{marked / template.name}").create_experiment("marker")
    monkeypatch.setenv("AULLM_CACHE_DIR", str(marked))
    logger = cell_logger.CellRunLogger(cfg, tmp_path / "job-first", "c1")
    logger.start(params={}, tags={})
    logger.finish("FINISHED")
    assert not logger.offline
    names = {e.name for e in _client(cfg, tmp_path / "job-first").search_experiments()}
    assert names == {"marker", "grid"}  # Default hidden (docs/mlflow.md)


def test_prepare_store_unreachable_raises_tracking_unavailable(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(config.TrackingUnavailable, match="not usable"):
        store.prepare_store(config.TrackingConfig(_down_uri(), "e"), tmp_path)
    assert time.perf_counter() - t0 < 15  # the short retry settings are in force


# --------------------------------------------------------------------------- (a) concurrency

_WORKER = textwrap.dedent(
    """
    import json, logging, sys
    from orchestrator.tracking.cell_logger import CellRunLogger
    from orchestrator.tracking.config import TrackingConfig
    seen = []
    class Keep(logging.Handler):
        def emit(self, record): seen.append(record.getMessage())
    logging.getLogger().addHandler(Keep())
    sweep, cell = sys.argv[1], sys.argv[2]
    logger = CellRunLogger(TrackingConfig(None, "grid", flush_every=10), sweep)
    logger.start(cell, {"lr": 3e-5, "variant": "all"}, {"dataset": "casme2", "fold": cell})
    for epoch in range(50):
        logger.log_epoch(epoch, {"train_loss": 1.0 / (epoch + 1), "lr": 3e-5})
    logger.finish("FINISHED", {"final_train_loss": 0.02})
    print(json.dumps({"offline": logger.offline, "run_id": logger.run_id, "logs": seen}))
    """
)


@pytest.mark.slow
def test_concurrent_cells_share_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    cfg = config.TrackingConfig(None, "grid")
    # An unusable cache dir (a file): no template, MLflow migrates from scratch; that
    # fallback must work, and it is the true cost of a first sweep on a machine.
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("AULLM_CACHE_DIR", str(tmp_path / "not-a-dir"))
    t0 = time.perf_counter()
    exp_id = store.prepare_store(cfg, sweep)
    print(f"prepare_store on a fresh dir, no template: {time.perf_counter() - t0:.2f} s")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cells = [f"cell{i}" for i in range(4)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(sweep), c], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cells
    ]  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "database is locked" not in err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["offline"] is False, res["logs"]
        assert not any("locked" in m for m in res["logs"])
    assert not (sweep / config.SPOOL_DIR).exists()

    client = _client(cfg, sweep)
    runs = store.find_runs_by_cell(cfg, sweep)
    assert sorted(runs) == cells
    for cell, run in runs.items():
        assert run.experiment_id == exp_id and run.status == "FINISHED"
        assert run.tags["fold"] == cell and run.tags["mlflow.runName"] == cell
        history = client.get_metric_history(run.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(50))
    # nothing strayed into the Default experiment (the file store's race, docs/mlflow.md)
    assert client.search_runs(["0"]) == []


# --------------------------------------------------------------------------- embedded basics


def test_epoch_metrics_are_batched(sweep: Path) -> None:
    cfg = config.TrackingConfig(None, "grid", flush_every=10, flush_seconds=3600)
    store.prepare_store(cfg, sweep)
    logger = cell_logger.CellRunLogger(cfg, sweep, "c1")
    logger.start(params={"train": {"lr": 3e-5, "epochs": 350}, "bad(key)": 1},
                 tags={"dataset": "samm", "seed": 1})  # fmt: skip
    client = _client(cfg, sweep)
    for epoch in range(15):
        logger.log_epoch(epoch, {"train_loss": 1.0 / (epoch + 1), "not_a_number": "x"})
    # one flush after 10 epochs; the other 5 are still buffered
    assert len(client.get_metric_history(logger.run_id, "train_loss")) == 10
    logger.finish("FINISHED", {"test_f1": 0.5})
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "c1"
    assert len(client.get_metric_history(logger.run_id, "train_loss")) == 15
    assert [m.step for m in client.get_metric_history(logger.run_id, "test_f1")] == [14]
    assert run.data.params == {"train.lr": "3e-05", "train.epochs": "350", "bad_key_": "1"}
    assert run.data.tags["cell_id"] == "c1" and run.data.tags["seed"] == "1"
    assert "not_a_number" not in run.data.metrics
    logger.finish("FAILED")  # idempotent: a second finish changes nothing
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status"):
        cell_logger.CellRunLogger(cfg, sweep, "c2").finish("DONE")  # type: ignore[arg-type]


def test_unfinished_run_is_resumed_finished_one_is_not(sweep: Path) -> None:
    cfg = config.TrackingConfig(None, "grid")
    first = cell_logger.CellRunLogger(cfg, sweep, "c1")
    first.start(params={"lr": 1}, tags={})
    first.log_epoch(0, {"loss": 1.0})
    first.finish("KILLED", end_reason="preempted")

    second = cell_logger.CellRunLogger(cfg, sweep, "c1")
    second.start(params={"lr": 1, "extra": 2}, tags={})
    assert second.run_id == first.run_id
    client = _client(cfg, sweep)
    run = client.get_run(second.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["aullm.attempt"] == "2"
    assert config.TAG_END_REASON not in run.data.tags  # the old attempt's reason is gone
    assert run.data.params == {"lr": "1", "extra": "2"}
    second.log_epoch(1, {"loss": 0.5})
    second.finish("FINISHED")

    third = cell_logger.CellRunLogger(cfg, sweep, "c1")  # re-run of a finished cell: a new run
    third.start(params={}, tags={})
    assert third.run_id != first.run_id
    assert store.find_runs_by_cell(cfg, sweep)["c1"].run_id == third.run_id
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1]


def test_context_manager_marks_failure(sweep: Path) -> None:
    cfg = config.TrackingConfig(None, "grid")
    with pytest.raises(ZeroDivisionError):
        with cell_logger.CellRunLogger(cfg, sweep, "boom") as logger:
            logger.start()
            1 / 0  # noqa: B018
    assert _client(cfg, sweep).get_run(logger.run_id).info.status == "FAILED"


# --------------------------------------------------------------------------- offline + spool


def test_store_down_spools_and_sync_replays_idempotently(
    sweep: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedded = config.TrackingConfig(None, "grid")
    store.prepare_store(embedded, sweep)
    down = config.TrackingConfig(_down_uri(), "grid", flush_every=5)
    caplog.set_level(logging.WARNING)
    t0 = time.perf_counter()
    logger = cell_logger.CellRunLogger(down, sweep, "c1")
    logger.start(params={"lr": 3e-5}, tags={"dataset": "casme2"})
    losses = []
    for epoch in range(20):
        losses.append(1.0 / (epoch + 1))  # "training" goes on
        logger.log_epoch(epoch, {"train_loss": losses[-1]})
    logger.finish("FINISHED", {"final": 0.05}, end_reason="ok")
    assert time.perf_counter() - t0 < 15
    assert logger.offline and len(losses) == 20
    ours = [r for r in caplog.records if r.name == cell_logger.__name__]
    assert len(ours) == 1 and "spooling" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]

    spool = sweep / config.SPOOL_DIR / "c1.jsonl"
    lines = spool.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "start" and json.loads(lines[-1])["kind"] == "finish"
    backup = spool.read_text()
    with open(spool, "a") as f:
        f.write('{"kind": "metrics", "metr')  # a writer killed mid-line

    assert sync.sync_spool(embedded, sweep) == 1
    assert not list((sweep / config.SPOOL_DIR).iterdir())
    client = _client(embedded, sweep)
    run_id = store.find_runs_by_cell(embedded, sweep)["c1"].run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "3e-05"}
    assert run.data.tags[config.TAG_END_REASON] == "ok" and run.data.tags["dataset"] == "casme2"
    hist = client.get_metric_history(run_id, "train_loss")
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == losses

    spool.write_text(backup)  # replaying the same spool again adds nothing
    assert sync.sync_spool(embedded, sweep) == 1
    assert len(client.get_metric_history(run_id, "train_loss")) == 20
    assert list(store.find_runs_by_cell(embedded, sweep)) == ["c1"]
    assert sync.sync_spool(embedded, sweep) == 0


def test_sync_while_the_job_is_still_spooling(sweep: Path) -> None:
    embedded = config.TrackingConfig(None, "grid")
    store.prepare_store(embedded, sweep)
    logger = cell_logger.CellRunLogger(config.TrackingConfig(_down_uri(), "grid"), sweep, "c1")
    logger.start(params={"a": 1}, tags={})
    for epoch in range(5):
        logger.log_epoch(epoch, {"loss": float(epoch)})
    assert sync.sync_spool(embedded, sweep) == 1  # claims the file the job appends to
    run = store.find_runs_by_cell(embedded, sweep)["c1"]
    assert run.status == "RUNNING"
    for epoch in range(5, 10):
        logger.log_epoch(epoch, {"loss": float(epoch)})
    logger.finish("FINISHED")
    assert sync.sync_spool(embedded, sweep) == 1
    client = _client(embedded, sweep)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "loss")) == list(range(10))


def test_next_cell_skips_the_timeout_while_store_is_down(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    down = config.TrackingConfig(_down_uri(), "grid")
    cell_logger.CellRunLogger(down, sweep, "c1").start(params={}, tags={})
    caplog.set_level(logging.WARNING)
    caplog.clear()  # c1's own failure is not what this test is about
    second = cell_logger.CellRunLogger(down, sweep, "c2")
    second.start(params={}, tags={})
    # events, not a stopwatch: the second cell never made a client (so never dialled the
    # store), and its one warning names the earlier failure as the reason
    assert second.offline and second._client_obj is None
    warnings = [r.getMessage() for r in caplog.records if r.name == cell_logger.__name__]
    assert len(warnings) == 1 and "c2" in warnings[0] and "store unreachable moments ago" in warnings[0]
    assert (sweep / config.SPOOL_DIR / "c2.jsonl").exists()


@pytest.mark.slow
def test_hung_server_costs_one_bounded_wait(sweep: Path) -> None:
    """A server that accepts connections and never answers: the worst outage. The short
    timeout/retry settings bound it (5 s x 3 tries + backoff), once per cell."""
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        cfg = config.TrackingConfig(f"http://127.0.0.1:{hung.getsockname()[1]}", "grid")
        t0 = time.perf_counter()
        logger = cell_logger.CellRunLogger(cfg, sweep, "c1")
        logger.start(params={"lr": 1}, tags={})
        for epoch in range(50):
            logger.log_epoch(epoch, {"loss": float(epoch)})
        logger.finish("FINISHED")
        took = time.perf_counter() - t0
    print(f"logging one cell against a hung server: {took:.1f} s")
    assert logger.offline and took < 30
    assert (sweep / config.SPOOL_DIR / "c1.jsonl").exists()


# --------------------------------------------------------------------------- (c) reconcile

def test_reconcile_closes_runs_of_dead_cells(sweep: Path) -> None:
    cfg = config.TrackingConfig(None, "grid")
    store.prepare_store(cfg, sweep)
    # A logger that started and never finished leaves exactly what a job killed by Slurm
    # leaves: a RUNNING run (the concurrency test covers real separate processes).
    for cell in ("dead", "cancelled", "alive", "done"):
        abandoned = cell_logger.CellRunLogger(cfg, sweep, cell)
        abandoned.start(params={}, tags={})
        abandoned.log_epoch(0, {"loss": 1.0})
        abandoned.flush()
    runs = store.find_runs_by_cell(cfg, sweep)
    assert {c: r.status for c, r in runs.items()} == dict.fromkeys(runs, "RUNNING")

    states = {"dead": "TIMEOUT", "cancelled": "CANCELLED by 1234", "alive": "RUNNING",
              "done": "COMPLETED"}  # fmt: skip
    assert store.reconcile_runs(cfg, sweep, states) == 3
    after = store.find_runs_by_cell(cfg, sweep)
    assert {c: r.status for c, r in after.items()} == {
        "dead": "FAILED", "cancelled": "KILLED", "alive": "RUNNING", "done": "FINISHED",
    }  # fmt: skip
    assert after["dead"].tags[config.TAG_END_REASON] == "reconciled: cell state TIMEOUT"
    assert after["dead"].end_time is not None
    assert store.reconcile_runs(cfg, sweep, states) == 0  # second pass: nothing left to change
    assert store.reconcile_runs(cfg, sweep, {"alive": "FAILED"}) == 1


# --------------------------------------------------------------------------- (d) secrets


def test_redact_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-pw")
    monkeypatch.setenv("MY_API_KEY", "k3y-abcdef")
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to be a secret: "1" stays everywhere
    out = config.redact({
        "uri": "https://bob:hunter2-pw@mlflow.example/x", "n": 1, "nested": {"hf_token": "zz"},
        "cmd": ["--key", "k3y-abcdef"], "keyframes": "12",
    })  # fmt: skip
    assert out == {
        "uri": "https://bob:***@mlflow.example/x", "n": 1, "nested": {"hf_token": "***"},
        "cmd": ["--key", "***"], "keyframes": "12",
    }  # fmt: skip
    assert config.redact("postgresql://u:pw@db/mlflow") == "postgresql://u:***@db/mlflow"


def test_secret_values_never_reach_the_store_or_spool(
    sweep: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t-Value-9f8e7d"
    monkeypatch.setenv("AULLM_TEST_SECRET_TOKEN", secret)
    cfg = config.TrackingConfig(None, "grid")
    params = {"data_root": f"/data/{secret}/casme2", "hf_token": secret, "lr": 3e-5}
    tags = {"note": f"token={secret}", "dataset": "casme2"}
    logger = cell_logger.CellRunLogger(cfg, sweep, "c1")
    logger.start(params=params, tags=tags)
    logger.finish("FAILED", end_reason=f"OSError: cannot open /data/{secret}")
    run = _client(cfg, sweep).get_run(logger.run_id)
    stored = json.dumps({"p": run.data.params, "t": run.data.tags})
    assert secret not in stored
    assert run.data.params["data_root"] == "/data/***/casme2"
    assert run.data.params["hf_token"] == "***" and run.data.params["lr"] == "3e-05"
    assert run.data.tags[config.TAG_END_REASON] == "OSError: cannot open /data/***"

    offline = cell_logger.CellRunLogger(config.TrackingConfig(_down_uri(), "grid"), sweep, "c2")
    offline.start(params=params, tags=tags)
    offline.finish("FAILED", end_reason=secret)
    spooled = (sweep / config.SPOOL_DIR / "c2.jsonl").read_text()
    assert "data_root" in spooled and secret not in spooled


# --------------------------------------------------------------------------- (b) real server


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_server_outage_does_not_stop_training(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    with start_mlflow_server(tmp_path / "server") as server:
        print(f"mlflow server start-up: {server.startup_seconds:.1f} s")
        cfg = config.TrackingConfig(server.uri, "grid", flush_every=10)
        exp_id = store.prepare_store(cfg, sweep)

        online = cell_logger.CellRunLogger(cfg, sweep, "c1")
        online.start(params={"lr": 3e-5}, tags={"dataset": "casme2"})
        for epoch in range(50):
            online.log_epoch(epoch, {"train_loss": 1.0 / (epoch + 1)})
        online.finish("FINISHED")
        assert not online.offline

        server.stop()
        t0 = time.perf_counter()
        logger = cell_logger.CellRunLogger(cfg, sweep, "c2")
        logger.start(params={"lr": 1e-4}, tags={"dataset": "samm"})
        trained = 0
        for epoch in range(50):
            trained += 1
            logger.log_epoch(epoch, {"train_loss": 2.0 / (epoch + 1)})
        logger.finish("FINISHED", {"final_train_loss": 0.04})
        offline_s = time.perf_counter() - t0
        print(f"logging one cell with the server down: {offline_s:.2f} s")
        assert trained == 50 and logger.offline and offline_s < 15
        spool = sweep / config.SPOOL_DIR / "c2.jsonl"
        assert spool.exists()
        with pytest.raises(config.TrackingUnavailable):
            sync.sync_spool(cfg, sweep)  # still down: the file must survive
        assert spool.exists()

        t0 = time.perf_counter()
        server.restart()
        print(f"mlflow server restart: {time.perf_counter() - t0:.1f} s")
        assert sync.sync_spool(cfg, sweep) == 1
        assert not spool.exists()
        runs = store.find_runs_by_cell(cfg, sweep)
        assert sorted(runs) == ["c1", "c2"]
        c2 = runs["c2"]
        assert c2.status == "FINISHED" and c2.experiment_id == exp_id
        client = _client(cfg, sweep)
        assert len(client.get_metric_history(c2.run_id, "train_loss")) == 50
        assert client.get_run(c2.run_id).data.params == {"lr": "0.0001"}
        assert len(client.get_metric_history(runs["c1"].run_id, "train_loss")) == 50
