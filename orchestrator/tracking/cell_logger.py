"""One cell's MLflow run as the job sees it: `CellRunLogger` never raises because of MLflow.
On the first failure it goes offline for the rest of the cell and spools what it could not send.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.config import _call_env, _chunks, _clean_key, _MAX_METRICS_PER_BATCH, _MAX_PARAM_LEN, _MAX_PARAMS_TAGS_PER_BATCH, _MAX_TAG_LEN, _now_ms, _one_line, redact, resolve_uri, RunStatus, _stringify, TAG_ATTEMPT, TAG_CELL, TAG_END_REASON, TAG_GROUP, TAG_PARENT, TAG_SWEEP_UID, _TERMINAL, _to_float, TrackingConfig
from orchestrator.tracking.spool import _spool_dir, _spool_name
from orchestrator.tracking.store import _client, _experiment_id, group_run_ids, latest_run_for_cell, _sweep_uid

if TYPE_CHECKING:  # only for annotations; importing mlflow costs seconds
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# After a logger in this process found the store unreachable, later loggers for the same URI
# start offline instead of paying the timeouts again (a job trains many cells in a row).
OFFLINE_RETRY_AFTER_S = 60.0
_last_failure: dict[str, float] = {}


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

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload one file to the run (the cell's predictions). Skipped while offline: the
        file stays in the sweep directory, which is the record; MLflow's copy is a convenience."""
        if self.offline or self.run_id is None:
            return
        run_id = self.run_id
        self._call(lambda: self._client().log_artifact(run_id, str(path), artifact_path), "log artifact")

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
