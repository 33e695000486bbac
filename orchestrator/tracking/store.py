"""MLflow tracking for the grid: one MLflow run per cell, never the only copy of anything.

The sweep directory is the ledger (DESIGN.md §3); MLflow is for people. So:

* Tracking must never kill training. `CellRunLogger` wraps every MLflow call; on the first
  failure (server down, sqlite locked after MLflow's 20 s busy timeout, ...) it goes offline
  for the rest of the cell and appends what it could not send to
  ``<sweep>/tracking-spool/<cell_id>.jsonl``. `sync_spool` replays those files later.
* A run left RUNNING by a killed job is not believed: `reconcile_runs` closes it from the
  scheduler's view of the cell.
* ``mlflow`` is imported inside functions only: ``aullm-grid status`` imports the orchestrator
  and must not pay the ~3 s import.

Orchestrator-side functions (`prepare_store`, `sync_spool`, `reconcile_runs`,
`find_runs_by_cell`) raise `TrackingUnavailable` when the store cannot be reached, so the
caller decides whether that matters; the job-side `CellRunLogger` never raises for it.

Runs of one sweep are found by the tag ``aullm.sweep_uid`` (a random id kept in
``<sweep>/mlflow/tracking.json``), not by the sweep's path, so several sweeps can share one
experiment on a shared server and a sweep directory can be moved or reached via symlinks.

Each group (dataset, LLM, variant) gets its parent run before its cells train
(`ensure_group_runs`, called by submit; ids kept in tracking.json), so a cell run is
created under its parent and the job records both ids in the cell's result file: the
collector then attaches 10,000 cell runs without one MLflow call per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aullm.errors import UserInputError

if TYPE_CHECKING:  # only for annotations; importing mlflow costs seconds
    from mlflow import MlflowClient

__all__ = [
    "EMBEDDED_DIR",
    "SPOOL_DIR",
    "KIND_GROUP",
    "TAG_CELL",
    "TAG_END_REASON",
    "TAG_GROUP",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_SWEEP_UID",
    "CellRunLogger",
    "RunStatus",
    "TrackedRun",
    "TrackingConfig",
    "TrackingUnavailable",
    "create_group_run",
    "ensure_group_runs",
    "find_group_runs",
    "find_runs_by_cell",
    "group_run_ids",
    "group_runs_lock",
    "latest_run_for_cell",
    "preload",
    "prepare_store",
    "reconcile_runs",
    "remember_group_runs",
    "redact",
    "resolve_uri",
    "sweep_uid",
    "sync_spool",
]

log = logging.getLogger(__name__)

EMBEDDED_DIR = "mlflow"  # <sweep>/mlflow/{mlflow.db, artifacts/, tracking.json}
SPOOL_DIR = "tracking-spool"
STATE_FILE = "tracking.json"

TAG_CELL = "cell_id"
TAG_SWEEP_UID = "aullm.sweep_uid"
TAG_END_REASON = "aullm.end_reason"
TAG_ATTEMPT = "aullm.attempt"
TAG_KIND = "aullm.kind"  # "cell" on cell runs (orchestrator.sweep.cells), "group" on their parents
KIND_GROUP = "group"
TAG_GROUP = "aullm.group"  # on both: one filter in the UI shows a group's parent and cells
TAG_PARENT = "mlflow.parentRunId"  # how the MLflow UI nests runs

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_TERMINAL: frozenset[str] = frozenset({"FINISHED", "FAILED", "KILLED"})

# Set around our own MLflow calls only, and only where the user has not set the variable.
# MLflow's HTTP defaults (7 retries, 120 s timeout) can stall a job for minutes per call when
# the server is gone; with these, connection refused costs ~2 s per call, a hung server ~15 s.
# The URL print ("View run ... at") would land in every job's stdout.
CALL_ENV: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

# After a logger in this process found the store unreachable, later loggers for the same URI
# start offline instead of paying the timeouts again (a job trains many cells in a row).
OFFLINE_RETRY_AFTER_S = 60.0
_last_failure: dict[str, float] = {}

# MLflow's batch limits (mlflow.utils.validation) and value-length limits.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000

# Scheduler states (Slurm's, plus generic words a status module may use) meaning "this cell's
# process is gone without finishing its run".
DEAD_STATES: frozenset[str] = frozenset(
    {
        "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
        "BOOT_FAIL", "DEADLINE", "REVOKED", "DEAD", "LOST", "ERROR",
    }
)  # fmt: skip
_KILLED_STATES: frozenset[str] = frozenset({"CANCELLED"})
_DONE_STATES: frozenset[str] = frozenset({"COMPLETED", "DONE", "FINISHED"})


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached or written (orchestrator side only)."""


