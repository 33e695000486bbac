"""Bad datasets: `submit` finds them before anything is written (issue 5).

Each case copies a valid synthetic dataset and breaks one thing in it (a corrupt, empty
or truncated frame, a sheet missing a column, a fold left without samples, ...). The
real `submit` (in-process through `orchestrator.cli.main`) must exit 2 with one line
naming the dataset field and what is wrong, without a traceback, and must leave no
sweep directory and no frame cache behind: `submit` decodes every frame once
(`orchestrator.launch.submit.preflight_datasets`) before it writes the manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import cli

CASME2_SHEET = "CASME2-coding-20140508.xlsx"
CASME2_FRAMES = "CASME2_RAW_selected"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aullm.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("bad-dataset-assets")
    return {
        "casme2": write_synthetic("casme2", root / "casme2", subjects=3, seed=0, clips_per_subject=1),
        "samm": write_synthetic("samm", root / "samm", subjects=2, seed=0, clips_per_subject=1),
    }


def _frames(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg") if p.is_file())


def _clip_dirs(root: Path, frames: str) -> list[Path]:
    return sorted({p.parent for p in _frames(root / frames)})


# --- mutations: (dataset root) -> None; they break the copy in place


def frame_bytes(content: Callable[[bytes], bytes], *, which: int = 0, frames: str = CASME2_FRAMES) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = _frames(root / frames)[which]
        path.write_bytes(content(path.read_bytes()))

    return mutate


def frame_is_a_folder(root: Path) -> None:
    path = _frames(root / CASME2_FRAMES)[3]
    path.unlink()
    path.mkdir()


def empty_clip_folder(root: Path) -> None:
    for frame in _frames(_clip_dirs(root, CASME2_FRAMES)[0]):
        frame.unlink()


def missing_clip_folder(root: Path) -> None:
    shutil.rmtree(_clip_dirs(root, CASME2_FRAMES)[-1])


def sheet(edit: Callable[[Any], None], name: str = CASME2_SHEET) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        import openpyxl

        wb = openpyxl.load_workbook(root / name)
        edit(wb.active)
        wb.save(root / name)

    return mutate


def drop_column(header: str) -> Callable[[Any], None]:
    def edit(ws: Any) -> None:
        names = [c.value for c in ws[1]]
        ws.delete_cols(names.index(header) + 1)

    return edit


def keep_rows_of(subject: str) -> Callable[[Any], None]:
    """Only `subject`'s clips stay: its LOSO fold has nothing to train on."""

    def edit(ws: Any) -> None:
        for row in range(ws.max_row, 1, -1):
            # the synthetic sheet keeps CASME II's quirks: subject 1 is written '01' or 1
            if str(ws.cell(row, 1).value).lstrip("0") != subject:
                ws.delete_rows(row)

    return edit


def header_only(ws: Any) -> None:
    ws.delete_rows(2, ws.max_row)


