"""Replaying the tracking spool into MLflow, orchestrator side: raises `TrackingUnavailable`
when the store cannot be reached at all, keeps a file that fails for the next sync.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from orchestrator.tracking.config import _call_env, _chunks, _MAX_METRICS_PER_BATCH, _MAX_PARAMS_TAGS_PER_BATCH, _now_ms, _one_line, resolve_uri, TAG_CELL, TAG_SWEEP_UID, TrackingConfig, TrackingUnavailable
from orchestrator.tracking.spool import _read_spool, _spool_dir
from orchestrator.tracking.store import _client, _experiment_id, latest_run_for_cell, _sweep_uid

if TYPE_CHECKING:  # only for annotations; importing mlflow costs seconds
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


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
