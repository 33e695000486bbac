"""What the user sees (issue 15): progress files and the ETA, status per group, next-step
lines, `logs`, and one CLI grammar (SWEEP as file or directory, `--watch` either side,
`--json` naming the sweep, retry/cancel summaries, `--version`, examples in every help).

The sweep here is real (a sweep file over a synthetic dataset, expanded by the real code,
its manifest written by the ledger); where cells stand is set by writing what the jobs
write (result files, running markers, progress files, a submission record) instead of
training, so every state is reached without a scheduler's timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from jobs.run_cells import ProgressReporter
from orchestrator import cli
from orchestrator.launch.prepare import prepare
from orchestrator.ledger import SweepDir
from orchestrator.state.status import CellStatus, estimate_eta, group_progress

EPOCHS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aullm.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("uv-assets")
    casme2 = write_synthetic("casme2", root / "casme2", subjects=3, seed=0, clips_per_subject=1)
    model = root / "tiny"
    model.mkdir()
    (model / "config.json").write_text("{}")  # validation checks the folder; nothing here loads it
    return {"casme2": Path(casme2), "model": model}


def _sweep_file(folder: Path, dataset: dict[str, Path], name: str = "uv", output: str = "out") -> Path:
    spec = {
        "name": name, "output_dir": output,
        "datasets": {"casme2": {"root": str(dataset["casme2"])}},
        "llms": {"tiny": {"path": str(dataset["model"])}},
        "grid": [{"datasets": ["casme2"], "variants": ["all", "no_llm"]}],
        "training": {"epochs": EPOCHS},
        "resources": {"executor": "local", "cells_per_task": 2},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def supervisor() -> Iterator[subprocess.Popen[bytes]]:
    """A live process in its own session standing in for a local supervisor (status asks
    whether it is alive; cancel may kill its group, never this test's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def staged(tmp_path: Path, dataset: dict[str, Path], supervisor: subprocess.Popen[bytes]) -> tuple[Path, SweepDir, list[str]]:
    """A submitted-looking sweep of 6 cells (2 groups x 3 folds), one local task per cell.

    all group: done (10 s), done (20 s), running at epoch 3 of 10 -- no_llm: failed,
    running at epoch 8 of 10, pending."""
    sweep_file = _sweep_file(tmp_path / "sweeps", dataset)
    spec, _subjects, cells = prepare(str(sweep_file))
    sweep = SweepDir(spec.output_dir)
    sweep.write_manifest(spec, cells, sweep_file=str(sweep_file.resolve()))
    ids = [c.cell_id for c in sorted(cells, key=lambda c: (c.variant != "all", c.fold))]
    sweep.record_submission({"executor": "local", "batch_id": "local-1", "supervisor_pid": supervisor.pid,
                             "host": os.uname().nodename, "tasks": {str(i): [cid] for i, cid in enumerate(ids)},
                             "submitted_at": time.time()})  # fmt: skip
    sweep.write_result(ids[0], {"status": "done", "started_at": 100.0, "finished_at": 110.0})
    sweep.write_result(ids[1], {"status": "done", "started_at": 100.0, "finished_at": 120.0})
    sweep.write_result(ids[3], {"status": "failed", "error": "RuntimeError: boom",
                                "finished_at": time.time() + 5})  # after the submission: its outcome
    for cid, epoch in ((ids[2], 3), (ids[4], 8)):
        sweep.mark_running(cid, {"pid": supervisor.pid})
        sweep.write_progress(cid, {"cell_id": cid, "epoch": epoch, "epochs": EPOCHS, "elapsed_s": 1.0})
    log = sweep.path / "jobs" / "local-1" / "4242" / "4242_0_log.out"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"aullm-grid: cell {ids[3]} epoch {e} train_loss 0.5\n" for e in range(5)) + "Traceback: boom\n")
    return sweep_file, sweep, ids


# --------------------------------------------------------------------------- progress file


