"""MLflow summary runs: one parent run per group, its cell runs as children, idempotent.

The server test starts a real ``mlflow server`` (tests/mlflow_server.py); the cell runs
are logged by the job-side `CellRunLogger`, as compute nodes log them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.sweep.cells import Cell
from orchestrator.results.collect import collect_groups, collect_sweep
from orchestrator.ledger import SweepDir
from orchestrator.results.summary_runs import group_metrics, paper_figures_by_group
from orchestrator.results.tables import build_tables
from orchestrator.tracking.cell_logger import CellRunLogger
from orchestrator.tracking.config import TrackingConfig

from tests.helpers import write_hand_sweep
from tests.mlflow_server import start_mlflow_server
from tests.test_collect import A_COMPAT, A_OURS, PROBS_SEED1, PROBS_SEED2, _done, hand_grid

R2 = math.sqrt(2.0)
GROUPS = {
    "samm/qwen2-1.5b/all", "samm/none/no_llm", "samm/qwen2.5-1.5b/all", "samm/tiny-qwen2/all",
    "samm/qwen2-1.5b/f_high", "casme2_to_samm/qwen2-1.5b/all",
}  # fmt: skip


def test_group_metrics_are_the_tables_numbers() -> None:
    cells, results = hand_grid()
    groups = {g.key.id: g for g in collect_groups(cells, results)}
    paper = paper_figures_by_group(build_tables(list(groups.values())))
    m = group_metrics(groups["samm/qwen2-1.5b/all"], paper["samm/qwen2-1.5b/all"])
    assert m["f1_avg"] == pytest.approx(A_OURS["Avg"][0]) and m["f1_avg_std"] == pytest.approx(A_OURS["Avg"][1])
    assert m["f1_AU7"] == pytest.approx(50.0) and m["f1_AU7_std"] == pytest.approx(100 / R2)
    assert m["paper_compatible.f1_avg"] == pytest.approx(A_COMPAT["Avg"][0])
    assert m["per_fold_mean.f1_AU4"] == pytest.approx(500 / 12)
    assert m["paper.f1_AU2"] == 63.6 and m["paper.f1_avg"] == 57.9
    assert m["n_seeds"] == 2 and m["n_samples"] == 4
    assert all(re.fullmatch(r"[\w.\- /]+", k) for k in m), "MLflow rejects '@' and other characters in keys"
    # Table 3 pairs an ablation with the paper only through its average
    assert paper["samm/qwen2-1.5b/f_high"] == {"Avg": 55.5}
    assert group_metrics(groups["samm/qwen2.5-1.5b/all"]) == {}  # incomplete: nothing to log


def _log_cell_run(cfg: TrackingConfig, sweep: SweepDir, cell: Cell, status: str) -> None:
    """What a compute node does for each cell it trains (jobs/run_cells.py)."""
    logger = CellRunLogger(cfg, sweep.path)
    logger.start(cell.cell_id, params=cell.params(), tags=cell.tags("hand"))
    logger.log_epoch(1, {"train_loss": 0.5})
    logger.finish(status)  # type: ignore[arg-type]
    assert not logger.offline, "the tracking store was not reachable"


def _runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], max_results=1000))


def _check_tree(runs: list[Any]) -> dict[str, Any]:
    """One parent per group, every cell run under the parent of its group."""
    parents = [r for r in runs if r.data.tags.get("aullm.kind") == "group"]
    groups = [r.data.tags["aullm.group"] for r in parents]
    assert sorted(groups) == sorted(GROUPS), groups
    by_group = {r.data.tags["aullm.group"]: r for r in parents}
    children = [r for r in runs if r.data.tags.get("aullm.kind") == "cell"]
    assert len(parents) + len(children) == len(runs)
    for child in children:
        parent = by_group[child.data.tags["aullm.group"]]
        assert child.data.tags.get("mlflow.parentRunId") == parent.info.run_id, child.info.run_name
    return by_group


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_parent_runs_on_a_real_server_are_updated_not_duplicated(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cells, results = hand_grid()
    with start_mlflow_server(tmp_path / "mlflow") as server:
        cfg = TrackingConfig(uri=server.uri, experiment="collect-test")
        sweep = write_hand_sweep(tmp_path / "sweep", cells, results, uri=server.uri, experiment="collect-test")
        for cell in cells:
            if cell.cell_id in results:
                _log_cell_run(cfg, sweep, cell, "FINISHED" if results[cell.cell_id]["status"] == "done" else "FAILED")
        n_cell_runs = len(results)

        report = collect_sweep(sweep.path)
        assert "MLflow: 6 group runs (6 new)" in report.tracking, report.tracking
        # no submit made the parents and no job recorded its run: every finished cell is looked up
        assert f"{n_cell_runs} cell runs attached ({n_cell_runs} looked up in MLflow)" in report.tracking
        client = MlflowClient(server.uri)
        runs1 = _runs(client, "collect-test")
        assert len(runs1) == len(GROUPS) + n_cell_runs
        by_group = _check_tree(runs1)

        a = by_group["samm/qwen2-1.5b/all"]
        for col, (mean, std) in A_OURS.items():
            key = "f1_avg" if col == "Avg" else f"f1_{col}"
            assert a.data.metrics[key] == pytest.approx(mean) and a.data.metrics[f"{key}_std"] == pytest.approx(std)
        assert a.data.metrics["paper_compatible.f1_avg"] == pytest.approx(83.75)
        assert a.data.metrics["paper.f1_avg"] == 57.9
        assert a.data.params["llm"] == "qwen2-1.5b" and a.data.params["variant"] == "all"
        assert a.data.tags["aullm.group_status"] == "complete" and a.info.status == "FINISHED"
        base = by_group["samm/none/no_llm"]
        assert base.data.metrics["f1_AU7"] == 0.0 and base.data.metrics["paper.f1_avg"] == 54.2
        inc = by_group["samm/qwen2.5-1.5b/all"]
        assert "f1_avg" not in inc.data.metrics
        assert inc.data.tags["aullm.group_status"] == "incomplete"
        assert inc.data.tags["aullm.missing"] == "007 (seed 1); 006 failed (seed 2)"
        artifacts = {os.path.basename(f.path) for f in client.list_artifacts(a.info.run_id, "results")}
        assert {"group.json", "tables.md", "groups.csv", "f1_per_au_samm.png", "ablation.png",
                "per_subject_samm.png"} <= artifacts  # fmt: skip

        # Collect again: the same runs, no second metric point for unchanged values.
        collect_sweep(sweep.path, plots=False)
        runs2 = _runs(client, "collect-test")
        assert sorted(r.info.run_id for r in runs2) == sorted(r.info.run_id for r in runs1)
        assert len(client.get_metric_history(a.info.run_id, "f1_avg")) == 1

        # The missing fold arrives and the failed one is retried: the same parent is updated.
        c = {(x.seed, x.fold): x for x in cells if x.llm == "qwen2.5-1.5b"}
        for (seed, fold), probs in (((1, "007"), PROBS_SEED1), ((2, "006"), PROBS_SEED2)):
            sweep.write_result(c[(seed, fold)].cell_id, _done(c[(seed, fold)], probs))
            _log_cell_run(cfg, sweep, c[(seed, fold)], "FINISHED")  # the failed one's run is resumed
        collect_sweep(sweep.path, plots=False)
        runs3 = _runs(client, "collect-test")
        assert len(runs3) == len(runs1) + 1  # one new cell run; no new parent
        by_group3 = _check_tree(runs3)
        inc3 = by_group3["samm/qwen2.5-1.5b/all"]
        assert inc3.info.run_id == inc.info.run_id
        assert inc3.data.metrics["f1_avg"] == pytest.approx(A_OURS["Avg"][0])
        assert inc3.data.tags["aullm.group_status"] == "complete"


@pytest.mark.slow
def test_embedded_store_gets_the_same_tree(tmp_path: Path) -> None:
    """The laptop default (tracking.uri: null): sqlite in <sweep>/mlflow, file artifacts."""
    from mlflow import MlflowClient

    from orchestrator.tracking.config import resolve_uri

    cells, results = hand_grid()
    sweep = write_hand_sweep(tmp_path / "sweep", cells, results, uri=None, experiment="collect-test")
    cfg = TrackingConfig(uri=None, experiment="collect-test")
    for cell in cells:
        if results.get(cell.cell_id, {}).get("status") == "done":
            _log_cell_run(cfg, sweep, cell, "FINISHED")
    collect_sweep(sweep.path, plots=False)
    collect_sweep(sweep.path, plots=False)
    client = MlflowClient(resolve_uri(cfg, sweep.path))
    runs = _runs(client, "collect-test")
    assert len(runs) == len(GROUPS) + sum(r["status"] == "done" for r in results.values())
    by_group = _check_tree(runs)
    files = {os.path.basename(f.path) for f in client.list_artifacts(by_group["samm/none/no_llm"].info.run_id, "results")}
    assert {"group.json", "tables.md", "groups.csv"} <= files


@pytest.mark.slow
def test_cell_runs_born_under_their_group_run_need_no_lookup(tmp_path: Path) -> None:
    """As after `submit`: parents exist before the cells train, each cell run is created
    under its group's parent and its result records both ids (jobs/run_cells.py), so
    collect attaches every cell without looking one up. A parent deleted in the UI is made
    again and its cells, whose results name the old one, are looked up and moved under it."""
    from mlflow import MlflowClient

    from orchestrator.tracking.config import resolve_uri

    from orchestrator.tracking.store import ensure_group_runs, group_run_ids

    cells, results = hand_grid()
    sweep = write_hand_sweep(tmp_path / "sweep", cells, {}, uri=None, experiment="collect-test")
    cfg = TrackingConfig(uri=None, experiment="collect-test")
    parents = ensure_group_runs(cfg, sweep.path, {c.group_id: c.group_tags("hand") for c in cells})
    assert sorted(parents) == sorted(GROUPS) and group_run_ids(cfg, sweep.path) == parents
    assert ensure_group_runs(cfg, sweep.path, {c.group_id: {} for c in cells}) == parents  # recorded: no new run
    for cell in cells:
        if cell.cell_id not in results:
            continue
        logger = CellRunLogger(cfg, sweep.path)
        logger.start(cell.cell_id, params=cell.params(), tags=cell.tags("hand"))
        assert logger.parent_run_id == parents[cell.group_id]
        logger.finish("FINISHED" if results[cell.cell_id]["status"] == "done" else "FAILED")
        sweep.write_result(cell.cell_id, {**results[cell.cell_id],
                                          "mlflow": {"run_id": logger.run_id, "parent_run_id": logger.parent_run_id}})
    client = MlflowClient(resolve_uri(cfg, sweep.path))
    _check_tree(_runs(client, "collect-test"))  # already a tree before any collect

    report = collect_sweep(sweep.path, plots=False)
    assert f"MLflow: 6 group runs (0 new), {len(results)} cell runs attached;" in report.tracking + ";", report.tracking
    assert "looked up" not in report.tracking
    by_group = _check_tree(_runs(client, "collect-test"))
    assert {g: r.info.run_id for g, r in by_group.items()} == parents

    gone = "samm/none/no_llm"
    client.delete_run(parents[gone])
    report = collect_sweep(sweep.path, plots=False)
    n_gone = sum(1 for c in cells if c.group_id == gone and c.cell_id in results)
    assert "(1 new)" in report.tracking and f"({n_gone} looked up in MLflow)" in report.tracking, report.tracking
    by_group = _check_tree(_runs(client, "collect-test"))
    assert by_group[gone].info.run_id != parents[gone]
    assert group_run_ids(cfg, sweep.path)[gone] == by_group[gone].info.run_id  # later cells are born under it
