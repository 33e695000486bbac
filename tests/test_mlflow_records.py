"""MLflow records made for the compare view (issue 15.5), against a real `mlflow server`.

A demo-shaped sweep (CASME II, the tiny Qwen2 named `tiny-qwen2`, variants all and no_llm,
one seed) is submitted with the debug executor, so the cells train in this process through
the real job entry (`jobs.run_cells.run_task`) and log to the server as compute nodes do;
then `collect` writes the parent runs. The records are read back over REST."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.launch.prepare import prepare
from orchestrator.launch.submit import submit_sweep
from orchestrator.ledger import SweepDir
from orchestrator.results.collect import collect_groups, collect_sweep
from orchestrator.results.summary_runs import group_metrics

from tests.mlflow_server import mlflow_server_fixture
from tests.test_collect import hand_grid

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
mlflow_server = mlflow_server_fixture(scope="module")


def test_one_seed_logs_no_std_and_two_seeds_do() -> None:
    cells, results = hand_grid()
    group = next(g for g in collect_groups(cells, results) if g.complete and len(g.seeds) >= 2)
    assert "f1_avg_std" in group_metrics(group) and "paper_compatible.f1_avg_std" in group_metrics(group)
    one = group_metrics(dataclasses.replace(group, seeds=group.seeds[:1]))
    assert "f1_avg" in one and "paper_compatible.f1_avg" in one
    assert not [k for k in one if k.endswith("_std")], one


def _doc_filters() -> list[str]:
    text = (REPO / "docs" / "mlflow.md").read_text()
    block = re.search(r"<!-- filters:begin -->\s*```\n(.*?)```\s*<!-- filters:end -->", text, re.S)
    assert block, "docs/mlflow.md lost its filter block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class DemoRuns:
    uri: str
    experiment_id: str
    cell_runs: list[Any]
    parents: list[Any]
    n_cells: int


@pytest.fixture(scope="module")
def demo_runs(mlflow_server, tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> DemoRuns:  # type: ignore[no-untyped-def]
    """The demo's shape, trained through the real job entry and collected, on the server."""
    from aullm.data.synth import write_synthetic
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("records")
    old_cache = os.environ.get("AULLM_CACHE_DIR")
    os.environ["AULLM_CACHE_DIR"] = str(tmp / "cache")  # never the user's ~/.cache
    try:
        data = write_synthetic("casme2", tmp / "casme2", subjects=2, seed=0, clips_per_subject=3)
        spec_dict = {
            "name": "demo", "output_dir": str(tmp / "out"),
            "datasets": {"casme2": {"root": str(data)}}, "llms": {"tiny-qwen2": {"path": str(tiny_llm)}},
            "seeds": [1], "grid": [{"datasets": ["casme2"], "variants": ["all", "no_llm"]}],
            "training": {"epochs": EPOCHS, "lr": 1e-3}, "cache_dir": str(tmp / "frames"),
            "resources": {"executor": "debug", "cells_per_task": 4},
            "tracking": {"uri": mlflow_server.uri, "experiment": "records"},
        }  # fmt: skip
        sweep_file = tmp / "demo.yaml"
        sweep_file.write_text(yaml.safe_dump(spec_dict))
        spec, _subjects, cells = prepare(str(sweep_file))
        sweep = SweepDir(spec.output_dir)
        outcome = submit_sweep(spec, sweep, cells)
        assert set(outcome["outcomes"].values()) == {"done"}, outcome
        report = collect_sweep(sweep.path, plots=False)
        assert "MLflow: 2 group runs" in report.tracking, report.tracking
    finally:
        if old_cache is None:
            os.environ.pop("AULLM_CACHE_DIR", None)
        else:
            os.environ["AULLM_CACHE_DIR"] = old_cache
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("records")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return DemoRuns(
        mlflow_server.uri, exp.experiment_id, [r for r in runs if r.data.tags.get("aullm.kind") == "cell"],
        [r for r in runs if r.data.tags.get("aullm.kind") == "group"], len(cells),
    )  # fmt: skip


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_cell_and_parent_runs_against_a_real_server(demo_runs: DemoRuns) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(demo_runs.uri)
    assert len(demo_runs.cell_runs) == demo_runs.n_cells == 4 and len(demo_runs.parents) == 2
    for run in demo_runs.cell_runs:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(EPOCHS)), history  # step = epoch
        for key in ("time_load_s", "time_train_s", "time_predict_s"):
            assert run.data.metrics[key] >= 0, (key, run.data.metrics)
        assert run.data.metrics["time_train_s"] > 0
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
        assert arts == [f"predictions/{run.info.run_name}.json"], arts
        assert run.data.params["token_position"] != "***"  # a setting, not a secret

    for run in demo_runs.parents:
        m = run.data.metrics
        assert {"f1_avg", "paper_compatible.f1_avg"} <= set(m), m
        assert not [k for k in m if k.endswith("_std")], m  # one seed: no spread to report

    for text in _doc_filters():
        found = client.search_runs([demo_runs.experiment_id], filter_string=text, max_results=100)
        assert found, f"docs/mlflow.md filter finds no run: {text}"


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_compare_view_in_a_real_browser(demo_runs: DemoRuns, tmp_path: Path) -> None:
    """Optional: headless Chromium opens the UI's compare view of the parent runs (the
    REST checks above stand without it)."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import mlflow_screenshot as shot
    finally:
        sys.path.remove(str(REPO / "docs"))
    browser = shot.find_browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium): the UI is not looked at in a browser")
    url = shot.compare_url(demo_runs.uri, demo_runs.experiment_id, [r.info.run_id for r in demo_runs.parents])
    dom = shot.render(browser, url, screenshot=tmp_path / "compare.png")
    assert "Comparing 2 Runs" in dom, dom[-2000:]
    for run in demo_runs.parents:
        assert run.info.run_name in dom  # casme2/tiny-qwen2/all, casme2/none/no_llm
    # the swept params (llm, variant) with their values, and the headline metric
    for text in (">llm<", ">variant<", "tiny-qwen2", "no_llm", "f1_avg"):
        assert text in dom, text
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_embedded_store_has_no_stray_default_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from orchestrator.tracking.config import TrackingConfig, resolve_uri
    from orchestrator.tracking.store import prepare_store

    monkeypatch.setenv("AULLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name in ("first", "second"):  # the first builds the template store, the second copies it
        cfg = TrackingConfig(None, "records")
        prepare_store(cfg, tmp_path / name)
        client = MlflowClient(resolve_uri(cfg, tmp_path / name))
        assert [e.name for e in client.search_experiments()] == ["records"]
        for exp in client.search_experiments(view_type=ViewType.ALL):
            assert exp.artifact_location.startswith((tmp_path / name / "mlflow").as_uri()), exp
    assert not (tmp_path / "mlruns").exists() and not (REPO / "mlruns").exists()
