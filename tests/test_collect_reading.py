"""How `collect` reads a large sweep quickly without changing what it computes: only the
needed lines of each result file, per-subject F1 in one pass, figures drawn in workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aullm.errors import UserInputError
from orchestrator.results import plots
from orchestrator.sweep.cells import Cell, make_cell_id
from aullm.metrics import per_subject_micro_f1
from orchestrator.results.collect import RESULT_FIELDS, _read_results, collect_groups, write_outputs
from orchestrator.ledger import SweepDir
from orchestrator.results.tables import build_tables, load_paper_tables


def test_only_the_wanted_lines_are_parsed(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    path = sweep.write_result("c", {"status": "done", "predictions": {"aus": [2]}, "epoch_losses": [0.5] * 3,
                                    "traceback": 'line "one"\nline two'})  # fmt: skip
    assert sweep.read_result_fields("c", ("status", "predictions", "error")) == {
        "status": "done", "predictions": {"aus": [2]}}  # fmt: skip
    # break a line that is not asked for: it is never parsed
    text = path.read_text().replace('"epoch_losses": [0.5,0.5,0.5]', '"epoch_losses": [0.5,')
    path.write_text(text)
    assert sweep.read_result_fields("c", ("cell_id", "status"))["cell_id"] == "c"
    with pytest.raises(UserInputError, match="c.json"):
        sweep.read_result("c")


def test_files_written_another_way_are_parsed_whole(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.results_dir.mkdir(parents=True)
    payload = {"predictions": {"status": "nested, not the top-level one"}, "status": "failed", "error": "x"}
    (sweep.results_dir / "indented.json").write_text(json.dumps(payload, indent=1) + "\n")
    (sweep.results_dir / "one-line.json").write_text(json.dumps(payload))
    for cid in ("indented", "one-line"):
        assert sweep.read_result_fields(cid, ("status", "error", "predictions")) == payload
    with pytest.raises(UserInputError, match="no result"):
        sweep.read_result_fields("absent", ("status",))


def test_read_results_keeps_the_ledger_rules(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s")
    sweep.write_result("done", {"status": "done", "predictions": {"aus": [1]}, "epoch_losses": [1.0]})
    sweep.write_result("failed", {"status": "failed", "error": "OOM", "traceback": "..."})
    sweep.write_result("torn", {"status": "done", "predictions": {"aus": [1]}})
    torn = sweep.result_path("torn")
    torn.write_text(torn.read_text()[:-8])  # the head says done, the rest is cut off
    (sweep.results_dir / "garbage.json").write_text("not json at all")  # no readable status: as if absent
    (sweep.results_dir / "odd.json").write_text(json.dumps({"status": "running"}))
    ids = ["done", "failed", "torn", "garbage", "odd", "missing"]
    results = _read_results(sweep, ids)
    assert sorted(results) == ["done", "failed", "torn"]
    assert results["done"] == {"cell_id": "done", "status": "done", "predictions": {"aus": [1]}}
    assert set(results["failed"]) <= set(RESULT_FIELDS) and results["failed"]["error"] == "OOM"
    assert results["torn"]["status"] == "unreadable" and "unreadable result file" in results["torn"]["error"]


def test_per_subject_f1_matches_a_mask_per_subject() -> None:
    rng = np.random.default_rng(0)
    subjects = list(rng.choice(["s10", "s2", "s7", "quiet"], size=60))
    pred = rng.uniform(size=(60, 4)) < 0.3
    y = rng.uniform(size=(60, 4)) < 0.3
    quiet = np.array([s == "quiet" for s in subjects])
    pred[quiet], y[quiet] = False, False  # nothing to find, nothing found: F1 undefined
    got = per_subject_micro_f1(pred.astype(float), y.astype(int), subjects)
    assert list(got) == list(dict.fromkeys(subjects))  # order of first appearance
    for s, f1 in got.items():
        m = np.array([x == s for x in subjects])
        tp, fp, fn = int((pred[m] & y[m]).sum()), int((pred[m] & ~y[m]).sum()), int((~pred[m] & y[m]).sum())
        expected = None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert f1 == pytest.approx(expected) if expected is not None else f1 is None


def _small_grid() -> tuple[list[Cell], dict[str, dict]]:
    rng = np.random.default_rng(1)
    cells, results = [], {}
    for data, aus, folds in (("samm", [2, 4, 7, 12], ["006", "007"]), ("casme2", [1, 2, 4, 7, 12, 14, 15, 17], ["1", "2"])):
        for llm, variant in (("qwen2-1.5b", "all"), (None, "no_llm")):
            for fold in folds:
                cid = make_cell_id(kind="loso", train=data, test=data, fold=fold, llm=llm, variant=variant, seed=1)
                cells.append(Cell(cid, "loso", data, data, data, fold, llm, "/m" if llm else None, variant, 1))
                keys = [f"{data}/{fold}/clip{j}" for j in range(3)]
                results[cid] = {"status": "done", "predictions": {
                    "sample_keys": keys, "subjects": [fold] * 3, "aus": aus,
                    "probs": rng.uniform(size=(3, len(aus))).round(3).tolist(),
                    "labels": (rng.uniform(size=(3, len(aus))) < 0.4).astype(int).tolist()}}  # fmt: skip
    return cells, results


def test_figures_drawn_in_workers_are_those_drawn_in_one_process(tmp_path: Path) -> None:
    cells, results = _small_grid()
    groups = collect_groups(cells, results)
    assert all(g.complete for g in groups)
    tables = build_tables(groups, load_paper_tables())
    alone = tmp_path / "alone"
    alone.mkdir()
    expected = sorted(p.name for p in plots.write_plots(groups, tables, alone))
    assert len(expected) == 6 and "per_subject_samm.png" in expected and "f1_per_au_casme2.png" in expected
    assert "all_vs_no_llm_samm.png" in expected  # all and no_llm both ran
    calls: list[str] = []
    files = write_outputs(groups, tmp_path / "out", tables=tables, while_plotting=lambda: calls.append("here"))
    assert calls == ["here"]
    drawn = sorted(p.name for p in files if p.suffix == ".png")
    assert drawn == expected
    for name in expected:  # the Agg canvas is deterministic: same figure, same bytes
        assert (tmp_path / "out" / name).read_bytes() == (alone / name).read_bytes(), name
    assert not list(tmp_path.glob(".out.tmp-*"))
