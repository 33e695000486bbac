"""The sweep directory: atomic result files, manifest, submissions, attempts, lock."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from aullm.errors import UserInputError
from orchestrator.sweep.cells import expand
from orchestrator.ledger import SweepDir
from orchestrator.sweep.spec import load_sweep


def payload(cell_id: str, status: str = "done", **extra: object) -> dict:
    return {
        "cell_id": cell_id,
        "status": status,
        "predictions": {
            "sample_keys": [f"casme2/sub01/c{i}" for i in range(300)],
            "subjects": ["sub01"] * 300,
            "probs": [[0.25] * 8 for _ in range(300)],
            "labels": [[0, 1] * 4 for _ in range(300)],
            "aus": [1, 2, 4, 7, 12, 14, 15, 17],
        },
        "epoch_losses": [1.0, 0.5],
        "timing": {"train_s": 1.5},
        "host": "node1",
        "slurm": {"job_id": "12", "array_job_id": "10", "array_task_id": "2"},
        **extra,
    }


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_constructing_touches_nothing(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    assert not sweep.exists() and sweep.done_cell_ids() == set() and sweep.submissions() == []
    assert not (tmp_path / "s").exists()


def test_write_result_is_atomic_and_readable(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    path = sweep.write_result("a__none__no_llm__s1", payload("a__none__no_llm__s1"))
    assert path == tmp_path / "s" / "results" / "a__none__no_llm__s1.json"
    assert json.loads(path.read_text())["predictions"]["aus"][0] == 1
    assert sweep.read_result("a__none__no_llm__s1")["slurm"]["array_task_id"] == "2"
    assert leftovers(tmp_path) == []
    # one line per top-level key: the probabilities do not get a line each
    assert len(path.read_text().splitlines()) == len(payload("x")) + 2


def test_statuses_from_the_file_head(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("ok", payload("ok"))
    sweep.write_result("bad", {"status": "failed", "error": 'ValueError: "quoted"\nsecond line', "finished_at": 12.5})
    # a result written by another tool, keys in another order, still counts
    (sweep.results_dir / "other.json").write_text(json.dumps({"metrics": {}, "status": "done", "cell_id": "other"}))
    assert sweep.done_cell_ids() == {"ok", "other"}
    assert sweep.failed_cell_ids() == {"bad"}
    summaries = sweep.result_summaries()
    assert summaries["bad"]["error"] == 'ValueError: "quoted"\nsecond line'
    assert summaries["bad"]["finished_at"] == 12.5
    assert sweep.result_exists("ok", status="done") and not sweep.result_exists("ok", status="failed")
    assert sweep.result_exists("bad") and not sweep.result_exists("missing")


def test_a_later_success_replaces_a_failure(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("c", {"status": "failed", "error": "x"})
    sweep.write_result("c", payload("c"))
    assert sweep.done_cell_ids() == {"c"} and sweep.failed_cell_ids() == set()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("c", payload("c", epoch_losses=[9.0]))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        sweep.write_result("c", payload("c", epoch_losses=[1.0]))
    monkeypatch.undo()
    assert sweep.read_result("c")["epoch_losses"] == [9.0]
    assert leftovers(tmp_path) == []


def test_bad_payloads_and_ids_are_refused(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    with pytest.raises(ValueError):
        sweep.write_result("a", {"status": "running"})
    with pytest.raises(ValueError):
        sweep.write_result("a", {"status": "done", "cell_id": "b"})
    with pytest.raises(ValueError):
        sweep.write_result("../escape", {"status": "done"})
    assert not (tmp_path / "escape.json").exists()


def test_unreadable_result_is_a_user_error(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.results_dir.mkdir(parents=True)
    (sweep.results_dir / "c.json").write_text("{not json")
    with pytest.raises(UserInputError, match="c.json"):
        sweep.read_result("c")
    assert sweep.statuses() == {}


def _spec(tmp_path: Path):
    f = tmp_path / "sweep.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "output_dir": "out",
                "datasets": {"casme2": {"root": "c"}},
                "llms": {"tiny": {"path": "m"}},
                "grid": [{"datasets": ["casme2"], "variants": ["all", "no_llm"]}],
            }
        )
    )
    spec = load_sweep(f)
    return spec, expand(spec, {"casme2": ["sub01", "sub02"]})


def test_manifest_round_trip(tmp_path: Path) -> None:
    spec, cells = _spec(tmp_path)
    sweep = SweepDir(spec.output_dir)
    first = sweep.write_manifest(spec, cells, sweep_file="sweep.yaml")
    fresh = SweepDir(spec.output_dir)
    manifest = fresh.read_manifest()
    assert manifest["name"] == "t" and len(manifest["cells"]) == 4
    assert manifest["cells"][0]["group"] == "/".join(cells[0].group)
    assert fresh.cells() == cells
    assert fresh.cell(cells[1].cell_id) == cells[1]
    assert fresh.spec().snapshot() == spec.snapshot()
    assert fresh.dataset_config("casme2")["layout"] == "casme2"
    assert fresh.cache_dir == spec.output_dir / "cache"
    tracking = fresh.tracking_config()
    assert (tracking.uri, tracking.experiment, tracking.flush_every) == (None, "t", 25)
    assert (spec.output_dir / "logs").is_dir()
    again = SweepDir(spec.output_dir).write_manifest(spec, cells[:2])
    assert again["created"] == first["created"] and len(again["cells"]) == 2
    assert leftovers(spec.output_dir) == []


def test_missing_manifest_or_cell_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a sweep directory"):
        SweepDir(tmp_path).read_manifest()
    spec, cells = _spec(tmp_path)
    sweep = SweepDir(spec.output_dir)
    sweep.write_manifest(spec, cells)
    with pytest.raises(UserInputError, match="no cell 'nope'"):
        sweep.cell("nope")


def test_attempts_and_running_markers(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    assert sweep.bump_attempts("c") == 1 and sweep.bump_attempts("c") == 2 and sweep.attempts("c") == 2
    sweep.reset_attempts(["c", "never"])
    assert sweep.attempts("c") == 0
    sweep.mark_running("c", {"host": "n1"})
    assert sweep.running_markers()["c"]["host"] == "n1"
    sweep.write_result("c", payload("c"))
    assert sweep.running_markers() == {}


def _append_records(path: str, worker: int, count: int) -> None:
    sweep = SweepDir(path)
    for i in range(count):
        sweep.record_submission({"executor": "local", "batch_id": f"w{worker}-{i}", "tasks": {"0": [f"c{worker}"]}})


def test_concurrent_submission_records_are_all_kept(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_records, args=(str(tmp_path / "s"), w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = SweepDir(tmp_path / "s").submissions()
    assert sorted(r["batch_id"] for r in records) == sorted(f"w{w}-{i}" for w in range(4) for i in range(10))
    assert all("recorded_at" in r for r in records)
    assert leftovers(tmp_path / "s") == []


def test_lock_is_reentrant_across_sweepdir_objects(tmp_path: Path) -> None:
    a, b = SweepDir(tmp_path / "s"), SweepDir(tmp_path / "s")
    with a.lock(timeout=2), b.lock(timeout=2):
        b.record_submission({"executor": "debug", "tasks": {}})
    assert len(a.submissions()) == 1


def _hold_lock(path: str, ready: Any, release: Any) -> None:
    with SweepDir(path).lock():
        ready.set()
        release.wait(30)


def test_lock_held_elsewhere_times_out_with_a_user_error(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "s"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(UserInputError, match="another aullm-grid command"):
            with SweepDir(tmp_path / "s").lock(timeout=0.3):
                pass
    finally:
        release.set()
        holder.join(30)
    with SweepDir(tmp_path / "s").lock(timeout=5):
        pass