# --------------------------------------------------------------------------- config


_URI_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "file", "databricks")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``uri=None`` is the embedded per-sweep sqlite store.

    ``flush_every`` / ``flush_seconds``: epoch metrics are sent in one ``log_batch`` every
    that many epochs or seconds, whichever comes first (350 single-metric calls per cell
    would cost more than the training step on a GPU).
    """

    uri: str | None = None
    experiment: str = "aullm-grid"
    flush_every: int = 25
    flush_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise UserInputError(
                f"tracking.experiment: {self.experiment!r} is not allowed; "
                "give a non-empty experiment name"
            )
        if self.uri is not None:
            text = self.uri if isinstance(self.uri, str) else ""
            scheme = text.split(":", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2
            if scheme not in _URI_SCHEMES or ":" not in text:
                raise UserInputError(
                    f"tracking.uri: {redact(str(self.uri))!r} is not a tracking URI; allowed: "
                    f"null (embedded store in the sweep directory) or one of "
                    f"{', '.join(s + '://...' for s in _URI_SCHEMES)}"
                )
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise UserInputError(
                f"tracking.flush_every: {self.flush_every!r} is not allowed; give an integer >= 1"
            )
        if not isinstance(self.flush_seconds, (int, float)) or self.flush_seconds <= 0:
            raise UserInputError(
                f"tracking.flush_seconds: {self.flush_seconds!r} is not allowed; give a number > 0"
            )


def _embedded_dir(sweep_dir: str | os.PathLike[str]) -> Path:
    return Path(sweep_dir).resolve() / EMBEDDED_DIR


def resolve_uri(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> str:
    """The tracking URI to use: ``cfg.uri``, or ``sqlite:///<sweep>/mlflow/mlflow.db``.

    ``MLFLOW_TRACKING_URI`` in the environment is deliberately ignored: where a sweep's runs
    go is part of the sweep file, not of whichever shell submitted it.
    """
    if cfg.uri is not None:
        return cfg.uri
    return "sqlite:///" + (_embedded_dir(sweep_dir) / "mlflow.db").as_posix()


def _is_embedded(cfg: TrackingConfig) -> bool:
    return cfg.uri is None


# --------------------------------------------------------------------------- redaction

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
# Mapping keys are judged more strictly than env var names: "keyframes" is a fine param name.
_SECRET_FIELD = re.compile(
    r"(^|[_.\-])(api_?key|access_?key|private_?key|secret|token|password|passwd|credentials?)"
    r"($|[_.\-])",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]+:)[^@/\s]+@")
# A secret shorter than this is not a secret worth the damage: replacing every "1" in every
# param because SOME_KEY=1 is set would corrupt the record.
_MIN_SECRET_LEN = 4


def _secret_values() -> list[str]:
    values = {
        v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def redact(value: Any) -> Any:
    """Replace secrets with ``***``: values of env vars named like a secret (``*TOKEN*``,
    ``*SECRET*``, ``*PASSWORD*``, ``*KEY*``, ``*CREDENTIAL*``, incl. ``MLFLOW_TRACKING_*``)
    wherever they occur, passwords in ``scheme://user:pass@host`` URLs, and the values of
    mapping keys such as ``api_key``, ``hf_token``, ``db.password``. Strings and (nested) mappings,
    lists and tuples are handled; other values pass through unchanged."""
    return _redact(value, _secret_values())


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "***")
        return _URL_USERINFO.sub(r"\1***@", value)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            secret_key = isinstance(k, str) and _SECRET_FIELD.search(k) is not None
            out[k] = "***" if secret_key and v not in (None, "") else _redact(v, secrets)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, secrets) for v in value)
    return value


# --------------------------------------------------------------------------- helpers

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def _clean_key(key: Any) -> str:
    """MLflow rejects a whole batch for one bad key; a bad key must not take the logger
    offline, so sanitise instead."""
    return _BAD_KEY_CHARS.sub("_", str(key)).strip() or "_"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configs become dotted keys (``train.lr``), which MLflow's UI can sort on."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _stringify(d: Mapping[str, Any], limit: int) -> dict[str, str]:
    flat = _flatten(d)
    out: dict[str, str] = {}
    for k, v in flat.items():
        s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
        out[_clean_key(k)] = s[:limit]
    return redact(out)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _to_float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text[:300]}")


@contextlib.contextmanager
def _call_env() -> Iterator[None]:
    """Apply CALL_ENV around MLflow calls and quieten urllib3's per-retry warnings (our own
    one-line warning says what happened).

    Scoped rather than set for the whole process so that other MLflow users in the same
    process (e.g. large artifact uploads by the collector) keep MLflow's own defaults.
    Not thread-safe; the orchestrator and job entry call us from one thread."""
    added = [k for k in CALL_ENV if k not in os.environ]
    for k in added:
        os.environ[k] = CALL_ENV[k]
    pool_log = logging.getLogger("urllib3.connectionpool")
    old_level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(old_level)
        for k in added:
            os.environ.pop(k, None)


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


def _q(value: str) -> str | None:
    """Quote a value for an MLflow filter string; None if it cannot be quoted safely."""
    return None if "'" in value or "\\" in value else f"'{value}'"


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
        state.setdefault("experiments", {})[key] = exp_id
        _write_state(sweep_dir, state)
        return exp_id


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


# --------------------------------------------------------------------------- spool


def _spool_dir(sweep_dir: str | os.PathLike[str]) -> Path:
    return Path(sweep_dir).resolve() / SPOOL_DIR


def _spool_name(cell_id: str) -> str:
    return re.sub(r"[^\w.\-]", "_", cell_id) + ".jsonl"


def _read_spool(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a killed writer leaves at most one torn line; skip it
        if isinstance(rec, dict):
            records.append(rec)
    return records


def sync_spool(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str]) -> int:
    """Replay every ``<sweep>/tracking-spool/*.jsonl`` into MLflow; returns the number of
    cells synced. Idempotent: the run is found by its cell tag (or created), only missing
    params and metric points (key, step, timestamp) are logged, and each file is deleted
    once replayed. A file is claimed by an atomic rename first, so a job still spooling
    into it starts a fresh file instead of losing lines, and two syncs never replay the
    same file at once. A file that fails stays for the next sync (a warning is logged).
    Raises `TrackingUnavailable` if the store cannot be reached at all."""
    spool = _spool_dir(sweep_dir)
    if not spool.is_dir():
        return 0
    pending = sorted(spool.glob("*.jsonl")) + sorted(spool.glob("*.syncing"))
    if not pending:
        return 0
    try:
        with _call_env():
            exp_id = _experiment_id(cfg, sweep_dir)
            client = _client(resolve_uri(cfg, sweep_dir))
            client.get_experiment(exp_id)  # an http client connects lazily: probe once
    except Exception as exc:
        raise TrackingUnavailable(f"cannot sync tracking spool: {_one_line(exc)}") from exc
    uid = _sweep_uid(sweep_dir)
    synced: set[str] = set()
    for path in pending:
        stem = path.name.split(".", 1)[0]
        claimed = path.with_name(f"{stem}.{uuid.uuid4().hex[:12]}.syncing")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue  # another sync took it
        try:
            with _call_env():
                cell = _replay(client, exp_id, uid, _read_spool(claimed))
            claimed.unlink()
            if cell:
                synced.add(cell)
        except Exception as exc:
            log.warning("tracking spool %s not synced, kept for next time: %s", claimed,
                        _one_line(exc))  # fmt: skip
    return len(synced)


def _replay(client: MlflowClient, exp_id: str, uid: str, records: list[dict[str, Any]]) -> str:
    from mlflow.entities import Metric, Param, RunTag

    starts = [r for r in records if r.get("kind") == "start"]
    finishes = [r for r in records if r.get("kind") == "finish"]
    if not starts:
        return ""
    cell_id = str(starts[0]["cell_id"])
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    for s in starts + finishes:
        params.update(s.get("params") or {})
        tags.update(s.get("tags") or {})
    tags[TAG_CELL] = cell_id
    tags[TAG_SWEEP_UID] = uid

    run = None
    run_id = next((s.get("run_id") for s in reversed(starts) if s.get("run_id")), None)
    if run_id:
        with contextlib.suppress(Exception):  # gone (deleted, other store): find by tag
            run = client.get_run(run_id)
            if run.info.lifecycle_stage != "active":
                run = None
    if run is None:
        run = latest_run_for_cell(client, exp_id, uid, cell_id)
    if run is None:
        run = client.create_run(
            exp_id, start_time=int(starts[0].get("start_time") or _now_ms()), tags=tags,
            run_name=cell_id,
        )  # fmt: skip
    run_id = run.info.run_id

    have_params = dict(run.data.params)
    new_params = [Param(k, v) for k, v in params.items() if k not in have_params]
    for chunk in _chunks(new_params, _MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    new_tags = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
    for chunk in _chunks(new_tags, _MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)

    points = [tuple(p) for r in records if r.get("kind") == "metrics" for p in r["metrics"]]
    seen: dict[str, set[tuple[int, int]]] = {}
    for key in {p[0] for p in points}:
        seen[key] = {(m.step, m.timestamp) for m in client.get_metric_history(run_id, key)}
    missing: list[Metric] = []
    for key, value, ts, step in points:
        if (int(step), int(ts)) not in seen[key]:
            seen[key].add((int(step), int(ts)))
            missing.append(Metric(key, float(value), int(ts), int(step)))
    for chunk in _chunks(missing, _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)

    if finishes:
        fin = finishes[-1]
        status = str(fin["status"])
        if client.get_run(run_id).info.status != status:
            end_ms = int(fin.get("end_time") or 0) or None
            client.set_terminated(run_id, status=status, end_time=end_ms)
    return cell_id


# --------------------------------------------------------------------------- job side


class CellRunLogger:
    """One cell's MLflow run, as seen from the job. Never raises because of MLflow.

    >>> logger = CellRunLogger(cfg, sweep_dir, cell_id)
    >>> logger.start(params=cell_params, tags={"dataset": ..., "fold": ...})
    >>> for epoch in ...: logger.log_epoch(epoch, {"train_loss": loss})
    >>> logger.finish("FINISHED", {"test_f1": f1})

    Also a context manager: leaving the block by an exception finishes FAILED
    (KILLED for KeyboardInterrupt/SystemExit) unless `finish` was already called.

    A run of the same cell (same sweep) that exists and is not FINISHED is resumed (status
    set back to RUNNING, tag ``aullm.attempt`` incremented) instead of duplicated; a
    FINISHED one means the cell is being re-run on purpose, and a new run is created.
    """

    def __init__(
        self, cfg: TrackingConfig, sweep_dir: str | os.PathLike[str], cell_id: str | None = None
    ) -> None:
        self.cfg = cfg
        self.sweep_dir = Path(sweep_dir).resolve()
        self.uri = resolve_uri(cfg, sweep_dir)
        self.cell_id: str | None = cell_id
        self.run_id: str | None = None
        self.parent_run_id: str | None = None  # the group's parent run this run is created under
        self.offline = False
        self.finished = False
        self._client_obj: MlflowClient | None = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._start_ms = 0
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, ts, step
        self._buffered_epochs = 0
        self._last_flush = time.monotonic()
        self._last_epoch = 0
        self._spool_ok = True

    # -- public API

    @property
    def spool_path(self) -> Path:
        return _spool_dir(self.sweep_dir) / _spool_name(self.cell_id or "unknown")

    def start(
        self,
        cell_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Open (or resume) the cell's run. ``cell_id`` here or in the constructor; it
        becomes the run name and the ``cell_id`` tag. Params and tags are flattened
        (``train.lr``), stringified and passed through `redact`."""
        cell_id = cell_id if cell_id is not None else self.cell_id
        if not cell_id:
            raise ValueError("CellRunLogger.start needs a cell_id (here or in the constructor)")
        self.cell_id = cell_id
        self._start_ms = _now_ms()
        self._params = _stringify(params or {}, _MAX_PARAM_LEN)
        self._tags = _stringify(tags or {}, _MAX_TAG_LEN)
        self._tags[TAG_CELL] = cell_id
        try:
            self._tags[TAG_SWEEP_UID] = _sweep_uid(self.sweep_dir)
        except Exception as exc:  # read-only or full disk, lock timeout: still train
            self._tags[TAG_SWEEP_UID] = "unknown"
            log.warning("tracking: cannot read sweep id in %s: %s", self.sweep_dir, exc)
        # Born under its group's parent run (made by submit): the collector then has
        # nothing to attach. In the tags, so a spooled run is replayed under it too.
        self.parent_run_id = group_run_ids(self.cfg, self.sweep_dir).get(self._tags.get(TAG_GROUP, ""))
        if self.parent_run_id:
            self._tags[TAG_PARENT] = self.parent_run_id
        failed_at = _last_failure.get(self.uri)
        if failed_at is not None and time.monotonic() - failed_at < OFFLINE_RETRY_AFTER_S:
            self._go_offline(None, "start")
            return
        self._call(self._start_online, "start")

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        ts = _now_ms()
        self._last_epoch = int(epoch)
        points = []
        for k, v in metrics.items():
            f = _to_float(v)
            if f is not None:
                points.append((_clean_key(k), f, ts, int(epoch)))
        if self.offline:
            self._spool({"kind": "metrics", "metrics": points})
            return
        self._buffer.extend(points)
        self._buffered_epochs += 1
        due = time.monotonic() - self._last_flush >= self.cfg.flush_seconds
        if self._buffered_epochs >= self.cfg.flush_every or due:
            self.flush()

    def flush(self) -> None:
        """Send buffered epoch metrics now (also done by `finish`)."""
        if self.offline or not self._buffer:
            return
        self._call(self._flush_online, "log metrics")

    def finish(
        self,
        status: RunStatus = "FINISHED",
        metrics: Mapping[str, Any] | None = None,
        *,
        end_reason: str | None = None,
    ) -> None:
        """Flush, log final ``metrics`` (at the last epoch's step) and close the run with
        ``status``. ``end_reason`` (e.g. ``preempted``, an error line) becomes the tag
        ``aullm.end_reason``, redacted. Idempotent: a second call does nothing."""
        if status not in _TERMINAL:  # a caller bug, not an MLflow failure: say so
            raise ValueError(f"status must be one of {sorted(_TERMINAL)}, got {status!r}")
        if self.finished:
            return
        self.finished = True
        if end_reason:
            self._tags[TAG_END_REASON] = redact(" ".join(end_reason.split()))[:_MAX_TAG_LEN]
        if metrics:
            # Final scores sit at the last epoch so they line up with the curves.
            ts = _now_ms()
            pts = [(_clean_key(k), f, ts, self._last_epoch) for k, v in metrics.items()
                   if (f := _to_float(v)) is not None]  # fmt: skip
            if self.offline:
                self._spool({"kind": "metrics", "metrics": pts})
            else:
                self._buffer.extend(pts)
        self.flush()
        end: dict[str, Any] = {"kind": "finish", "status": status, "end_time": _now_ms()}
        if end_reason:
            end["tags"] = {TAG_END_REASON: self._tags[TAG_END_REASON]}
        if self.offline:
            self._spool(end)
            return
        end_ms = int(end["end_time"])
        self._call(lambda: self._finish_online(status, end_ms, end_reason), "finish run")
        if self.offline:  # the finish call itself failed
            self._spool(end)

    def __enter__(self) -> CellRunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if self.finished or self.cell_id is None:
            return
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # -- online paths (may raise; always called through _call)

    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = _client(self.uri)
        return self._client_obj

    def _start_online(self) -> None:
        from mlflow.entities import Param, RunTag

        assert self.cell_id is not None
        exp_id = _experiment_id(self.cfg, self.sweep_dir)  # first: it may create the store
        client = self._client()
        uid = self._tags[TAG_SWEEP_UID]
        prior = latest_run_for_cell(client, exp_id, uid, self.cell_id)
        if prior is not None and prior.info.status != "FINISHED":
            self.run_id = prior.info.run_id
            attempt = int(prior.data.tags.get(TAG_ATTEMPT, "1")) + 1
            client.update_run(self.run_id, status="RUNNING")
            if TAG_END_REASON in prior.data.tags:  # from the attempt that ended; not ours
                client.delete_tag(self.run_id, TAG_END_REASON)
            have = dict(prior.data.params)
            params = [Param(k, v) for k, v in self._params.items() if k not in have]
            tags = [RunTag(k, v) for k, v in self._tags.items()]
            tags.append(RunTag(TAG_ATTEMPT, str(attempt)))
        else:
            run = client.create_run(
                exp_id, start_time=self._start_ms, tags={**self._tags, TAG_ATTEMPT: "1"},
                run_name=self.cell_id,
            )  # fmt: skip
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in self._params.items()]
            tags = []
        for chunk in _chunks(params, _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(tags, _MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, tags=chunk)

    def _flush_online(self) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("no MLflow run")  # start() never got through: spool instead
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in self._buffer]
        for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
            self._client().log_batch(self.run_id, metrics=chunk)
        self._buffer.clear()
        self._buffered_epochs = 0
        self._last_flush = time.monotonic()

    def _finish_online(self, status: str, end_ms: int, end_reason: str | None) -> None:
        if self.run_id is None:
            raise RuntimeError("no MLflow run")
        if end_reason:
            self._client().set_tag(self.run_id, TAG_END_REASON, self._tags[TAG_END_REASON])
        self._client().set_terminated(self.run_id, status=status, end_time=end_ms)

    # -- failure handling

    def _call(self, fn: Any, what: str) -> None:
        if self.offline:
            return
        try:
            with _call_env():
                fn()
        except Exception as exc:  # any failure of tracking is not a failure of training
            self._go_offline(exc, what)

    def _go_offline(self, exc: BaseException | None, what: str) -> None:
        self.offline = True
        reason = _one_line(exc) if exc is not None else "store unreachable moments ago"
        if exc is not None:
            _last_failure[self.uri] = time.monotonic()
        log.warning(
            "MLflow %s failed for cell %s (%s); tracking offline for this cell, spooling to %s; "
            "training continues", what, self.cell_id, reason, self.spool_path,
        )  # fmt: skip
        if self._buffer:
            self._spool({"kind": "metrics", "metrics": list(self._buffer)})
            self._buffer.clear()
            self._buffered_epochs = 0
        else:
            self._spool(None)  # at least the header: params and tags are not lost

    def _spool(self, record: dict[str, Any] | None) -> None:
        if not self._spool_ok:
            return
        path = self.spool_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            # Every fragment is self-contained: sync_spool may have claimed (renamed) the
            # file we were appending to.
            if not path.exists() or path.stat().st_size == 0:
                header = {
                    "kind": "start", "cell_id": self.cell_id, "run_id": self.run_id,
                    "experiment": self.cfg.experiment, "start_time": self._start_ms,
                    "params": self._params, "tags": self._tags,
                }  # fmt: skip
                lines.append(json.dumps(header))
            if record is not None:
                lines.append(json.dumps(record))
            if lines:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
        except OSError as exc:
            self._spool_ok = False
            log.warning("tracking spool %s not writable (%s); dropping MLflow data for cell %s "
                        "(results are unaffected)", path, exc, self.cell_id)  # fmt: skip
