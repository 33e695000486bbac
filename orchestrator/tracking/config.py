"""Tracking settings and the rules every MLflow call follows: `TrackingConfig` and the store URI,
tag names, redaction of secrets, value limits, and the scoped call environment.

Shared by both sides; imports no mlflow at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from aullm.errors import UserInputError



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


def ui_command(cfg: TrackingConfig, sweep_dir: str | os.PathLike[str], experiment_id: str | None = None) -> str:
    """What a person runs (or opens) to see a sweep's runs: `mlflow ui` on the embedded
    store, else the server's experiment page (credentials redacted)."""
    import shlex

    if cfg.uri is None:
        return f"mlflow ui --backend-store-uri {shlex.quote(resolve_uri(cfg, sweep_dir))} --port 5000"
    if cfg.uri.split(":", 1)[0].lower() in ("http", "https"):
        page = cfg.uri.rstrip("/") + (f"/#/experiments/{experiment_id}" if experiment_id else "")
        return f"open {redact(page)}"
    return f"mlflow ui --backend-store-uri {shlex.quote(str(redact(cfg.uri)))} --port 5000"


def _is_embedded(cfg: TrackingConfig) -> bool:
    return cfg.uri is None


# --------------------------------------------------------------------------- redaction

# Credentials only: a name is a secret by the words it is made of, not by a substring, so
# training settings such as `token_position`, `max_tokens` or `tokenizer_path` stay visible
# (MLflow once showed every cell's `token_position` as ***), and so does the value of
# TOKENIZERS_PARALLELISM, which would otherwise be scrubbed from every param it appears in.
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# a word that makes any name a credential
_SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "pwd", "secret", "secrets", "credential", "credentials",
    "apikey", "accesskey", "secretkey", "privatekey", "authorization", "bearer", "jwt", "cookie",
})  # fmt: skip
# "<word> key" is a credential after these words (api_key, AWS_ACCESS_KEY, ssh_private_key),
# not after others (sort_key, cache_key, keyframes)
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "client", "signing", "encryption", "ssh", "auth", "license", "master", "account"})
# "<word> token" is a credential after these (HF_TOKEN, MLFLOW_TRACKING_TOKEN, access_token),
# and "token" alone is one; pad_token, visual_token, token_position are not
_TOKEN_QUALIFIERS = frozenset({
    "hf", "hub", "huggingface", "auth", "oauth", "access", "refresh", "bearer", "api", "session", "id",
    "github", "gh", "gitlab", "slack", "wandb", "tracking", "personal", "security", "csrf", "pat", "slurm",
    "login", "user", "service", "bot", "secret", "private",
})  # fmt: skip


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.split(name) if w]


def is_secret_name(name: str) -> bool:
    """Whether a field or environment variable named `name` holds a credential (an API key,
    a password, an authentication token) whose value must never be written anywhere."""
    words = _words(name)
    if not words:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    for before, word in zip([""] + words, words):
        if word == "key" and before in _KEY_QUALIFIERS:
            return True
        if word == "token" and (before in _TOKEN_QUALIFIERS or len(words) == 1):
            return True
    return False


_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]+:)[^@/\s]+@")
# A secret shorter than this is not a secret worth the damage: replacing every "1" in every
# param because SOME_KEY=1 is set would corrupt the record.
_MIN_SECRET_LEN = 4


def _secret_values() -> list[str]:
    values = {
        v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def redact(value: Any) -> Any:
    """Replace credentials with ``***``: values of env vars whose name `is_secret_name`
    (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ``WANDB_API_KEY``) wherever they occur,
    passwords in ``scheme://user:pass@host`` URLs, and the values of mapping keys that
    `is_secret_name` (``api_key``, ``hf_token``, ``db.password``); nothing else. Strings and (nested) mappings,
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
            secret_key = isinstance(k, str) and is_secret_name(k)
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


def _q(value: str) -> str | None:
    """Quote a value for an MLflow filter string; None if it cannot be quoted safely."""
    return None if "'" in value or "\\" in value else f"'{value}'"
