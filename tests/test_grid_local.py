"""The whole grid on this machine (executor `local`): submit -> supervisor -> tasks -> results -> tables.

A demo-shaped sweep (synthetic CASME II and SAMM, 3 subjects each; a tiny Qwen2; LOSO
x {all, no_llm} on both datasets plus casme2 -> samm: 14 cells in 6 tasks) runs through
the real `aullm-grid` command, submitit's LocalExecutor and the real training code.
"""

from __future__ import annotations

import json
import stat
from collections import Counter
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.state.scheduler import SCHEDULER_CALLS
from tests.helpers import LocalRun, manifest_cell_ids, result_files, run_cli, shared_local_run

pytestmark = pytest.mark.slow

EXPECTED_CELLS = 3 * 2 + 3 * 2 + 2  # LOSO folds x {all, no_llm} on both datasets + the cross-domain pair x 2
EXPECTED_GROUPS = 3 * 2  # {casme2, samm, the cross-domain pair} x {all, no_llm}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    run = shared_local_run(tmp_path_factory)
    print(f"\n[timing] local sweep (submit --wait, {EXPECTED_CELLS} cells): {run.submit.seconds:.1f} s")
    return run


def test_submit_wait_runs_every_cell(local_run: LocalRun) -> None:
    local_run.submit.check()
    assert f"submitted {EXPECTED_CELLS} of {EXPECTED_CELLS} cells" in local_run.submit.stdout
    cell_ids = manifest_cell_ids(local_run.out_dir)
    assert len(cell_ids) == EXPECTED_CELLS
    files = result_files(local_run.out_dir)
    # exactly one committed result per cell, no stray temp file of an atomic write
    assert sorted(p.stem for p in files) == sorted(cell_ids)
    assert not [p for p in (local_run.out_dir / "results").iterdir() if p.name.startswith(".")]
    statuses = {json.loads(p.read_text())["status"] for p in files}
    assert statuses == {"done"}
    # nothing left marked as running once the supervisor has gone
    running = local_run.out_dir / "running"
    assert not running.exists() or not list(running.glob("*.json"))


def test_supervisor_collected_after_the_last_task(local_run: LocalRun) -> None:
    tables = local_run.out_dir / "results_tables"
    summary = json.loads((tables / "summary.json").read_text())
    # every group (2 datasets + the cross-domain pair, x {tiny LLM, no_llm}) complete and scored
    assert sorted(g["status"] for g in summary["groups"]) == ["complete"] * EXPECTED_GROUPS
    assert (tables / "tables.md").is_file()
    newest_result = max(p.stat().st_mtime for p in result_files(local_run.out_dir))
    assert (tables / "summary.json").stat().st_mtime >= newest_result


def test_cell_runs_were_born_under_their_group_runs(local_run: LocalRun) -> None:
    """submit made one MLflow parent run per group before the tasks started; each task
    created its cell runs under them and recorded both ids in the result, so the
    supervisor's collect attached all 14 without looking any up."""
    from mlflow import MlflowClient

    from orchestrator.ledger import SweepDir
    from orchestrator.tracking.config import resolve_uri
    from orchestrator.tracking.store import group_run_ids

    sweep = SweepDir(local_run.out_dir)
    cfg = sweep.tracking_config()
    parents = group_run_ids(cfg, sweep.path)
    assert len(parents) == 6
    client = MlflowClient(resolve_uri(cfg, sweep.path))
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = {r.data.tags["cell_id"]: r for r in client.search_runs([exp.experiment_id], "tags.`aullm.kind` = 'cell'")}
    index = sweep.cell_index()
    groups = dict(zip(index.cell_ids, index.groups))
    for path in result_files(local_run.out_dir):
        record = json.loads(path.read_text())["mlflow"]
        run = runs[path.stem]
        assert record == {"run_id": run.info.run_id, "parent_run_id": parents[groups[path.stem]]}
        assert run.data.tags["mlflow.parentRunId"] == parents[groups[path.stem]]
    log = "".join(p.read_text() for p in (local_run.out_dir / "logs").glob("*.supervisor.log"))
    assert f"MLflow: 6 group runs (0 new), {EXPECTED_CELLS} cell runs attached" in log, log[-2000:]
    assert "looked up" not in log


