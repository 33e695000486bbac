"""The sweep directory's index caches (index/): what `status` reads instead of parsing
the manifest, every result file and the sweep file. A cache may be stale, torn or missing:
the answers must stay those of the files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.launch.prepare import prepare
from orchestrator.state import status
from orchestrator.sweep.cells import Cell
from orchestrator.ledger import SweepDir


def cells(n: int, group: str = "casme2/tiny/all") -> list[Cell]:
    data, llm, variant = group.split("/")
    return [
        Cell(cell_id=f"{data}-loso-s{i}__{llm}__{variant}__s1", kind="loso", dataset=data, train_dataset=data,
             test_dataset=data, fold=f"s{i}", llm=llm, llm_path="/m", variant=variant, seed=1)  # fmt: skip
        for i in range(n)
    ]


def snapshot(resources: dict | None = None) -> dict:
    return {"name": "t", "training": {}, "resources": resources or {"executor": "local"}}


def test_summary_is_read_from_the_head_without_the_predictions(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    path = sweep.write_result("c", {"status": "done", "started_at": 1.0, "finished_at": 3.5,
                                    "predictions": {"probs": [[0.5]]}, "timing": {"cell_seconds": 2.25}})  # fmt: skip
    lines = path.read_text().splitlines()
    assert lines[:6][-1].startswith(' "timing"')  # timing leads the file with the other summary fields
    # break everything after the summary: it must not be read
    path.write_text("\n".join(lines[:6]) + "\n \"predictions\": {not json\n")
    assert sweep.result_summaries() == {
        "c": {"status": "done", "finished_at": 3.5, "started_at": 1.0, "cell_seconds": 2.25}
    }


def test_result_index_follows_the_files(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("a", {"status": "failed", "error": "OOM", "finished_at": 1.0})
    sweep.write_result("b", {"status": "done", "started_at": 0.0, "finished_at": 2.0})
    first = sweep.result_summaries(update_index=True)
    index = sweep.index_dir / "results.json"
    assert index.is_file() and set(json.loads(index.read_text())["files"]) == {"a.json", "b.json"}
    assert first["a"] == {"status": "failed", "error": "OOM", "finished_at": 1.0}
    # a retry replaces a's failure, b is removed, c appears: the index must not hide any of it
    sweep.write_result("a", {"status": "done", "started_at": 5.0, "finished_at": 9.0})
    sweep.result_path("b").unlink()
    sweep.write_result("c", {"status": "done", "finished_at": 4.0})
    second = sweep.result_summaries(update_index=True)
    assert second == {"a": {"status": "done", "started_at": 5.0, "finished_at": 9.0},
                      "c": {"status": "done", "finished_at": 4.0}}  # fmt: skip
    assert set(json.loads(index.read_text())["files"]) == {"a.json", "c.json"}
    # the index agrees with a reading of every file from scratch
    index.unlink()
    assert sweep.result_summaries() == second and not index.exists()  # no update asked: nothing written


def test_a_torn_or_foreign_index_is_ignored(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("a", {"status": "done", "finished_at": 1.0})
    sweep.index_dir.mkdir(parents=True)
    (sweep.index_dir / "results.json").write_text('{"format": 1, "files": {"a.json": [[1, 2')
    assert sweep.statuses() == {"a": "done"}
    # an entry whose stamp does not match the file is re-read, whatever summary it claims
    (sweep.index_dir / "results.json").write_text(json.dumps(
        {"format": 1, "files": {"a.json": [[0, 0, 0], {"status": "failed", "error": "stale"}]}}))
    assert sweep.result_summaries(update_index=True)["a"] == {"status": "done", "finished_at": 1.0}


def test_cell_index_matches_the_manifest_and_follows_rewrites(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_manifest(snapshot({"executor": "slurm", "gres": "gpu:1"}), cells(3))
    stored = json.loads((sweep.index_dir / "cells.json").read_text())
    assert stored["cell_ids"] == [c.cell_id for c in cells(3)]
    index = SweepDir(sweep.path).cell_index()
    assert index.cell_ids == tuple(c.cell_id for c in cells(3))
    assert index.groups == ("casme2/tiny/all",) * 3 and index.resources["gres"] == "gpu:1"
    # a manifest rewritten by something that does not know the index (or an older version)
    manifest = json.loads(sweep.manifest_path.read_text())
    manifest["cells"] = [c.to_dict() for c in cells(2, "samm/tiny/all")]
    sweep.manifest_path.write_text(json.dumps(manifest))
    fresh = SweepDir(sweep.path).cell_index(update_index=True)
    assert fresh.groups == ("samm/tiny/all",) * 2
    assert json.loads((sweep.index_dir / "cells.json").read_text())["groups"] == ["samm/tiny/all"] * 2


# ------------------------------------------------------------------ sweep file -> directory


@pytest.fixture()
def submitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid sweep file (env var in a path) whose directory has a manifest."""
    root = tmp_path / "data"
    assert cli.main(["data", "synth", "--layout", "casme2", "--out", str(root / "casme2"),
                     "--subjects", "2", "--clips-per-subject", "1"]) == 0  # fmt: skip
    monkeypatch.setenv("COST_DATA", str(root))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "idx",
        "output_dir": "${COST_OUT:-out}",
        "datasets": {"casme2": {"root": "${COST_DATA}/casme2"}},
        "grid": [{"datasets": ["casme2"], "variants": ["no_llm"]}],
    }))
    spec, _subjects, found = prepare(str(path))
    SweepDir(spec.output_dir).write_manifest(spec, found)
    return path