def test_progress_file_is_throttled_atomic_and_never_raises(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    now = [0.0]
    reporter = ProgressReporter(sweep, "c1", epochs=5, min_interval_s=3.0, clock=lambda: now[0])
    reporter(0, 0.9)  # the first epoch is always written
    assert json.loads(sweep.progress_path("c1").read_text())["epoch"] == 1
    now[0] = 1.0
    reporter(1, 0.8)  # 1 s later: too soon
    assert reporter.writes == 1 and json.loads(sweep.progress_path("c1").read_text())["epoch"] == 1
    now[0] = 3.5
    reporter(2, 0.7)
    data = json.loads(sweep.progress_path("c1").read_text())
    assert (data["epoch"], data["epochs"], data["elapsed_s"], data["train_loss"]) == (3, 5, 3.5, 0.7)
    now[0] = 3.6
    reporter(4, 0.5)  # the last epoch is written whatever the clock says
    assert reporter.writes == 3 and json.loads(sweep.progress_path("c1").read_text())["epoch"] == 5
    assert [p.name for p in sweep.progress_dir.iterdir()] == ["c1.json"]  # no temp file left behind
    # a result clears it: status reads progress only while a cell runs
    sweep.write_result("c1", {"status": "done"})
    assert not sweep.progress_path("c1").exists()
    # an unwritable sweep directory (a file in its place) costs the cell nothing
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    ProgressReporter(SweepDir(blocked), "c2", epochs=2)(0, 1.0)


# --------------------------------------------------------------------------- ETA and groups


def _st(cid: str, group: str, state: str, job: str | None = None) -> CellStatus:
    return CellStatus(cid, group, state, job_id=job or f"job-{cid}")


def test_eta_arithmetic() -> None:
    statuses = [
        _st("a1", "A", "done"), _st("a2", "A", "done"), _st("a3", "A", "running", "t1"),
        _st("a4", "A", "pending"), _st("b1", "B", "pending"), _st("b2", "B", "failed"),
        _st("b3", "B", "not_submitted"),
    ]  # fmt: skip
    results = {"a1": {"started_at": 0.0, "finished_at": 10.0}, "a2": {"started_at": 0.0, "finished_at": 20.0}}
    progress = {"a3": {"epoch": 5, "epochs": 10}}
    eta = estimate_eta(statuses, results, progress)
    # group A mean 15 s: a3 half done (7.5) + a4 (15); B has no done cell: the sweep mean (15);
    # failed and never submitted cells wait for the user; one task runs
    assert eta == {"seconds": 37.5, "parallel_tasks": 1, "cells_left": 3, "mean_cell_seconds": 15.0}
    # two tasks running side by side halve the wall time
    statuses[3] = _st("a4", "A", "running", "t2")
    assert estimate_eta(statuses, results, progress)["seconds"] == pytest.approx((7.5 + 15 + 15) / 2, abs=0.1)
    # nothing finished yet: no estimate rather than a made-up one
    assert estimate_eta([_st("x", "A", "pending")], {}, {})["seconds"] is None
    assert estimate_eta([_st("x", "A", "done")], {"x": {"started_at": 0.0, "finished_at": 4.0}}, {})["seconds"] == 0


def test_group_progress_names_the_slowest_running_cell() -> None:
    statuses = [_st("a", "G", "running"), _st("b", "G", "running"), _st("c", "G", "timeout"), _st("d", "G", "done")]
    rows = group_progress(statuses, {"a": {"epoch": 7, "epochs": 10}, "b": {"epoch": 2, "epochs": 10}})
    assert rows["G"] == {"done": 1, "running": 2, "pending": 0, "failed": 1, "not_submitted": 0,
                         "slowest": {"cell_id": "b", "epoch": 2, "epochs": 10}}  # fmt: skip
    # a running cell without a progress file (queued behind another cell of its Slurm task)
    # is not the slowest while others have progress; alone, it is "starting"
    rows = group_progress([*statuses, _st("e", "G", "running")], {"a": {"epoch": 7, "epochs": 10}})
    assert rows["G"]["slowest"] == {"cell_id": "a", "epoch": 7, "epochs": 10}
    rows = group_progress([_st("e", "G", "running")], {})
    assert rows["G"]["slowest"] == {"cell_id": "e", "epoch": 0, "epochs": None}


# --------------------------------------------------------------------------- status, next steps, logs


def test_status_shows_groups_progress_eta_and_next_steps(staged, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file, sweep, ids = staged
    assert cli.main(["status", str(sweep_file)]) == 0
    out = capsys.readouterr().out
    assert "epoch 3 of 10" in out and "epoch 8 of 10" in out, out
    assert "ETA " in out and "2 tasks running" in out, out
    assert f"next: aullm-grid retry {sweep_file} --failed" in out
    assert f"next: aullm-grid logs {sweep_file} {ids[3]}" in out
    assert f"next: aullm-grid status {sweep_file} --watch" in out
    assert f"log: {sweep.path}/jobs/local-1/4242/4242_0_log.out" in out  # the failed cell's task log
    assert "\033[" not in out  # not a terminal: no control codes

    # --json: per-cell states, per-group rows, the ETA, and the sweep named
    assert cli.main(["status", str(sweep.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "status" and data["sweep"] == str(sweep.path)
    assert data["sweep_dir"] == str(sweep.path.resolve())
    states = {c["cell_id"]: c["state"] for c in data["cell_states"]}
    assert states == {ids[0]: "done", ids[1]: "done", ids[2]: "running", ids[3]: "failed", ids[4]: "running",
                      ids[5]: "pending"}  # fmt: skip
    running = next(c for c in data["cell_states"] if c["cell_id"] == ids[4])
    assert (running["epoch"], running["epochs"]) == (8, 10)
    assert data["eta"]["parallel_tasks"] == 2 and data["eta"]["seconds"] is not None


def test_logs_prints_the_tail_of_the_cells_task_log(staged, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file, _sweep, ids = staged
    assert cli.main(["logs", str(sweep_file), ids[3], "--lines", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("==> ") and out[1:] == [f"aullm-grid: cell {ids[3]} epoch 4 train_loss 0.5", "Traceback: boom"]
    assert cli.main(["logs", str(sweep_file), "no-such-cell"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-cell" in err[0]


def test_watch_either_side_and_plain_lines_off_a_terminal(staged, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file, sweep, ids = staged
    for cid in (ids[2], ids[4], ids[5]):  # finish the sweep so that --watch returns
        sweep.write_result(cid, {"status": "done", "started_at": 0.0, "finished_at": 1.0})
    for argv in (["status", "--watch", str(sweep_file)], ["status", str(sweep.path), "--watch", "1"],
                 ["status", "--watch", "1", str(sweep_file)]):  # fmt: skip
        assert cli.main(argv) == 0, argv
        out = capsys.readouterr().out
        first = out.splitlines()[0]
        assert "5/6 done, 0 running, 0 pending, 1 failed" in first, first  # the plain progress line
        assert "\033[" not in out
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--watch", "0", str(sweep_file)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--watch" in err[0] and "> 0" in err[0]
    sweep.write_result(ids[3], {"status": "done", "started_at": 0.0, "finished_at": 1.0})
    assert cli.main(["status", str(sweep_file)]) == 0
    assert f"next: aullm-grid collect {sweep_file}" in capsys.readouterr().out


def test_status_without_argument_lists_each_sweep_once(staged, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    sweep_file, sweep, _ids = staged
    # a second file naming the same output_dir is the same sweep
    twin = sweep_file.with_name("twin.yaml")
    data = yaml.safe_load(sweep_file.read_text())
    twin.write_text(yaml.safe_dump({**data, "output_dir": str(sweep.path)}))
    monkeypatch.chdir(sweep_file.parent.parent)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count(str(sweep.path)) >= 1 and out.count("slowest running") == 1, out
    assert cli.main(["status", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["sweeps"]
    assert [s["sweep_dir"] for s in listed] == [str(sweep.path.resolve())]


def test_every_json_names_the_sweep(staged, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file, sweep, ids = staged
    for argv in (["validate", str(sweep.path), "--json"], ["logs", str(sweep.path), ids[3], "--json"],
                 ["cancel", str(sweep_file), "--dry-run", "--json"], ["retry", str(sweep.path), "--dry-run", "--json"],
                 ["collect", str(sweep.path), "--json", "--no-mlflow", "--no-plots", "--out", str(sweep.path / "t")]):
        assert cli.main(argv) == 0, argv
        data = json.loads(capsys.readouterr().out)
        assert data["command"] == argv[0] and data["sweep"] == argv[1], (argv, data)
        assert data["sweep_dir"] == str(sweep.path.resolve()), (argv, data)
    assert (sweep.path / "t" / "tables.md").is_file()


def test_retry_says_when_cells_are_done_and_force_never_overwrites(staged, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file, sweep, ids = staged
    assert cli.main(["retry", str(sweep_file), "--cells", ids[0], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "already done, not resubmitted" in out and ids[0] in out and "--force" in out, out
    assert cli.main(["retry", str(sweep_file), "--cells", ids[0], "--force", "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["already_done"] == [ids[0]] and data["retried"] == [ids[0]] and data["dry_run"] is True
    assert sweep.result_path(ids[0]).is_file()  # a dry run moves nothing
    # what --force does before it submits: the result goes aside, a second time beside the first
    first = sweep.result_path(ids[0]).read_text()
    assert sweep.supersede_result(ids[0]) == sweep.superseded_dir / f"{ids[0]}.1.json"
    sweep.write_result(ids[0], {"status": "done", "started_at": 1.0, "finished_at": 2.0})
    assert sweep.supersede_result(ids[0]) == sweep.superseded_dir / f"{ids[0]}.2.json"
    assert (sweep.superseded_dir / f"{ids[0]}.1.json").read_text() == first


def test_cancel_asks_on_a_terminal(staged, supervisor: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    sweep_file, _sweep, _ids = staged
    assert cli.main(["cancel", str(sweep_file), "--dry-run"]) == 0
    assert "would cancel 0 Slurm jobs (none) and 1 local supervisors" in capsys.readouterr().out
    assert supervisor.poll() is None
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["cancel", str(sweep_file)]) == 1
    assert "not cancelled" in capsys.readouterr().out and supervisor.poll() is None
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert cli.main(["cancel", str(sweep_file)]) == 0
    assert supervisor.wait(timeout=30) != 0
    assert "next: aullm-grid retry" in capsys.readouterr().out


def test_version_and_examples_in_every_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("aullm-grid ")
    for argv in (["validate"], ["submit"], ["status"], ["logs"], ["collect"], ["retry"], ["cancel"],
                 ["data", "synth"], ["model", "tiny"]):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        lines = capsys.readouterr().out.rstrip().splitlines()
        examples = lines[lines.index("examples:") + 1 :]
        assert 1 <= len(examples) <= 3 and all(e.startswith("  aullm-grid ") for e in examples), (argv, lines)
        assert any(" ".join(argv) in e for e in examples)
