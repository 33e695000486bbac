"""`resources.concurrent_cells` through the grid: a task that trains its cells in one
concurrent loop (jobs/run_cells.py -> aullm/concurrent.py) writes, per cell, the result
the one-by-one loop writes, within the 1e-5 of tests/test_concurrent.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    GridAssets,
    cell_predictions,
    manifest_cell_ids,
    result_files,
    run_cli,
    shared_local_run,
    sweep_dict,
)

TOL = 1e-5


def _run(root: Path, assets: GridAssets, k: int | str) -> Path:
    """The 3 LOSO folds of CASME II, variant all, in one task (debug executor, in the CLI)."""
    spec = sweep_dict(assets, output_dir=root / "out", name=f"concurrent-k{k}", executor="debug", cells_per_task=3,
                      epochs=2, cross_domain_variants=(), loso_variants=("all",))  # fmt: skip
    spec["grid"][0]["datasets"] = ["casme2"]
    spec["resources"]["concurrent_cells"] = k
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_cli("submit", root / "sweep.yaml", "--json", timeout_s=600).check()
    return root / "out"


def _largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    for cid in a:
        assert a[cid]["sample_keys"] == b[cid]["sample_keys"], cid
    return max(float(np.abs(a[cid]["probs"] - b[cid]["probs"]).max()) for cid in a)


@pytest.mark.slow
def test_a_concurrent_task_writes_the_one_by_one_results(
    assets: GridAssets, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # thread counts change float sums
    # The reference: these three cells in the plain demo-shaped sweep of tests/test_grid_local.py
    # (run once per test process and shared; one thread per task, the three packed in one
    # task), under `auto`, which a CPU task resolves to 1 (one by one) and says so per cell.
    together = _run(tmp_path / "k3", assets, 3)
    shared = shared_local_run(tmp_path_factory)
    shared.submit.check()
    assert yaml.safe_load(shared.sweep_file.read_text())["training"] == yaml.safe_load(
        (tmp_path / "k3" / "sweep.yaml").read_text())["training"]  # fmt: skip
    ids = set(manifest_cell_ids(together))
    reference = [p for p in (json.loads(f.read_text()) for f in result_files(shared.out_dir)) if p["cell_id"] in ids]
    assert len(reference) == 3 and {p["status"] for p in reference} == {"done"}
    assert {p.get("concurrent_cells_auto") for p in reference} == {"1 (CPU)"}
    assert {p.get("concurrent_cells") for p in reference} == {None}  # no concurrent loop ran
    one_by_one = {cid: pred for cid, pred in cell_predictions(shared.out_dir).items() if cid in ids}
    payloads = [json.loads(p.read_text()) for p in result_files(together)]
    assert len(payloads) == 3 and sorted(p["cell_id"] for p in payloads) == sorted(manifest_cell_ids(together))
    assert {p["status"] for p in payloads} == {"done"}
    assert {p.get("concurrent_cells") for p in payloads} == {3}  # the three really shared one loop
    assert {p.get("concurrent_cells_auto") for p in payloads} == {None}  # K was set, not chosen
    worst = _largest_difference(cell_predictions(together), one_by_one)
    print(f"\n[concurrent] K=3 task vs one by one: largest probability difference {worst:.1e}")
    assert worst <= TOL

    # mutation check: adapters shared across the loop's cells (test-only hook) must show
    monkeypatch.setenv("AULLM_TEST_SHARE_ADAPTERS", "1")
    mutated = _run(tmp_path / "k3-shared", assets, 3)
    assert _largest_difference(cell_predictions(mutated), one_by_one) > 100 * TOL


@pytest.mark.slow
def test_auto_on_a_gpu_packs_the_loops_its_measurement_allows(
    assets: GridAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The task's GPU path of `auto`, on the CPU: the device is taken for a GPU and the CUDA
    allocator's counters are a stand-in (10 GiB a cell, 25 GiB free: room for 2 of the 3
    cells), everything else is the real task (debug executor, in this process): the
    measurement's two steps, the loops of 2 and 1 it implies, the log line, each result."""
    import aullm.concurrent as concurrent
    from orchestrator import cli
    from tests.test_concurrent_auto import FakeMemory

    gib = concurrent.GIB
    monkeypatch.setattr(concurrent, "auto_without_measuring", lambda *_a, **_k: None)
    monkeypatch.setattr(concurrent, "CudaMemory", lambda _device: FakeMemory(allocated=gib, peak=21 * gib, free=25 * gib))
    spec = sweep_dict(assets, output_dir=tmp_path / "out", name="concurrent-auto", executor="debug", cells_per_task=3,
                      epochs=1, cross_domain_variants=(), loso_variants=("all",))  # fmt: skip
    spec["grid"][0]["datasets"] = ["casme2"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # concurrent_cells: the default, auto
    assert cli.main(["submit", str(tmp_path / "sweep.yaml"), "--json"]) == 0
    why = "2 (per cell 10.0 GiB measured, 25.0 GiB free, 90% usable: room for 2)"
    assert f"aullm-grid: concurrent_cells auto: {why} [all, 3 cells to train]" in capsys.readouterr().out
    payloads = [json.loads(p.read_text()) for p in result_files(tmp_path / "out")]
    assert len(payloads) == 3 and {p["status"] for p in payloads} == {"done"}
    assert {p.get("concurrent_cells_auto") for p in payloads} == {why}
    assert sorted(str(p.get("concurrent_cells")) for p in payloads) == ["2", "2", "None"]  # a loop of 2, one alone
    # MLflow: the loop's runs carry the K the task chose, not the sweep's `auto`
    from mlflow import MlflowClient

    from orchestrator.ledger import SweepDir
    from orchestrator.tracking.config import resolve_uri

    sweep = SweepDir(tmp_path / "out")
    client = MlflowClient(resolve_uri(sweep.tracking_config(), sweep.path))
    looped = [p for p in payloads if p.get("concurrent_cells") == 2]
    assert {client.get_run(p["mlflow"]["run_id"]).data.params["concurrent_cells"] for p in looped} == {"2"}