def _no_full_validation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import orchestrator.sweep.spec

    calls: list[str] = []
    real = orchestrator.sweep.spec.load_sweep

    def counting(path: str):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(orchestrator.sweep.spec, "load_sweep", counting)
    return calls


def test_a_validated_sweep_file_is_not_validated_again(submitted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_full_validation(monkeypatch)
    first = status.locate_sweep(str(submitted))
    assert calls == [str(submitted)] and first.path == submitted.parent / "out"
    assert status.locate_sweep(str(submitted)).path == first.path
    assert len(calls) == 1  # the second lookup trusted the fingerprint
    # an edit, a changed environment variable the file names: validated again
    submitted.write_text(submitted.read_text() + "# edited\n")
    status.locate_sweep(str(submitted))
    assert len(calls) == 2
    monkeypatch.setenv("COST_DATA", str(submitted.parent / "data") + "/")  # same folder, new value
    status.locate_sweep(str(submitted))
    assert len(calls) == 3
    status.locate_sweep(str(submitted))
    assert len(calls) == 3


def test_an_invalid_edit_still_fails_status(submitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", str(submitted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == 2
    assert (submitted.parent / "out" / "index" / "sweep-files.json").is_file()
    submitted.write_text(submitted.read_text().replace("no_llm", "no_such_variant"))
    assert cli.main(["status", str(submitted), "--json"]) == 2
    assert "no_such_variant" in capsys.readouterr().err


def test_an_unset_variable_is_reported_as_before(submitted: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert cli.main(["status", str(submitted), "--json"]) == 0
    capsys.readouterr()
    monkeypatch.delenv("COST_DATA")
    assert cli.main(["status", str(submitted), "--json"]) == 2
    assert "COST_DATA" in capsys.readouterr().err


def test_status_answers_when_the_index_cannot_be_written(submitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A file where the index folder should be: every cache write and read fails (as in
    # another user's read-only sweep directory, which root could not simulate).
    out = submitted.parent / "out"
    first = SweepDir(out).cell_index().cell_ids[0]
    SweepDir(out).write_result(first, {"status": "done", "finished_at": 1.0})
    for name in ("cells.json", "results.json", "sweep-files.json"):
        (out / "index" / name).unlink(missing_ok=True)
    (out / "index").rmdir()
    (out / "index").write_text("not a folder")
    for _ in range(2):
        assert cli.main(["status", str(submitted), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["cells"] == 2 and summary["counts"]["done"] == 1
