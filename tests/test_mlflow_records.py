"""MLflow records made for the compare view (issue 15.5), against a real `mlflow server`.

A demo-shaped sweep (CASME II, the tiny Qwen2 named `tiny-qwen2`, variants all and no_llm,
one seed) is submitted with the debug executor, so the cells train in this process through
the real job entry (`jobs.run_cells.run_task`) and log to the server as compute nodes do;
then `collect` writes the parent runs. The records are read back over REST."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

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


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_cell_and_parent_runs_against_a_real_server(
    mlflow_server, tmp_path: Path, tiny_llm: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    from aullm.data.synth import write_synthetic
    from mlflow import MlflowClient

    monkeypatch.setenv("AULLM_CACHE_DIR", str(tmp_path / "cache"))
    data = write_synthetic("casme2", tmp_path / "casme2", subjects=2, seed=0, clips_per_subject=3)
    spec_dict = {
        "name": "demo", "output_dir": str(tmp_path / "out"),
        "datasets": {"casme2": {"root": str(data)}}, "llms": {"tiny-qwen2": {"path": str(tiny_llm)}},
        "seeds": [1], "grid": [{"datasets": ["casme2"], "variants": ["all", "no_llm"]}],
        "training": {"epochs": EPOCHS, "lr": 1e-3}, "cache_dir": str(tmp_path / "frames"),
        "resources": {"executor": "debug", "cells_per_task": 4},
        "tracking": {"uri": mlflow_server.uri, "experiment": "records"},
    }  # fmt: skip
    sweep_file = tmp_path / "demo.yaml"
    sweep_file.write_text(yaml.safe_dump(spec_dict))
    spec, _subjects, cells = prepare(str(sweep_file))
    sweep = SweepDir(spec.output_dir)
    outcome = submit_sweep(spec, sweep, cells)
    assert set(outcome["outcomes"].values()) == {"done"}, outcome
    report = collect_sweep(sweep.path, plots=False)
    assert "MLflow: 2 group runs" in report.tracking, report.tracking

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("records")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    cell_runs = [r for r in runs if r.data.tags.get("aullm.kind") == "cell"]
    parents = [r for r in runs if r.data.tags.get("aullm.kind") == "group"]
    assert len(cell_runs) == len(cells) == 4 and len(parents) == 2

    for run in cell_runs:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(EPOCHS)), history  # step = epoch
        for key in ("time_load_s", "time_train_s", "time_predict_s"):
            assert run.data.metrics[key] >= 0, (key, run.data.metrics)
        assert run.data.metrics["time_train_s"] > 0
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
        assert arts == [f"predictions/{run.info.run_name}.json"], arts
        assert run.data.params["token_position"] != "***"  # a setting, not a secret

    for run in parents:
        m = run.data.metrics
        assert {"f1_avg", "paper_compatible.f1_avg"} <= set(m), m
        assert not [k for k in m if k.endswith("_std")], m  # one seed: no spread to report

    for text in _doc_filters():
        found = client.search_runs([exp.experiment_id], filter_string=text, max_results=100)
        assert found, f"docs/mlflow.md filter finds no run: {text}"


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
