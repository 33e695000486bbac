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

Cheap at 10,000 cells: submit makes the parents (`tracking.ensure_group_runs`), each cell
run is created under its parent, and the cell's result file records both run ids. A cell
whose result names its run under the right parent costs no MLflow call; only the others
(a run spooled while MLflow was down, results from before this scheme) are looked up:
one search per cell when they are few, one search of the sweep's runs when they are many.

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

from orchestrator.results.types import GroupResult, Stat
from orchestrator.tracking.config import KIND_GROUP, TAG_GROUP, TAG_KIND, TAG_PARENT, TAG_SWEEP_UID, resolve_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from orchestrator.results.tables import Table
    from orchestrator.tracking.config import TrackingConfig

__all__ = [
    "SummaryRunsReport",
    "as_tracking_config",
    "group_metrics",
    "log_group_runs",
]

TAG_STATUS = "aullm.group_status"
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI
ARTIFACT_DIR = "results"
# Looking cells up one search each beats one search of all the sweep's runs while they are
# fewer than this share of the cells (measured: 0.07 s a cell vs 1.5 ms a run, sqlite, 10k runs).
LOOKUP_ONE_BY_ONE_SHARE = 0.01


@dataclass
class SummaryRunsReport:
    experiment_id: str
    parents: dict[str, str] = field(default_factory=dict)  # group id -> run id
    created: int = 0
    children_linked: int = 0
    children_missing: int = 0  # finished cells of the groups without an MLflow run (yet)
    children_looked_up: int = 0  # cells whose result did not name their run under the right parent
    duplicates_removed: int = 0

    def describe(self) -> str:
        text = (f"MLflow: {len(self.parents)} group runs ({self.created} new), "
                f"{self.children_linked} cell runs attached")  # fmt: skip
        if self.children_looked_up:
            text += f" ({self.children_looked_up} looked up in MLflow)"
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

    Headline keys are unprefixed (``f1_avg``, ``f1_AU12``, ``*_std`` with two seeds or more) so they sort first
    in the UI; the other protocols are prefixed (``paper_compatible.f1_avg``), and the
    paper's figures, where the tables have one, are ``paper.f1_*``. '@' is not allowed in
    MLflow keys, hence no protocol name in the headline keys.
    """
    if not group.complete:
        return {}
    out: dict[str, float] = {}
    # a std over one seed is no spread at all: a 0.0 beside the mean would read as a measured one
    with_std = len(group.seeds) >= 2
    for proto in PROTOCOLS:
        summ = group.summary[proto]
        prefix = "" if proto == HEADLINE_PROTOCOL else f"{proto}."
        items: list[tuple[str, Stat]] = [(f"AU{a}", s) for a, s in summ.per_au.items()] + [("Avg", summ.average)]
        for col, s in items:
            out[f"{prefix}f1_{_au_key(col)}"] = s.mean
            if with_std:
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


def _param_text(value: Any) -> str:
    return "" if value is None else str(value)


def _settings_params(group: GroupResult) -> dict[str, str]:
    """Every resolved training field of the group's cells (not only the swept ones), so the
    UI's compare view and `search_runs("params.lr = '0.0001'")` see how each was trained."""
    return {k: _param_text(v) for k, v in group.settings.items()}


def _settings_tags(group: GroupResult) -> dict[str, str]:
    """The fields the sweep varies, as tags (`aullm.setting.lr`), and the group's settings
    label (`aullm.settings`, '' for the sweep's own `training`): filters that change with
    the sweep's axes, where params hold what the group was trained with."""
    tags = {f"aullm.setting.{k}": _param_text(group.settings.get(k)) for k in group.swept}
    tags["aullm.settings"] = group.key.settings
    return tags


def _artifacts_for(group: GroupResult, tables_dir: Path | None) -> list[Path]:
    if tables_dir is None or not tables_dir.is_dir():
        return []
    wanted = ["tables.md", "groups.csv", f"f1_per_au_{group.key.data}.png", f"per_subject_{group.key.data}.png",
              f"all_vs_no_llm_{group.key.data}.png"]
    if group.key.kind == "loso":
        wanted.append("ablation.png")
    return [tables_dir / w for w in wanted if (tables_dir / w).is_file()]


