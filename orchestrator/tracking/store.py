"""The tracking store, orchestrator side: sweep id, experiment, `prepare_store`, run lookups,
group (parent) runs and `reconcile_runs`. Raises `TrackingUnavailable` when the store cannot
be reached; the caller decides whether that matters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.config import _call_env, DEAD_STATES, _DONE_STATES, _embedded_dir, _is_embedded, _KILLED_STATES, KIND_GROUP, _MAX_TAG_LEN, _now_ms, _one_line, _q, redact, resolve_uri, STATE_FILE, _stringify, TAG_CELL, TAG_END_REASON, TAG_GROUP, TAG_KIND, TAG_SWEEP_UID, TrackingConfig, TrackingUnavailable

if TYPE_CHECKING:  # only for annotations; importing mlflow costs seconds
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the client


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def preload() -> None:
    """Import mlflow's client now rather than at the first call (3-8 s on a busy node).

    For a caller with idle time before it needs MLflow: `collect` calls it while its plot
    workers draw. Never raises: the call that needs MLflow reports what is wrong with it."""
    try:
        from mlflow import MlflowClient  # noqa: F401
        from mlflow.entities import Metric, Param, RunTag  # noqa: F401
    except Exception:  # noqa: BLE001
        return


# --------------------------------------------------------------------------- sweep state


def _state_path(sweep_dir: str | os.PathLike[str]) -> Path:
    return _embedded_dir(sweep_dir) / STATE_FILE


def _read_state(sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(_state_path(sweep_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(sweep_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    path = _state_path(sweep_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: readers never see half a file


def _lock(sweep_dir: str | os.PathLike[str]) -> Any:
    from filelock import FileLock

    d = _embedded_dir(sweep_dir)
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / ".prepare.lock"), timeout=600)


def _sweep_uid(sweep_dir: str | os.PathLike[str]) -> str:
    uid = _read_state(sweep_dir).get("sweep_uid")
    if isinstance(uid, str) and uid:
        return uid
    with _lock(sweep_dir):
        state = _read_state(sweep_dir)
        if not state.get("sweep_uid"):
            state["sweep_uid"] = uuid.uuid4().hex
            _write_state(sweep_dir, state)
        return str(state["sweep_uid"])


def sweep_uid(sweep_dir: str | os.PathLike[str]) -> str:
    """The sweep's id in MLflow (tag ``aullm.sweep_uid``), created on first use and kept in
    ``<sweep>/mlflow/tracking.json``. Scope searches with it when several sweeps share an
    experiment (the collector's summary runs do)."""
    return _sweep_uid(sweep_dir)


def _state_key(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> str:
    return f"{redact(resolve_uri(cfg, sweep_dir))}#{cfg.experiment}"


def _get_or_create_experiment(
    client: MlflowClient, cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]
) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            # Someone deleted it in the UI; a new one with the same name is impossible.
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    artifact_location = None
    if _is_embedded(cfg):
        artifacts = _embedded_dir(sweep_dir) / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        artifact_location = artifacts.as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:
        # Another process created it between our lookup and our create (shared server).
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _experiment_id(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> str:
    """The experiment id, from tracking.json when submit prepared this store; otherwise
    prepared here under the sweep's file lock (concurrent first use of a fresh sqlite store
    corrupts it, see docs/mlflow.md). Call it BEFORE creating a client: an MlflowClient on
    a missing sqlite file creates and migrates it on the spot, outside any lock."""
    state = _read_state(sweep_dir)
    exp_id = state.get("experiments", {}).get(_state_key(cfg, sweep_dir))
    store_gone = _is_embedded(cfg) and not (_embedded_dir(sweep_dir) / "mlflow.db").exists()
    if isinstance(exp_id, str) and not store_gone:
        return exp_id
    return _prepare_locked(cfg, sweep_dir)


def _prepare_locked(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> str:
    with _lock(sweep_dir):
        state = _read_state(sweep_dir)
        key = _state_key(cfg, sweep_dir)
        state.setdefault("sweep_uid", uuid.uuid4().hex)
        if _is_embedded(cfg):
            (_embedded_dir(sweep_dir) / "artifacts").mkdir(parents=True, exist_ok=True)
            _install_template_db(_embedded_dir(sweep_dir) / "mlflow.db")
        # Creating the client runs the schema migration of a fresh sqlite store (unless the
        # template above put a migrated one in place).
        exp_id = _get_or_create_experiment(_client(resolve_uri(cfg, sweep_dir)), cfg, sweep_dir)
        if _is_embedded(cfg) and cfg.experiment != "Default":
            _hide_default_experiment(_embedded_dir(sweep_dir))
        state.setdefault("experiments", {})[key] = exp_id
        _write_state(sweep_dir, state)
        return exp_id


def _hide_default_experiment(embedded: Path) -> None:
    """MLflow creates a `Default` experiment in every new sqlite store, its artifacts under
    ./mlruns of whichever directory the store was first opened from. Nothing of ours logs
    there: mark it deleted and point it into the sweep, so the UI shows the sweep's
    experiment alone and nothing refers to a stranger's working directory. Best effort."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(embedded / "mlflow.db", timeout=30)) as db, db:
            db.execute(
                "UPDATE experiments SET lifecycle_stage = 'deleted', artifact_location = ? "
                "WHERE experiment_id = 0 AND name = 'Default'",
                ((embedded / "artifacts" / "0").as_uri(),),
            )
    except sqlite3.Error as exc:
        log.debug("Default experiment of %s left as it is: %s", embedded, exc)


def _cache_dir() -> Path:
    env = os.environ.get("AULLM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aullm-grid"


def _install_template_db(db_path: Path) -> None:
    """Put an already-migrated empty sqlite store at ``db_path`` if there is none.

    MLflow creates a fresh sqlite store by running its whole Alembic migration chain: 5-9 s
    on an idle 2-core machine, 30 s under load, paid by every new sweep (and every test that
    submits one). The migrated empty database is the same for one MLflow version, so it is
    built once per machine/user into the cache dir and copied. Any failure here just leaves
    the slow path to MLflow."""
    if db_path.exists():
        return
    try:
        import mlflow
        from filelock import FileLock

        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        template = cache / f"mlflow-{mlflow.__version__}-empty.db"
        with FileLock(str(template) + ".lock", timeout=600):
            if not template.exists():
                building = template.with_name(f".{template.name}.{os.getpid()}.tmp")
                building.unlink(missing_ok=True)
                _client("sqlite:///" + building.as_posix()).search_experiments(max_results=1)
                os.replace(building, template)
        tmp = db_path.with_name(f".{db_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, db_path)
    except Exception as exc:  # the cache is an optimisation only
        log.debug("no sqlite template for %s: %s", db_path, exc)


# --------------------------------------------------------------------------- orchestrator side


def prepare_store(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> str:
    """Create the store (sqlite schema) and the experiment once, before fan-out; idempotent.

    Returns the experiment id. Concurrent callers are serialised by a file lock in
    ``<sweep>/mlflow/``. Raises `TrackingUnavailable` if the store cannot be reached."""
    try:
        with _call_env():
            return _prepare_locked(cfg, sweep_dir)
    except Exception as exc:  # mlflow, sqlalchemy, requests: all mean "not reachable"
        raise TrackingUnavailable(
            f"MLflow store {redact(resolve_uri(cfg, sweep_dir))} not usable: {_one_line(exc)}"
        ) from exc


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """What the orchestrator needs to know about a cell's MLflow run (no mlflow types)."""

    run_id: str
    cell_id: str
    status: str  # RUNNING | SCHEDULED | FINISHED | FAILED | KILLED
    start_time: int | None  # ms since epoch
    end_time: int | None
    experiment_id: str
    tags: dict[str, str]


def _search(
    client: MlflowClient, exp_id: str, sweep_uid: str, *, cell_id: str | None = None,
    status: str | None = None, kind: str | None = None, oldest_first: bool = False,
) -> list[Any]:  # fmt: skip
    """This sweep's active runs (with that cell tag, status, `aullm.kind`), every page."""
    from mlflow.entities import ViewType

    clauses = [f"tags.`{TAG_SWEEP_UID}` = '{sweep_uid}'"]
    quoted = _q(cell_id) if cell_id is not None else None
    if quoted is not None:
        clauses.append(f"tags.`{TAG_CELL}` = {quoted}")
    if status is not None:
        clauses.append(f"attributes.status = '{status}'")
    if kind is not None:
        clauses.append(f"tags.`{TAG_KIND}` = '{kind}'")
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string=" and ".join(clauses),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=[f"attributes.start_time {'ASC' if oldest_first else 'DESC'}"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    if cell_id is not None and quoted is None:  # could not filter server-side
        runs = [r for r in runs if r.data.tags.get(TAG_CELL) == cell_id]
    return runs


def latest_run_for_cell(
    client: MlflowClient, exp_id: str, sweep_uid: str, cell_id: str
) -> Any | None:
    """The cell's most recently started run in this sweep, or None (one search)."""
    runs = _search(client, exp_id, sweep_uid, cell_id=cell_id)
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def _tracked(run: Any) -> TrackedRun:
    return TrackedRun(
        run_id=run.info.run_id,
        cell_id=run.data.tags.get(TAG_CELL, ""),
        status=run.info.status,
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        experiment_id=str(run.info.experiment_id),
        tags=dict(run.data.tags),
    )


def find_runs_by_cell(
    cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]
) -> dict[str, TrackedRun]:
    """This sweep's runs, one per cell (the most recently started when a cell was re-run)."""
    try:
        with _call_env():
            exp_id = _experiment_id(cfg, sweep_dir)
            client = _client(resolve_uri(cfg, sweep_dir))
            runs = _search(client, exp_id, _sweep_uid(sweep_dir))
    except Exception as exc:
        raise TrackingUnavailable(f"cannot list MLflow runs: {_one_line(exc)}") from exc
    out: dict[str, TrackedRun] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        t = _tracked(r)
        if t.cell_id:
            out[t.cell_id] = t  # later start wins
    return out


# --------------------------------------------------------------------------- group (parent) runs

_GROUP_LOCKS: dict[str, Any] = {}


def group_runs_lock(sweep_dir: str | os.PathLike[str]) -> Any:
    """The lock under which a sweep's parent runs are looked up and created.

    Two processes (submit and the Slurm collector, or two collects) would both find no
    parent and both create one. One re-entrant FileLock per lock file in this process, so
    `log_group_runs` can hold it around `ensure_group_runs`."""
    from filelock import FileLock

    d = _embedded_dir(sweep_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / ".group_runs.lock")
    if path not in _GROUP_LOCKS:
        _GROUP_LOCKS[path] = FileLock(path, timeout=600)
    return _GROUP_LOCKS[path]


def find_group_runs(client: MlflowClient, experiment_id: str, sweep_uid: str) -> dict[str, list[Any]]:
    """group id -> this sweep's active parent runs of that group, oldest first."""
    out: dict[str, list[Any]] = {}
    for r in _search(client, experiment_id, sweep_uid, kind=KIND_GROUP, oldest_first=True):
        gid = r.data.tags.get(TAG_GROUP)
        if gid:
            out.setdefault(gid, []).append(r)
    return out


def create_group_run(client: MlflowClient, experiment_id: str, sweep_uid: str, group_id: str,
                     tags: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    """A new parent run for `group_id`, with the tags `find_group_runs` finds it by."""
    return client.create_run(experiment_id, run_name=group_id, tags={
        **_stringify(tags or {}, _MAX_TAG_LEN), TAG_KIND: KIND_GROUP, TAG_GROUP: group_id, TAG_SWEEP_UID: sweep_uid,
    })  # fmt: skip


def group_run_ids(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> dict[str, str]:
    """group id -> its parent run in this store, as tracking.json records it (no MLflow call).

    What a job reads to create its cell run under the parent. A parent deleted in the UI
    stays recorded until the next collect makes a new one and records that instead."""
    runs = (_read_state(sweep_dir).get("group_runs") or {}).get(_state_key(cfg, sweep_dir))
    return {str(g): str(r) for g, r in runs.items()} if isinstance(runs, dict) else {}


def remember_group_runs(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str], runs: Mapping[str, str]) -> None:
    """Record parent run ids in tracking.json (merged with those already there)."""
    key = _state_key(cfg, sweep_dir)
    if all(group_run_ids(cfg, sweep_dir).get(g) == r for g, r in runs.items()):
        return
    with _lock(sweep_dir):
        state = _read_state(sweep_dir)
        recorded = state.setdefault("group_runs", {}).setdefault(key, {})
        recorded.update(runs)
        _write_state(sweep_dir, state)


def ensure_group_runs(
    cfg: TrackingConfig, sweep_dir: str | os.PathLike[str], groups: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """A parent run for every group in `groups` (group id -> tags for a new parent), made
    before the group's cells start so that each cell run is born under it; returns
    group id -> parent run id, also recorded in tracking.json. Groups already recorded
    cost no MLflow call; the others are looked up (one search) and created if missing.
    Raises `TrackingUnavailable` when the store cannot be reached."""
    known = group_run_ids(cfg, sweep_dir)
    missing = [g for g in groups if g not in known]
    if not missing:
        return known
    try:
        with _call_env(), group_runs_lock(sweep_dir):
            exp_id = _experiment_id(cfg, sweep_dir)
            client = _client(resolve_uri(cfg, sweep_dir))
            uid = _sweep_uid(sweep_dir)
            existing = find_group_runs(client, exp_id, uid)
            made: dict[str, str] = {}
            for gid in missing:
                runs = existing.get(gid) or [create_group_run(client, exp_id, uid, gid, groups[gid])]
                made[gid] = runs[0].info.run_id
            remember_group_runs(cfg, sweep_dir, made)
    except Exception as exc:
        raise TrackingUnavailable(f"cannot create the group runs: {_one_line(exc)}") from exc
    return {**known, **made}


def reconcile_runs(
    cfg: TrackingConfig, sweep_dir: str | os.PathLike[str], cell_states: Mapping[str, str]
) -> int:
    """Close runs still RUNNING whose cell the scheduler/ledger knows is over.

    Dead states (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, ...) -> FAILED,
    CANCELLED -> KILLED, COMPLETED/DONE -> FINISHED (the result file is the truth; the job
    died after writing it). Other states (PENDING, RUNNING, unknown) leave the run alone.
    Sacct spellings such as ``CANCELLED by 123`` or ``CANCELLED+`` are understood.
    Sets tag ``aullm.end_reason``; returns how many runs changed. Call `sync_spool` first:
    a spool may hold the real final status."""
    try:
        with _call_env():
            exp_id = _experiment_id(cfg, sweep_dir)
            client = _client(resolve_uri(cfg, sweep_dir))
            running = _search(client, exp_id, _sweep_uid(sweep_dir), status="RUNNING")
            changed = 0
            for run in running:
                cell = run.data.tags.get(TAG_CELL)
                raw = cell_states.get(cell) if cell is not None else None
                if not raw:
                    continue
                state = raw.split()[0].rstrip("+").upper()
                if state in _KILLED_STATES:
                    new = "KILLED"
                elif state in DEAD_STATES:
                    new = "FAILED"
                elif state in _DONE_STATES:
                    new = "FINISHED"
                else:
                    continue
                client.set_tag(run.info.run_id, TAG_END_REASON, f"reconciled: cell state {raw}")
                client.set_terminated(run.info.run_id, status=new, end_time=_now_ms())
                changed += 1
    except Exception as exc:
        raise TrackingUnavailable(f"cannot reconcile MLflow runs: {_one_line(exc)}") from exc
    return changed