def test_job_folder_is_private(local_run: LocalRun) -> None:
    # job folders hold pickled callables (code): only the owner may read them
    jobs = local_run.out_dir / "jobs"
    assert stat.S_IMODE(jobs.stat().st_mode) == 0o700
    batches = [p for p in jobs.iterdir() if p.is_dir()]
    assert batches and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in batches)


def test_status_json_all_done_without_asking_slurm(local_run: LocalRun, capsys: pytest.CaptureFixture[str]) -> None:
    before = SCHEDULER_CALLS.copy()
    assert cli.main(["status", str(local_run.sweep_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["all_done"] is True
    assert summary["counts"]["done"] == EXPECTED_CELLS
    assert summary["failed"] == []
    # a local sweep has no Slurm job to ask about
    assert SCHEDULER_CALLS - before == Counter()


def test_second_submit_submits_nothing(local_run: LocalRun) -> None:
    jobs_before = json.loads((local_run.out_dir / "jobs.json").read_text())
    result = run_cli("submit", local_run.sweep_file, "--json").check().json()
    assert result["submitted"] == 0
    assert result["skipped_done"] == EXPECTED_CELLS
    assert result["tasks"] == 0
    assert "batch_id" not in result  # no supervisor started
    assert json.loads((local_run.out_dir / "jobs.json").read_text()) == jobs_before


def test_collect_writes_tables(local_run: LocalRun, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    run_cli("collect", local_run.sweep_file, "--out", out, "--no-plots").check()
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(g["status"] for g in summary["groups"]) == ["complete"] * EXPECTED_GROUPS
    tables_md = (out / "tables.md").read_text()
    assert "CASME" in tables_md and "SAMM" in tables_md
    assert list(out.glob("*.csv"))
    # the same pooled numbers as the supervisor's own collection
    supervisor_summary = json.loads((local_run.out_dir / "results_tables" / "summary.json").read_text())
    assert summary["groups"] == supervisor_summary["groups"]


def test_default_recipe_tables_show_no_delta(local_run: LocalRun) -> None:
    """The paper recipe on synthetic data: the captions say both, and no row subtracts
    anything from the paper's figures."""
    md = (local_run.out_dir / "results_tables" / "tables.md").read_text()
    assert "[recipe: paper; synthetic data]" in md
    assert "Synthetic data" in md and "not like against like" in md
    assert not any(line.startswith("|  | Δ") for line in md.splitlines())
    assert {json.loads(p.read_text())["recipe"] for p in result_files(local_run.out_dir)} == {"paper"}


def test_script_recipe_sweep_runs_and_says_like_against_like(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`training: {recipe: script}` on the demo's shape: every cell trains, the manifest,
    the results and the MLflow params record the recipe, and the tables call
    paper_compatible like against like (and still show no Δ: the data is synthetic)."""
    import yaml

    from tests.helpers import shared_assets, sweep_dict

    assets = shared_assets(tmp_path_factory)
    spec = sweep_dict(assets, output_dir=tmp_path / "out", name="recipe-script", executor="local",
                      cross_domain_variants=(), loso_variants=("all",), epochs=1)  # fmt: skip
    spec["datasets"].pop("samm")
    spec["grid"][0]["datasets"] = ["casme2"]
    spec["training"] = {"recipe": "script", "epochs": 1, "lr": 1.0e-3}  # fp16_llm: fp32 on the CPU
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_cli("submit", sweep_file, "--wait", timeout_s=900).check()
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["training"]["recipe"] == "script"
    assert manifest["spec"]["training"]["token_position"] == "append"
    files = result_files(out)
    assert len(files) == 3 and {json.loads(p.read_text())["recipe"] for p in files} == {"script"}
    run_cli("collect", sweep_file, "--no-plots").check()
    md = (out / "results_tables" / "tables.md").read_text()
    assert "[recipe: script; synthetic data]" in md
    assert "like against like with the paper's figures (same recipe, same protocol); but the data is synthetic" in md
    assert not any(line.startswith("|  | Δ") for line in md.splitlines())
    from mlflow import MlflowClient

    from orchestrator.ledger import SweepDir
    from orchestrator.tracking.config import resolve_uri

    sweep = SweepDir(out)
    cfg = sweep.tracking_config()
    client = MlflowClient(resolve_uri(cfg, sweep.path))
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`aullm.kind` = 'cell'")
    assert runs and {r.data.params["recipe"] for r in runs} == {"script"}