def as_tracking_config(cfg: Any) -> TrackingConfig:
    """A `TrackingConfig` from one, or from the manifest's ``{uri, experiment}`` mapping."""
    from orchestrator.tracking.config import TrackingConfig

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
    results: Mapping[str, Mapping[str, Any]] | None = None,
) -> SummaryRunsReport:
    """Create or update one parent run per group and hang the group's cell runs under it.

    `tables_dir`: where collect wrote the tables and plots (logged as artifacts under
    ``results/``). `results`: the cells' result files (at least their ``mlflow`` record);
    the cells that have one are attached, those whose record names their run under the
    right parent without an MLflow call. Without it every cell of the groups is looked up.
    Raises `orchestrator.tracking.store.TrackingUnavailable` (or MLflow's own errors) when the
    store cannot be used; `collect` reports that and carries on.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.tracking import store as tracking
    from orchestrator.results.tables import build_tables

    cfg = as_tracking_config(cfg)
    sweep_dir = Path(sweep_dir)
    tables_path = Path(tables_dir) if tables_dir is not None else None
    exp_id = tracking.prepare_store(cfg, sweep_dir)
    # The sweep's id in MLflow (kept in <sweep>/mlflow/tracking.json by the tracking module);
    # it scopes parents to this sweep when several sweeps share an experiment.
    uid = tracking.sweep_uid(sweep_dir)
    client = MlflowClient(tracking_uri=resolve_uri(cfg, sweep_dir))
    report = SummaryRunsReport(str(exp_id))

    paper = paper_figures_by_group(tables if tables is not None else build_tables(groups))
    # (cell id, its group's parent) of the finished cells whose result does not say their
    # run was made under that parent: looked up once every group is done
    unknown: list[tuple[str, str]] = []
    # Serialised with submit's `ensure_group_runs` and other collects: both would find no
    # parent and both create one. (A leftover duplicate is removed below.)
    with tracking.group_runs_lock(sweep_dir), tempfile.TemporaryDirectory(prefix="aullm-group-") as tmp:
        existing = tracking.find_group_runs(client, exp_id, uid)
        for group in groups:
            gid = group.key.id
            runs = existing.get(gid, [])
            if runs:
                run = runs[0]  # the oldest: a racing earlier collect may have made a second
                for extra in runs[1:]:
                    client.delete_run(extra.info.run_id)
                    report.duplicates_removed += 1
            else:
                run = tracking.create_group_run(client, exp_id, uid, gid)
                report.created += 1
            run_id = run.info.run_id
            report.parents[gid] = run_id

            tags = {
                TAG_KIND: KIND_GROUP, TAG_GROUP: gid, TAG_SWEEP_UID: uid, TAG_STATUS: group.status,
                "aullm.sweep": sweep_name, "aullm.protocol": group.key.kind, "aullm.dataset": group.key.data,
                "aullm.llm": group.key.llm or "none", "aullm.variant": group.key.variant,
                "aullm.seeds": ",".join(map(str, group.seeds)), "aullm.missing": group.missing_text()[:4000],
                "aullm.recipe": group.recipe, "aullm.like_against_like": str(group.like_against_like).lower(),
                "aullm.synthetic": str(group.synthetic).lower(),
                TAG_NOTE: _note(group),
                **_settings_tags(group),
            }  # fmt: skip
            have_tags = run.data.tags
            new_tags = [RunTag(k, v) for k, v in tags.items() if have_tags.get(k) != v]
            # Params never change for a group (MLflow refuses to change a param's value).
            params = {"protocol": group.key.kind, "dataset": group.key.data, "llm": group.key.llm or "none",
                      "variant": group.key.variant, "layout": group.layout, "headline": HEADLINE_PROTOCOL,
                      "recipe": group.recipe}  # fmt: skip
            params.update((k, v) for k, v in _settings_params(group).items() if k not in params)
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
                if results is None:
                    unknown.append((cid, run_id))
                    continue
                if cid not in results:
                    continue  # not finished: its run (if any) was created under the parent
                record = results[cid].get("mlflow")
                if isinstance(record, Mapping) and record.get("run_id") and record.get("parent_run_id") == run_id:
                    report.children_linked += 1
                else:
                    unknown.append((cid, run_id))
        # Jobs started from now on (a retry, a requeue) create their runs under these.
        tracking.remember_group_runs(cfg, sweep_dir, report.parents)
        _attach_unknown(client, cfg, sweep_dir, exp_id, uid, unknown, len(results or unknown), report)
    return report


def _attach_unknown(client: MlflowClient, cfg: TrackingConfig, sweep_dir: Path, exp_id: str, uid: str,
                    unknown: Sequence[tuple[str, str]], n_cells: int, report: SummaryRunsReport) -> None:  # fmt: skip
    """Find the runs of cells whose result did not name them, and set their parent."""
    from orchestrator.tracking import store as tracking

    if not unknown:
        return
    report.children_looked_up = len(unknown)
    if len(unknown) <= max(1, n_cells * LOOKUP_ONE_BY_ONE_SHARE):
        found = {}
        for cid, _parent in unknown:
            run = tracking.latest_run_for_cell(client, exp_id, uid, cid)
            if run is not None:
                found[cid] = (run.info.run_id, run.data.tags.get(TAG_PARENT))
    else:
        found = {cid: (r.run_id, r.tags.get(TAG_PARENT)) for cid, r in tracking.find_runs_by_cell(cfg, sweep_dir).items()}
    for cid, parent in unknown:
        if cid not in found:
            report.children_missing += 1
            continue
        run_id, have = found[cid]
        if have != parent:
            client.set_tag(run_id, TAG_PARENT, parent)
        report.children_linked += 1
