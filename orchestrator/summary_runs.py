"""MLflow summary runs: one parent run per group, with that group's cell runs as children.

In the MLflow UI a sweep then reads as a tree: each group (dataset or cross-domain pair,
LLM, variant) is a parent run carrying the pooled per-AU and average F1 as metrics,
and its cell runs (one per fold and seed, with their loss curves) fold out under it.
Selecting parents and pressing "Compare" puts LLMs and variants side by side.

Idempotent by construction: a parent is found again by its tags (``aullm.kind=group``,
``aullm.group=<id>``, ``aullm.sweep_uid=<this sweep>``), never created twice; metrics are
logged only when their value changed (the latest value is what the UI shows); params
hold only what never changes for a group; artifacts are overwritten in place; the
children's ``mlflow.parentRunId`` tag is set only where it is not already right.

The parent runs are for people. The record is the sweep directory and the tables that
`collect` writes there; nothing here is read back by the grid.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aullm.metrics import HEADLINE_PROTOCOL, PROTOCOLS

from orchestrator.collect import GroupResult, Stat

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from orchestrator.tables import Table
    from orchestrator.tracking import TrackingConfig

__all__ = [
    "TAG_GROUP",
    "TAG_KIND",
    "SummaryRunsReport",
    "as_tracking_config",
    "find_group_runs",
    "group_metrics",
    "log_group_runs",
]

TAG_KIND = "aullm.kind"  # "cell" on cell runs (orchestrator.cells), "group" here
KIND_GROUP = "group"
TAG_GROUP = "aullm.group"  # the same value the cell runs carry: one filter shows both
TAG_STATUS = "aullm.group_status"
TAG_PARENT = "mlflow.parentRunId"  # how the MLflow UI nests runs
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI
ARTIFACT_DIR = "results"


@dataclass
class SummaryRunsReport:
    experiment_id: str
    parents: dict[str, str] = field(default_factory=dict)  # group id -> run id
    created: int = 0
    children_linked: int = 0
    children_missing: int = 0  # cells of the groups without an MLflow run (yet)
    duplicates_removed: int = 0

    def describe(self) -> str:
        text = (f"MLflow: {len(self.parents)} group runs ({self.created} new), "
                f"{self.children_linked} cell runs attached")  # fmt: skip
        if self.children_missing:
            text += f", {self.children_missing} cells without a run"
        if self.duplicates_removed:
            text += f", {self.duplicates_removed} duplicate group runs removed"
        return text


# --------------------------------------------------------------------------- metrics


def _au_key(column: str) -> str:
    return "avg" if column == "Avg" else column  # f1_avg, f1_AU1, ...


def group_metrics(group: GroupResult, paper: Mapping[str, float] | None = None) -> dict[str, float]:
    """The parent run's metrics, F1 in percent, for a complete group (empty otherwise).

    Headline keys are unprefixed (``f1_avg``, ``f1_AU12``, ``*_std``) so they sort first
    in the UI; the other protocols are prefixed (``paper_compatible.f1_avg``), and the
    paper's figures, where the tables have one, are ``paper.f1_*``. '@' is not allowed in
    MLflow keys, hence no protocol name in the headline keys.
    """
    if not group.complete:
        return {}
    out: dict[str, float] = {}
    for proto in PROTOCOLS:
        summ = group.summary[proto]
        prefix = "" if proto == HEADLINE_PROTOCOL else f"{proto}."
        items: list[tuple[str, Stat]] = [(f"AU{a}", s) for a, s in summ.per_au.items()] + [("Avg", summ.average)]
        for col, s in items:
            out[f"{prefix}f1_{_au_key(col)}"] = s.mean
            out[f"{prefix}f1_{_au_key(col)}_std"] = s.std
    for col, value in (paper or {}).items():
        out[f"paper.f1_{_au_key(col)}"] = float(value)
    out["n_seeds"] = float(len(group.seeds))
    out["n_samples"] = float(group.n_samples)
    return out


def paper_figures_by_group(tables: Sequence[Table]) -> dict[str, dict[str, float]]:
    """group id -> {column: the paper's figure} as the tables paired them (Table 3 gives
    only the average, under the LLM's column: it becomes ``Avg``)."""
    out: dict[str, dict[str, float]] = {}
    for t in tables:
        for s in t.sections:
            for b in s.blocks:
                for col, e in b.entries.items():
                    if e.group and e.paper is not None:
                        key = "Avg" if t.key == "table3_ablation" else col
                        out.setdefault(e.group, {}).setdefault(key, e.paper)
    return out


# --------------------------------------------------------------------------- MLflow


def _filter(uid: str, group_id: str | None = None) -> str:
    clauses = [f"tags.`aullm.sweep_uid` = '{uid}'", f"tags.`{TAG_KIND}` = '{KIND_GROUP}'"]
    if group_id is not None and "'" not in group_id:
        clauses.append(f"tags.`{TAG_GROUP}` = '{group_id}'")
    return " and ".join(clauses)


def find_group_runs(client: MlflowClient, experiment_id: str, sweep_uid: str) -> dict[str, list[Any]]:
    """group id -> this sweep's parent runs of that group, oldest first."""
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=_filter(sweep_uid), run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            break
    out: dict[str, list[Any]] = {}
    for r in runs:
        gid = r.data.tags.get(TAG_GROUP)
        if gid:
            out.setdefault(gid, []).append(r)
    return out


def _note(group: GroupResult) -> str:
    lines = [f"**{group.key.id}** — {group.status}; {len(group.seeds)} seed(s), {len(group.folds)} fold(s)."]
    if group.complete:
        for proto in PROTOCOLS:
            a = group.summary[proto].average
            lines.append(f"- {proto}{' (leaky)' if proto == 'paper_compatible' else ''}: avg F1 {a.mean:.1f} ± {a.std:.1f} %")
    else:
        lines.append(f"- not scored: {group.missing_text()}")
    lines.append("\nHeadline: pooled_binary@0.5. Tables: artifacts/results/tables.md. See docs/results.md.")
    return "\n".join(lines)


def _artifacts_for(group: GroupResult, tables_dir: Path | None) -> list[Path]:
    if tables_dir is None or not tables_dir.is_dir():
        return []
    wanted = ["tables.md", "groups.csv", f"f1_per_au_{group.key.data}.png", f"per_subject_{group.key.data}.png"]
    if group.key.kind == "loso":
        wanted.append("ablation.png")
    return [tables_dir / w for w in wanted if (tables_dir / w).is_file()]


def as_tracking_config(cfg: Any) -> TrackingConfig:
    """A `TrackingConfig` from one, or from the manifest's ``{uri, experiment}`` mapping."""
    from orchestrator.tracking import TrackingConfig

    if isinstance(cfg, TrackingConfig):
        return cfg
    known = set(TrackingConfig.__dataclass_fields__)
    return TrackingConfig(**{k: v for k, v in dict(cfg).items() if k in known and v is not None})


def log_group_runs(
    cfg: TrackingConfig | Mapping[str, Any],
    sweep_dir: str | os.PathLike[str],
    groups: Sequence[GroupResult],
    tables_dir: str | os.PathLike[str] | None = None,
    *,
    tables: Sequence[Table] | None = None,
    sweep_name: str = "",
) -> SummaryRunsReport:
    """Create or update one parent run per group and hang the group's cell runs under it.

    `tables_dir`: where collect wrote the tables and plots (logged as artifacts under
    ``results/``). Raises `orchestrator.tracking.TrackingUnavailable` (or MLflow's own
    errors) when the store cannot be used; `collect` reports that and carries on.
    """
    from filelock import FileLock
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator import tracking
    from orchestrator.tables import build_tables

    cfg = as_tracking_config(cfg)
    sweep_dir = Path(sweep_dir)
    tables_path = Path(tables_dir) if tables_dir is not None else None
    exp_id = tracking.prepare_store(cfg, sweep_dir)
    # The sweep's id in MLflow (kept in <sweep>/mlflow/tracking.json by the tracking module);
    # it scopes parents to this sweep when several sweeps share an experiment.
    uid = tracking._sweep_uid(sweep_dir)
    client = MlflowClient(tracking_uri=tracking.resolve_uri(cfg, sweep_dir))
    report = SummaryRunsReport(str(exp_id))

    paper = paper_figures_by_group(tables if tables is not None else build_tables(groups))
    # Two collects at once (the Slurm collector and a user) would both find no parent and
    # both create one: serialise them per sweep. (A leftover duplicate is removed below.)
    lock_path = sweep_dir / tracking.EMBEDDED_DIR
    lock_path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path / ".summary_runs.lock"), timeout=600), \
            tempfile.TemporaryDirectory(prefix="aullm-group-") as tmp:  # fmt: skip
        existing = find_group_runs(client, exp_id, uid)
        cell_runs = tracking.find_runs_by_cell(cfg, sweep_dir)
        for group in groups:
            gid = group.key.id
            runs = existing.get(gid, [])
            if runs:
                run = runs[0]  # the oldest: a racing earlier collect may have made a second
                for extra in runs[1:]:
                    client.delete_run(extra.info.run_id)
                    report.duplicates_removed += 1
            else:
                run = client.create_run(exp_id, run_name=gid, tags={
                    TAG_KIND: KIND_GROUP, TAG_GROUP: gid, tracking.TAG_SWEEP_UID: uid,
                })  # fmt: skip
                report.created += 1
            run_id = run.info.run_id
            report.parents[gid] = run_id

            tags = {
                TAG_KIND: KIND_GROUP, TAG_GROUP: gid, tracking.TAG_SWEEP_UID: uid, TAG_STATUS: group.status,
                "aullm.sweep": sweep_name, "aullm.protocol": group.key.kind, "aullm.dataset": group.key.data,
                "aullm.llm": group.key.llm or "none", "aullm.variant": group.key.variant,
                "aullm.seeds": ",".join(map(str, group.seeds)), "aullm.missing": group.missing_text()[:4000],
                TAG_NOTE: _note(group),
            }  # fmt: skip
            have_tags = run.data.tags
            new_tags = [RunTag(k, v) for k, v in tags.items() if have_tags.get(k) != v]
            # Params never change for a group (MLflow refuses to change a param's value).
            params = {"protocol": group.key.kind, "dataset": group.key.data, "llm": group.key.llm or "none",
                      "variant": group.key.variant, "layout": group.layout, "headline": HEADLINE_PROTOCOL}  # fmt: skip
            new_params = [Param(k, v) for k, v in params.items() if k not in run.data.params]
            have_metrics = run.data.metrics
            now = int(time.time() * 1000)
            new_metrics = [Metric(k, v, now, 0) for k, v in group_metrics(group, paper.get(gid)).items()
                           if have_metrics.get(k) != v]  # fmt: skip
            if new_tags or new_params or new_metrics:
                client.log_batch(run_id, metrics=new_metrics, params=new_params, tags=new_tags)

            group_json = Path(tmp) / gid.replace("/", "__") / "group.json"
            group_json.parent.mkdir(parents=True, exist_ok=True)
            group_json.write_text(json.dumps(group.to_json(), indent=1) + "\n")
            for path in [group_json, *_artifacts_for(group, tables_path)]:
                client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
            if run.info.status != "FINISHED":
                client.set_terminated(run_id, "FINISHED")

            for cid in group.cell_ids:
                child = cell_runs.get(cid)
                if child is None:
                    report.children_missing += 1
                    continue
                if child.tags.get(TAG_PARENT) != run_id:
                    client.set_tag(child.run_id, TAG_PARENT, run_id)
                report.children_linked += 1
    return report
