"""A 2x2 settings sweep (lr x lora_r) end to end, on the local executor and on the dev Slurm
cluster; and a sweep directory made by the code before axes, re-submitted by this code.

The sweep is kept to one LOSO fold, the full model, one epoch: 4 cells, packed into one
task (they share the tiny Qwen2's load even though their settings differ). Everything is
real: the `aullm-grid` command as a subprocess, submitit, sbatch/sacct, the training code.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import (
    CLI_ENV,
    REPO,
    GridAssets,
    cell_predictions,
    result_files,
    run_cli,
    shared_assets,
    submit_and_wait,
    sweep_dict,
)
from tests.slurm_cluster import ClusterInfo, dev_slurm  # noqa: F401 - the session fixture

pytestmark = pytest.mark.slow

AXES = {"lr": [1.0e-3, 1.0e-4], "lora_r": [8, 16]}


def settings_sweep(assets: GridAssets, root: Path, *, executor: str, name: str) -> Path:
    data = sweep_dict(assets, output_dir=root / "out", name=name, executor=executor, epochs=1, cells_per_task=4,
                      max_local_workers=1, loso_variants=("all",), cross_domain_variants=())  # fmt: skip
    data["grid"][0]["datasets"] = ["casme2"]
    data["datasets"]["casme2"]["folds"] = ["sub01"]
    data["sweep"] = AXES
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _payloads(out_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in result_files(out_dir)}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("settings-local")
    sweep_file = settings_sweep(assets, root, executor="local", name="settings-local")
    run_cli("submit", sweep_file, "--wait", timeout_s=600).check()
    return sweep_file, root / "out"


def test_a_2x2_settings_sweep_runs_in_one_task(local: tuple[Path, Path]) -> None:
    sweep_file, out = local
    payloads = _payloads(out)
    assert len(payloads) == 4 and {p["status"] for p in payloads.values()} == {"done"}
    manifest = json.loads((out / "manifest.json").read_text())
    hashes = {c["cell_id"]: c["settings_hash"] for c in manifest["cells"]}
    assert {p["settings_hash"] for p in payloads.values()} == set(hashes.values()) and len(set(hashes.values())) == 4
    assert all(payloads[cid]["settings_hash"] == h for cid, h in hashes.items())
    # packing: the four settings share one task, so one load of the LLM
    jobs = json.loads((out / "jobs.json").read_text())
    assert [len(t) for t in jobs[0]["tasks"].values()] == [4]
    # each cell really trained under its own settings: four different sets of predictions
    probs = [np.asarray(p["predictions"]["probs"]) for p in payloads.values()]
    assert all(not np.array_equal(probs[i], probs[j]) for i in range(4) for j in range(i + 1, 4))
    # the resolved sweep is in the sweep directory: retry and collect need neither file nor flags
    assert (out / "sweep.resolved.yaml").is_file()


def test_the_tables_show_one_row_per_setting(local: tuple[Path, Path]) -> None:
    _sweep_file, out = local
    rows = list(csv.DictReader(io.StringIO((out / "results_tables" / "settings.csv").read_text())))
    assert len(rows) == 4
    assert {(r["lr"], r["lora_r"]) for r in rows} == {("0.001", "8"), ("0.001", "16"), ("0.0001", "8"), ("0.0001", "16")}
    default = next(r for r in rows if r["setting"] == "default (training:)")
    assert (default["lr"], default["lora_r"]) == ("0.001", "16") and default["delta_vs_default"] == ""
    others = [r for r in rows if r is not default]
    assert all(r["delta_vs_default"] != "" and r["f1_std"] == "" for r in others)  # one seed: no std
    assert (out / "results_tables" / "settings_lr.png").is_file()
    assert (out / "results_tables" / "settings_lora_r.png").is_file()
    summary = json.loads((out / "results_tables" / "summary.json").read_text())
    assert len(summary["groups"]) == 4 and all(g["status"] == "complete" for g in summary["groups"])


def test_parent_runs_carry_the_settings(local: tuple[Path, Path]) -> None:
    from mlflow import MlflowClient

    from orchestrator.ledger import SweepDir
    from orchestrator.tracking.config import resolve_uri

    sweep = SweepDir(local[1])
    cfg = sweep.tracking_config()
    client = MlflowClient(resolve_uri(cfg, sweep.path))
    exp = client.get_experiment_by_name(cfg.experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`aullm.kind` = 'group' and params.lora_r = '8'")
    assert len(parents) == 2
    for run in parents:
        assert run.data.params["weight_decay"] == "0.005" and run.data.params["epochs"] == "1"  # not only swept ones
        assert run.data.tags["aullm.setting.lora_r"] == "8" and "aullm.setting.weight_decay" not in run.data.tags


def test_resubmit_skips_and_a_changed_value_adds_only_its_cells(local: tuple[Path, Path]) -> None:
    sweep_file, out = local
    again = run_cli("submit", sweep_file, "--json").check().json()
    assert again["submitted"] == 0 and again["skipped_done"] == 4
    plan = run_cli("submit", sweep_file, "--dry-run", "--set", "sweep.lora_r=[8,32]").check().json()
    assert plan["cells"] == 4 and plan["skipped_done"] == 2 and plan["to_submit"] == 2
    new = set(plan["cell_ids"]) - {p.stem for p in result_files(out)}
    assert len(new) == 2 and all("lora_r=32@" in cid for cid in new)


def test_retry_after_an_edit_is_refused(local: tuple[Path, Path], tmp_path: Path) -> None:
    sweep_file, out = local
    data = yaml.safe_load(sweep_file.read_text())
    data["training"]["weight_decay"] = 0.01
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    before = (out / "manifest.json").read_bytes()
    refused = run_cli("retry", edited)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "weight_decay" in refused.stderr and "new output_dir" in refused.stderr
    assert (out / "manifest.json").read_bytes() == before
    # the sweep directory itself stands for the sweep as submitted: nothing to retry
    ok = run_cli("retry", out, "--dry-run", "--json").check().json()
    assert ok["retried"] == [] and ok["submitted"] == 0


# ---------------------------------------------------------------- Slurm


@pytest.mark.slurm
def test_the_same_sweep_on_slurm(dev_slurm: ClusterInfo, local: tuple[Path, Path],  # noqa: F811
                                 tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("settings-slurm")
    sweep_file = settings_sweep(assets, root, executor="slurm", name="settings-slurm")
    submitted = submit_and_wait(sweep_file)
    assert submitted["submitted"] == 4 and submitted["tasks"] == 1
    out = root / "out"
    slurm = cell_predictions(out)
    assert len(slurm) == 4 and {p["status"] for p in slurm.values()} == {"done"}
    # the same cells as the local run (ids name the settings), trained the same way
    reference = cell_predictions(local[1])
    assert sorted(slurm) == sorted(reference)
    # both ran with cpus_per_task threads (1): a CPU cell's last digits depend on the count
    threads = {json.loads(p.read_text())["torch_threads"] for o in (out, local[1]) for p in result_files(o)}
    assert threads == {1}, threads
    for cid, pred in slurm.items():
        np.testing.assert_allclose(pred["probs"], reference[cid]["probs"], rtol=0, atol=1e-6)
    again = run_cli("submit", sweep_file, "--json").check().json()
    assert again["submitted"] == 0 and again["skipped_done"] == 4


# ---------------------------------------------------------------- upgrade


def test_a_sweep_made_before_axes_keeps_its_cells(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Submit with the code of `main` before this change (its files, from git), then re-submit
    with this code: same cell ids, nothing re-runs."""
    old_code = tmp_path_factory.mktemp("old-code")
    archive = subprocess.run(["git", "archive", "--format=tar", "d9c6b14", "aullm", "orchestrator", "jobs"],
                             cwd=REPO, capture_output=True, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old_code, filter="data")
    assert not (old_code / "orchestrator" / "sweep" / "settings.py").exists()
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("upgrade")
    data = sweep_dict(assets, output_dir=root / "out", name="upgrade", executor="debug", epochs=1,
                      loso_variants=("no_llm",), cross_domain_variants=("no_llm",))  # fmt: skip
    data["datasets"]["casme2"]["folds"] = ["sub01"]
    data["datasets"]["samm"]["folds"] = ["006"]
    sweep_file = root / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**CLI_ENV, "PYTHONPATH": str(old_code)}
    old = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(sweep_file), "--json"],
                         cwd=old_code, env={**__import__("os").environ, **env}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert old.returncode == 0, old.stderr[-2000:]
    out = root / "out"
    old_manifest = json.loads((out / "manifest.json").read_text())
    assert "settings" not in old_manifest  # really the old code's manifest
    old_ids = [c["cell_id"] for c in old_manifest["cells"]]
    assert len(old_ids) == 3 and len(result_files(out)) == 3
    results_before = {p.name: p.read_bytes() for p in result_files(out)}
    plan = run_cli("submit", sweep_file, "--dry-run").check().json()
    assert plan["cell_ids"] == old_ids and plan["to_submit"] == 0 and plan["skipped_done"] == 3
    again = run_cli("submit", sweep_file, "--json").check().json()
    assert again["submitted"] == 0
    assert {p.name: p.read_bytes() for p in result_files(out)} == results_before
