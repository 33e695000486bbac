"""`aullm-grid validate` / `submit --dry-run` / `data synth` on real (synthetic) datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.ledger import SweepDir

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
SUBJECTS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic CASME II and SAMM written by `aullm-grid data synth`, and a model folder."""
    root = tmp_path_factory.mktemp("assets")
    for layout in ("casme2", "samm"):
        code = cli.main(
            ["data", "synth", "--layout", layout, "--out", str(root / layout),
             "--subjects", str(SUBJECTS), "--clips-per-subject", "1"]
        )
        assert code == 0
    model = root / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")  # validate checks the folder, it never loads it
    return {"casme2": root / "casme2", "samm": root / "samm", "model": model}


def good_sweep(tmp_path: Path, assets: dict[str, Path], **over: object) -> Path:
    spec = {
        "name": "t",
        "output_dir": "out",
        "datasets": {"casme2": {"root": str(assets["casme2"])}, "samm": {"root": str(assets["samm"])}},
        "llms": {"tiny": {"path": str(assets["model"])}},
        "grid": [
            {"datasets": ["casme2", "samm"], "variants": ["all", "no_llm"]},
            {"protocol": "cross_domain", "pairs": [{"train": "casme2", "test": "samm"}], "variants": ["all"]},
        ],
        "training": {"epochs": 3},
        "resources": {"executor": "local", "cells_per_task": 4},
        **over,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


EXPECTED_CELLS = 2 * SUBJECTS * 2 + 1  # (casme2 + samm folds) x (all, no_llm) + one cross-domain


def test_synth_wrote_the_official_layout(assets: dict[str, Path]) -> None:
    assert list(assets["casme2"].glob("CASME2-coding-*.xlsx"))
    assert (assets["samm"] / "SAMM_Micro_FACS_Codes_v2.xlsx").is_file()


def test_validate_counts_cells(tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = good_sweep(tmp_path, assets)
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"cells: {EXPECTED_CELLS} " in out and "valid" in out
    assert cli.main(["validate", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cells"] == EXPECTED_CELLS
    assert summary["subjects"] == {"casme2": SUBJECTS, "samm": SUBJECTS}
    assert summary["tasks"] == 2 + 2  # 6 no_llm cells -> 2 tasks of <= 4; 7 tiny-LLM cells -> 2 tasks
    assert not (tmp_path / "out").exists()


def test_submit_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = good_sweep(tmp_path, assets)
    assert cli.main(["submit", str(path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cells"] == EXPECTED_CELLS
    assert len(plan["cell_ids"]) == EXPECTED_CELLS and "casme2-to-samm__tiny__all__s1" in plan["cell_ids"]
    assert plan["skipped_done"] == 0
    assert plan["tasks"] == sum(a.get("tasks", a.get("task_count", 0)) for a in plan["arrays"])
    assert not (tmp_path / "out").exists()


# 13 cells in 4 tasks of <= 4: the 7 tiny-LLM cells of variant all (4 + 3) and the 6 no_llm
# cells (3 + 3: packed per dataset), which always train one by one
@pytest.mark.parametrize(
    ("concurrent", "planned", "loops", "cells_per_loop", "note"),
    [
        (None, 1, 13, 1, "auto (resolved per task: 1 on CPU, from measured memory on a GPU); loops counted at K=1"),
        ("auto", 1, 13, 1, "a GPU may pack more cells a loop"),
        (1, 1, 13, 1, "1 (set in the sweep)"),
        (3, 3, 2 + 1 + 6, 3, "3 (set in the sweep)"),  # all: 4 -> 3 + 1, 3 -> 3; no_llm: 6 alone
        (8, 8, 1 + 1 + 6, 4, "8 (set in the sweep)"),  # a loop holds at most its task's cells
    ],
)
def test_dry_run_shows_concurrent_cells_and_the_loops_it_implies(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str],
    concurrent: object, planned: int, loops: int, cells_per_loop: int, note: str,
) -> None:  # fmt: skip
    resources = {"executor": "local", "cells_per_task": 4}
    if concurrent is not None:
        resources["concurrent_cells"] = concurrent
    path = good_sweep(tmp_path, assets, resources=resources)
    assert cli.main(["submit", str(path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["concurrent_cells"] == (concurrent or "auto")  # as the sweep set it (default auto)
    assert plan["concurrent_cells_planned"] == planned
    assert note in plan["concurrent_cells_note"]
    assert plan["tasks"] == 4 and plan["loops"] == loops
    (array,) = plan["arrays"]
    assert array["cells_per_loop"] == cells_per_loop
    assert array["loops_per_task"] == (4 if planned == 1 else 3)  # K > 1: a no_llm task's 3 loops are the most
    assert not (tmp_path / "out").exists()


# workers, processes per task, cpus_per_task, OMP_NUM_THREADS in the environment, tasks, cores
# -> the threads the local executor would run at once (None: they fit, nothing is said)
@pytest.mark.parametrize(
    ("workers", "processes", "cpus", "omp", "tasks", "cores", "busy"),
    [
        (2, 1, 1, None, 4, 2, None),  # the demo: 2 workers of 1 thread on 2 cores
        (2, 1, 2, None, 4, 2, 4),
        (4, 1, 1, None, 4, 2, 4),
        (4, 1, 1, None, 1, 2, None),  # one task: one worker busy, whatever max_local_workers says
        (1, 2, 1, None, 4, 2, None),
        (2, 2, 1, None, 4, 2, 4),
        (2, 1, 1, "3", 4, 2, 6),  # the user's OMP_NUM_THREADS wins over cpus_per_task, as in submit_local
        (2, 1, 4, "1", 4, 2, None),
        (2, 1, 2, "many", 4, 2, 4),  # not a number: the task runs cpus_per_task threads
        (8, 2, 4, None, 8, 64, None),
    ],
)
def test_an_oversubscribed_local_sweep_is_said(
    monkeypatch: pytest.MonkeyPatch, workers: int, processes: int, cpus: int, omp: str | None, tasks: int, cores: int,
    busy: int | None,
) -> None:  # fmt: skip
    from orchestrator.launch.submit import local_oversubscription
    from orchestrator.sweep.spec import ResourcesSpec

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    resources = ResourcesSpec(executor="local", max_local_workers=workers, processes_per_task=processes,
                              cpus_per_task=cpus)  # fmt: skip
    said = local_oversubscription(resources, tasks, cores)
    if busy is None:
        assert said is None
    else:
        assert said is not None and said.startswith(f"the local executor will run {busy} threads at once")
        assert f"on {cores} cores" in said
    # Slurm places tasks on cores itself: never said there
    slurm = ResourcesSpec(executor="slurm", max_local_workers=workers, processes_per_task=processes, cpus_per_task=cpus)
    assert local_oversubscription(slurm, tasks, cores) is None


def test_submit_says_an_oversubscribed_local_sweep_on_stderr_and_in_its_json(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.launch.submit as submit

    monkeypatch.setattr(submit, "usable_cores", lambda: 2)  # the same answer on any machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = good_sweep(tmp_path, assets, resources={"executor": "local", "cells_per_task": 4, "max_local_workers": 4})
    assert cli.main(["submit", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("aullm-grid: warning: the local executor will run 4 threads at once (4 task(s) x 1")
    assert json.loads(captured.out)["warnings"] == [line.removeprefix("aullm-grid: warning: ")]
    path = good_sweep(tmp_path, assets, resources={"executor": "local", "cells_per_task": 4, "max_local_workers": 2})
    assert cli.main(["submit", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "warnings" not in json.loads(captured.out)
    assert not (tmp_path / "out").exists()


def test_changed_training_settings_are_refused(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.launch.prepare import prepare

    spec, _, cells = prepare(str(good_sweep(tmp_path, assets)))
    SweepDir(spec.output_dir).write_manifest(spec, cells)
    path = good_sweep(tmp_path, assets, training={"epochs": 5})
    assert cli.main(["submit", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.epochs" in err[0] and "new output_dir" in err[0]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        ([], "validate"),
        (["validate"], "Check a sweep file"),
        (["submit"], "--dry-run"),
        (["status"], "--watch"),
        (["collect"], "--out"),
        (["retry"], "--failed"),
        (["cancel"], "Cancel every live job"),
        (["data"], "synth"),
        (["data", "synth"], "--layout"),
    ],
)
def test_every_command_has_help(argv: list[str], expect: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert expect in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["validate"], ["data", "synth", "--layout", "casme9", "--out", "x"],
     ["data", "synth", "--layout", "samm", "--out", "x", "--subjects", "0"], ["status", "--watch", "-1"]],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


# ---------------------------------------------------------------- as a subprocess


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


def test_subprocess_validate_good_and_bad(tmp_path: Path, assets: dict[str, Path]) -> None:
    good = good_sweep(tmp_path, assets)
    started = time.perf_counter()
    proc = run_cli("validate", str(good))
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert f"cells: {EXPECTED_CELLS} " in proc.stdout
    print(f"validate took {elapsed:.2f} s")  # reported, not asserted (shared CI cores)

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("executor: local", "executor: slrum"))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "slrum" in text)
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"aullm-grid: error: {bad}: field 'resources.executor': 'slrum' is not one of slurm, local, debug (line {line})"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_commands_do_not_import_heavy_libraries(tmp_path: Path, assets: dict[str, Path]) -> None:
    """validate and submit --dry-run must answer without torch, transformers, mlflow, submitit."""
    good = good_sweep(tmp_path, assets)
    code = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        f"assert main(['validate', {str(good)!r}]) == 0\n"
        f"assert main(['submit', {str(good)!r}, '--dry-run']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'mlflow', 'submitit', 'peft', 'deepspeed') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