def empty_file(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(b"")


Case = tuple[str, str, Callable[[Path], None], tuple[str, ...]]

CASES: list[Case] = [
    # --- frames (found only by decoding them)
    ("corrupt-jpeg", "casme2", frame_bytes(lambda b: b"this is not a jpeg" * 10), ("field 'datasets.casme2'", ".jpg", "not a readable image")),
    ("empty-frame", "casme2", frame_bytes(lambda b: b""), ("field 'datasets.casme2'", ".jpg")),
    ("truncated-jpeg", "casme2", frame_bytes(lambda b: b[: len(b) // 3], which=5), ("field 'datasets.casme2'", ".jpg")),
    ("jpeg-header-only", "casme2", frame_bytes(lambda b: b[:200], which=-1), ("field 'datasets.casme2'", ".jpg")),
    ("random-bytes-frame", "casme2", frame_bytes(lambda b: bytes(range(256)) * 8, which=7), ("field 'datasets.casme2'", ".jpg")),
    ("corrupt-samm-frame", "samm", frame_bytes(lambda b: b"\xff\xd8garbage", frames="SAMM"), ("field 'datasets.samm'", ".jpg")),
    ("frame-is-a-folder", "casme2", frame_is_a_folder, ("field 'datasets.casme2'",)),
    ("empty-clip-folder", "casme2", empty_clip_folder, ("field 'datasets.casme2'",)),
    ("missing-clip-folder", "casme2", missing_clip_folder, ("field 'datasets.casme2'",)),
    # --- coding sheets
    ("sheet-without-subject", "casme2", sheet(drop_column("Subject")), ("field 'datasets.casme2'", "Subject")),
    ("sheet-without-filename", "casme2", sheet(drop_column("Filename")), ("field 'datasets.casme2'", "Filename")),
    ("sheet-without-onset", "casme2", sheet(drop_column("OnsetFrame")), ("field 'datasets.casme2'", "OnsetFrame")),
    ("sheet-without-offset", "casme2", sheet(drop_column("OffsetFrame")), ("field 'datasets.casme2'", "OffsetFrame")),
    ("sheet-without-aus", "casme2", sheet(drop_column("Action Units")), ("field 'datasets.casme2'", "Action Units")),
    ("sheet-header-only", "casme2", sheet(header_only), ("field 'datasets.casme2'",)),
    ("empty-sheet-file", "casme2", empty_file(CASME2_SHEET), ("field 'datasets.casme2'", CASME2_SHEET)),
    # --- folds
    ("fold-without-training-samples", "casme2", sheet(keep_rows_of("1")), ("field 'datasets.casme2'", "has no training samples")),
]


def _sweep(tmp_path: Path, roots: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "bad-dataset",
        "output_dir": str(tmp_path / "out"),
        "datasets": {name: {"root": str(root)} for name, root in roots.items()},
        "seeds": [1],
        "grid": [{"protocol": "loso", "datasets": sorted(roots), "variants": ["no_llm"]}],
        "training": {"epochs": 1},
        "resources": {"executor": "local", "cells_per_task": 3},
        "tracking": {"uri": None},
    }


def _copy_datasets(tmp_path: Path, pristine: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name, src in pristine.items():
        out[name] = tmp_path / "data" / name
        shutil.copytree(src, out[name])
    return out


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_pristine_datasets_pass_and_warm_the_cache(tmp_path: Path, pristine: dict[str, Path]) -> None:
    from orchestrator.launch.prepare import prepare
    from orchestrator.launch.submit import preflight_datasets

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path, _copy_datasets(tmp_path, pristine))))
    spec, _subjects, cells = prepare(str(path))
    # `validate`'s form: the same checks, nothing written
    assert preflight_datasets(spec, cells, write_cache=False) == {"casme2": 3, "samm": 2}
    assert not (tmp_path / "out").exists()
    assert preflight_datasets(spec, cells) == {"casme2": 3, "samm": 2}
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "out" / "cache").iterdir())
    assert cached == ["casme2", "samm"]  # one cache file per dataset, ready for the tasks
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").iterdir()}
    preflight_datasets(spec, cells)  # a second submit (a retry) reads the cache, writes nothing
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").iterdir()} == before


@pytest.mark.parametrize(("case_id", "dataset", "mutate", "expects"), CASES, ids=[c[0] for c in CASES])
def test_bad_dataset(
    case_id: str,
    dataset: str,
    mutate: Callable[[Path], None],
    expects: tuple[str, ...],
    tmp_path: Path,
    pristine: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    roots = _copy_datasets(tmp_path, pristine)
    mutate(roots[dataset])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(_sweep(tmp_path, roots)))
    code, stdout, stderr = _main(["submit", str(sweep)], capsys)
    assert code == 2, f"{case_id}: exit {code}; stdout {stdout!r}; stderr {stderr!r}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    assert lines[0].startswith("aullm-grid: error: ") and str(sweep) in lines[0]
    for expected in expects:
        assert expected in lines[0], f"{case_id}: {expected!r} not in {lines[0]!r}"
    assert stdout == ""
    assert not (tmp_path / "out").exists(), f"{case_id}: the sweep directory was written"
