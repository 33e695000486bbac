"""The collector against a hand computation.

A small SAMM grid (AUs 2, 4, 7, 12; folds 006 and 007 of two clips each) whose
predictions were chosen so that every F1 can be worked out on paper; the expected
numbers below are those hand computations (fractions in the comments), not the output
of aullm.metrics. Every cell of every table the grid produces is checked, including a
group with a missing and a failed fold, which must be reported incomplete and never
averaged over the folds it has.
"""

from __future__ import annotations

import csv
import io
import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from aullm.errors import UserInputError
from orchestrator.sweep.cells import Cell, make_cell_id
from orchestrator.results.collect import collect_groups, collect_job, collect_main, collect_sweep, write_outputs
from orchestrator.results.tables import build_tables, load_paper_tables, to_markdown

from tests.helpers import write_hand_sweep

AUS = [2, 4, 7, 12]
# Four clips: a, b test in fold 006, c, d in fold 007. Columns: AU2, AU4, AU7, AU12.
SAMPLES = [("006", "a"), ("006", "b"), ("007", "c"), ("007", "d")]
LABELS = [
    [1, 1, 0, 1],
    [0, 1, 0, 1],
    [1, 0, 0, 1],
    [0, 0, 1, 0],
]
# Seed 1, binary F1 at 0.5 (pred >= 0.5):
#   AU2  pred 1,0,0,1 vs 1,0,1,0: tp1 fp1 fn1 -> 1/2     AU4  pred 1,1,0,0: perfect -> 1
#   AU7  pred 1,0,0,0 vs 0,0,0,1: tp0 -> 0               AU12 pred 1,1,0,0 vs 1,1,1,0: tp2 fn1 -> 4/5
#   average 0.575
# paper_compatible (max over t in 0.10..0.85 of (F1_pos + F1_neg) / 2):
#   AU2  t in (0.2, 0.4]: pos 4/5, neg 2/3 -> 11/15      AU4  t = 0.5 perfect -> 1
#   AU7  t in (0.2, 0.3]: pos 2/3, neg 4/5 -> 11/15      AU12 t in (0.1, 0.2] perfect -> 1
#   average 13/15
PROBS_SEED1 = [
    [0.9, 0.7, 0.6, 0.9],
    [0.2, 0.8, 0.1, 0.55],
    [0.4, 0.1, 0.2, 0.2],
    [0.6, 0.3, 0.3, 0.1],
]
# Seed 2, binary: AU2 perfect -> 1; AU4 pred 1,0,0,0: tp1 fn1 -> 2/3; AU7 perfect -> 1;
#   AU12 pred 1,1,0,1: tp2 fp1 fn1 -> 2/3; average 5/6
# paper_compatible: AU2 1; AU4 t in (0.1, 0.3] or (0.3, 0.7]: 11/15; AU7 1;
#   AU12 t in (0.7, 0.85]: pos 1/2, neg 1/2 -> 1/2; average 97/120
PROBS_SEED2 = [
    [0.9, 0.7, 0.1, 0.9],
    [0.2, 0.3, 0.1, 0.55],
    [0.8, 0.1, 0.2, 0.2],
    [0.1, 0.3, 0.9, 0.7],
]
# Perfect except AU7, where every probability is 0.1: binary AU7 = 0 (nothing predicted),
# paper_compatible AU7: t = 0.10 -> all positive: pos 2/5, neg 0 -> 1/5; t > 0.10 -> all
# negative: pos 0, neg 6/7 -> 3/7. So binary 1, 1, 0, 1 (avg 3/4), compatible 1, 1, 3/7, 1 (avg 6/7).
PROBS_BASE = [[0.9 if y else 0.1 for y in row[:2]] + [0.1] + [0.9 if row[3] else 0.1] for row in LABELS]

R2 = math.sqrt(2.0)  # two seeds: sample std = |a - b| / sqrt(2)


def _cell(llm: str | None, variant: str, seed: int, fold: str | None, *, cross: bool = False) -> Cell:
    kind = "cross_domain" if cross else "loso"
    train, test = ("casme2", "samm") if cross else ("samm", "samm")
    return Cell(
        cell_id=make_cell_id(kind=kind, train=train, test=test, fold=fold, llm=llm, variant=variant, seed=seed),
        kind=kind,  # type: ignore[arg-type]
        dataset="casme2_to_samm" if cross else "samm",
        train_dataset=train,
        test_dataset=test,
        fold=fold,
        llm=llm,
        llm_path=f"/models/{llm}" if llm else None,
        variant=variant,
        seed=seed,
    )


def _done(cell: Cell, probs: list[list[float]]) -> dict[str, Any]:
    rows = [i for i, (fold, _) in enumerate(SAMPLES) if cell.fold is None or fold == cell.fold]
    return {
        "cell_id": cell.cell_id,
        "status": "done",
        "predictions": {
            "sample_keys": [f"samm/{SAMPLES[i][0]}/{SAMPLES[i][1]}" for i in rows],
            "subjects": [SAMPLES[i][0] for i in rows],
            "aus": AUS,
            "probs": [probs[i] for i in rows],
            "labels": [LABELS[i] for i in rows],
        },
        "epoch_losses": [0.5, 0.4],
    }


def hand_grid() -> tuple[list[Cell], dict[str, dict[str, Any]]]:
    """Six groups: A qwen2/all (2 seeds), B no_llm, C qwen2.5/all (incomplete), D tiny-qwen2/all,
    E qwen2/f_high, F cross-domain casme2 -> samm qwen2/all."""
    cells: list[Cell] = []
    results: dict[str, dict[str, Any]] = {}

    def add(cell: Cell, probs: list[list[float]] | None, failed: bool = False) -> None:
        cells.append(cell)
        if failed:
            results[cell.cell_id] = {"cell_id": cell.cell_id, "status": "failed", "error": "RuntimeError: CUDA OOM"}
        elif probs is not None:
            results[cell.cell_id] = _done(cell, probs)

    for fold in ("006", "007"):
        add(_cell("qwen2-1.5b", "all", 1, fold), PROBS_SEED1)  # A
        add(_cell("qwen2-1.5b", "all", 2, fold), PROBS_SEED2)
        add(_cell(None, "no_llm", 1, fold), PROBS_BASE)  # B
        add(_cell("tiny-qwen2", "all", 1, fold), PROBS_BASE)  # D
        add(_cell("qwen2-1.5b", "f_high", 1, fold), PROBS_BASE)  # E
    # C: seed 1 lacks fold 007 (no result), seed 2's fold 006 failed.
    add(_cell("qwen2.5-1.5b", "all", 1, "006"), PROBS_SEED1)
    add(_cell("qwen2.5-1.5b", "all", 1, "007"), None)
    add(_cell("qwen2.5-1.5b", "all", 2, "006"), None, failed=True)
    add(_cell("qwen2.5-1.5b", "all", 2, "007"), PROBS_SEED2)
    add(_cell("qwen2-1.5b", "all", 1, None, cross=True), PROBS_BASE)  # F
    return cells, results


# Hand-computed scores in percent: column -> (mean, std) over seeds.
A_OURS = {"AU2": (75.0, 50 / R2), "AU4": (250 / 3, 100 / 3 / R2), "AU7": (50.0, 100 / R2),
          "AU12": (220 / 3, 40 / 3 / R2), "Avg": (845 / 12, 310 / 12 / R2)}  # fmt: skip
A_COMPAT = {"AU2": (260 / 3, 80 / 3 / R2), "AU4": (260 / 3, 80 / 3 / R2), "AU7": (260 / 3, 80 / 3 / R2),
            "AU12": (75.0, 50 / R2), "Avg": (83.75, 35 / 6 / R2)}  # fmt: skip
BASE_OURS = {"AU2": (100.0, 0.0), "AU4": (100.0, 0.0), "AU7": (0.0, 0.0), "AU12": (100.0, 0.0), "Avg": (75.0, 0.0)}
BASE_COMPAT = {"AU2": (100.0, 0.0), "AU4": (100.0, 0.0), "AU7": (300 / 7, 0.0), "AU12": (100.0, 0.0), "Avg": (600 / 7, 0.0)}
COLS = ["AU2", "AU4", "AU7", "AU12", "Avg"]
# The paper's figures (orchestrator/data/paper_tables.yaml), same column order.
PAPER_QWEN2_SAMM = dict(zip(COLS, [63.6, 65.2, 49.2, 53.7, 57.9]))
PAPER_QWEN25_SAMM = dict(zip(COLS, [63.2, 67.6, 50.7, 57.6, 59.7]))
PAPER_SSSNET_SAMM = dict(zip(COLS, [61.5, 62.4, 45.2, 47.8, 54.2]))
PAPER_AULLM_C2S = dict(zip(COLS, [47.0, 62.4, 41.5, 48.8, 49.9]))
NONE5 = dict.fromkeys(COLS)

# (table, section, block label, column) -> (status, ours (mean, std) | None, compat | None, paper | None)
Expected = tuple[str, tuple[float, float] | None, tuple[float, float] | None, float | None]


def _block(ours: dict | None, compat: dict | None, paper: dict, status: str = "complete") -> dict[str, Expected]:
    return {c: (status, ours[c] if ours else None, compat[c] if compat else None, paper[c]) for c in COLS}


EXPECTED: dict[tuple[str, str, str], dict[str, Expected]] = {
    ("table2_samm", "", "LED baseline (no LLM)"): _block(BASE_OURS, BASE_COMPAT, PAPER_SSSNET_SAMM),
    ("table2_samm", "", "AU-Qwen2-1.5B"): _block(A_OURS, A_COMPAT, PAPER_QWEN2_SAMM),
    ("table2_samm", "", "AU-Qwen2.5-1.5B"): _block(None, None, PAPER_QWEN25_SAMM, "incomplete"),
    ("table2_samm", "", "AU-tiny-qwen2"): _block(BASE_OURS, BASE_COMPAT, NONE5),
    ("table3_ablation", "SAMM", "F_high"): {
        "Qwen2-1.5B": ("complete", BASE_OURS["Avg"], BASE_COMPAT["Avg"], 55.5),
        "Qwen2.5-1.5B": ("absent", None, None, 54.3),
        "tiny-qwen2": ("absent", None, None, None),
        "no LLM": ("absent", None, None, None),
    },
    ("table3_ablation", "SAMM", "all"): {
        "Qwen2-1.5B": ("complete", A_OURS["Avg"], A_COMPAT["Avg"], 57.9),
        "Qwen2.5-1.5B": ("incomplete", None, None, 59.7),
        "tiny-qwen2": ("complete", BASE_OURS["Avg"], BASE_COMPAT["Avg"], None),
        "no LLM": ("absent", None, None, None),
    },
    ("table3_ablation", "SAMM", "LED baseline (no LLM)"): {
        "Qwen2-1.5B": ("absent", None, None, None),
        "Qwen2.5-1.5B": ("absent", None, None, None),
        "tiny-qwen2": ("absent", None, None, None),
        # the LED-family baseline is compared with SSSNet-LED's SAMM average (Table 2)
        "no LLM": ("complete", BASE_OURS["Avg"], BASE_COMPAT["Avg"], 54.2),
    },
    ("table4_cross_domain", "CASME II → SAMM (casme2_to_samm)", "AU-Qwen2-1.5B"):
        _block(BASE_OURS, BASE_COMPAT, PAPER_AULLM_C2S),
    ("table_other_per_au", "samm", "AU-Qwen2-1.5B · F_high"): _block(BASE_OURS, BASE_COMPAT, NONE5),
}  # fmt: skip


@pytest.fixture
def grid() -> tuple[list[Cell], dict[str, dict[str, Any]]]:
    return hand_grid()


@pytest.mark.parametrize("recipe", ["paper", "script"])
def test_every_table_cell_matches_the_hand_computation(grid: tuple[list[Cell], dict], recipe: str) -> None:
    """Every number of every table, under both recipes: a Δ against the paper exists only
    for cells trained with the script's recipe, and it is paper_compatible − paper."""
    cells, results = grid
    differs = () if recipe == "script" else ("token_position",)
    groups = collect_groups(cells, results, recipe=recipe, differs_from_script=differs)
    tables = build_tables(groups, load_paper_tables())
    assert [t.key for t in tables] == ["table2_samm", "table3_ablation", "table4_cross_domain", "table_other_per_au"]
    seen: set[tuple[str, str, str]] = set()
    for table in tables:
        for section in table.sections:
            for block in section.blocks:
                key = (table.key, section.title or "", block.label)
                assert key in EXPECTED, f"unexpected block {key}"
                seen.add(key)
                expected = EXPECTED[key]
                assert list(block.entries) == list(expected) == section.columns
                for col, (status, ours, compat, paper) in expected.items():
                    e = block.entries[col]
                    where = f"{key} {col}"
                    assert e.status == status, where
                    assert e.paper == (pytest.approx(paper) if paper is not None else None), where
                    if ours is None:
                        assert e.ours is None and e.compat is None, where
                        assert e.delta() is None, where
                        continue
                    assert (e.ours.mean, e.ours.std) == pytest.approx(ours, abs=1e-9), where
                    assert (e.compat.mean, e.compat.std) == pytest.approx(compat, abs=1e-9), where
                    if paper is None or recipe == "paper":
                        assert e.delta() is None, where
                    else:
                        assert e.delta() == pytest.approx(compat[0] - paper), where
    assert seen == set(EXPECTED), f"blocks not rendered: {set(EXPECTED) - seen}"


def test_per_fold_mean_is_a_separate_number(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    a = next(g for g in collect_groups(cells, results) if g.key.id == "samm/qwen2-1.5b/all")
    # AU4, seed 1: fold 006 y=1,1 pred=1,1 -> 1; fold 007 y=0,0 pred=0,0 -> 0 (no positive): mean 1/2.
    # Seed 2: fold 006 pred=1,0 -> 2/3; fold 007 -> 0: mean 1/3. Over seeds: 5/12 (pooled: 5/6).
    pf = a.summary["per_fold_mean"].per_au[4]
    assert pf.mean == pytest.approx(500 / 12)
    assert pf.std == pytest.approx((50 - 100 / 3) / R2)
    assert a.summary["pooled_binary@0.5"].per_au[4].mean == pytest.approx(250 / 3)
    assert a.per_seed[1]["pooled_binary@0.5"].average == pytest.approx(0.575)  # fractions per seed
    assert a.n_samples == 4 and a.seeds == (1, 2) and a.folds == ("006", "007")


def test_group_with_missing_and_failed_folds_is_incomplete_and_not_averaged(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    groups = {g.key.id: g for g in collect_groups(cells, results)}
    c = groups["samm/qwen2.5-1.5b/all"]
    assert c.status == "incomplete"
    assert not c.summary and not c.per_seed  # seed 1 has fold 006 and seed 2 fold 007: neither is scored
    assert [(m.seed, m.fold, m.reason.split(":")[0]) for m in c.missing] == [(1, "007", "no result"), (2, "006", "failed")]
    assert "CUDA OOM" in c.missing[1].reason
    assert c.missing_text() == "007 (seed 1); 006 failed (seed 2)"
    assert sum(g.complete for g in groups.values()) == 5

    tables = build_tables(list(groups.values()))
    md = to_markdown(tables[0], list(groups.values()))
    row = next(line for line in md.splitlines() if line.startswith("| **AU-Qwen2.5-1.5B**"))
    assert row.count("incomplete") == 1  # one line for the unscored group, no number
    assert "samm/qwen2.5-1.5b/all: incomplete: 007 (seed 1); 006 failed (seed 2)" in md


def test_rendered_markdown_rows(grid: tuple[list[Cell], dict]) -> None:
    """Recipe script on real data: ours, the paper, paper_compatible and its Δ, the one
    difference that compares like with like."""
    cells, results = grid
    groups = collect_groups(cells, results, recipe="script")
    table = build_tables(groups)[0]
    assert table.title.endswith("[recipe: script]")
    md = to_markdown(table, groups).splitlines()
    i = md.index(next(line for line in md if line.startswith("| **AU-Qwen2-1.5B**")))
    assert md[i] == ("| **AU-Qwen2-1.5B** | **ours: pooled_binary@0.5** | **75.0 ± 35.4** | **83.3 ± 23.6** | "
                     "**50.0 ± 70.7** | **73.3 ± 9.4** | **70.4 ± 18.3** |")  # fmt: skip
    assert md[i + 1] == "| qwen2-1.5b · all · 2 seeds | paper: AU-Qwen2-1.5B | 63.6 | 65.2 | 49.2 | 53.7 | 57.9 |"
    assert md[i + 2].startswith("|  | ours: paper_compatible † | 86.7 ± 18.9 | 86.7 ± 18.9 | 86.7 ± 18.9 | 75.0 ± 35.4 | ")
    # (the Avg column, 83.75 and +25.85, sits on a rounding edge: checked in numbers above)
    assert md[i + 3].startswith("|  | Δ paper_compatible − paper † (like against like) | +23.1 | +21.5 | +37.5 | +21.3 | ")
    assert not any("Δ ours" in line for line in md)  # never headline minus the paper's (another metric)
    base = md.index(next(line for line in md if line.startswith("| **LED baseline (no LLM)**")))
    # one seed: no ± ; the paper's row is SSSNet-LED, labelled as the LED-family baseline
    assert md[base].endswith("| **100.0** | **100.0** | **0.0** | **100.0** | **75.0** |")
    assert "paper: SSSNet-LED (LED-family baseline)" in md[base + 1]
    tiny = md.index(next(line for line in md if line.startswith("| **AU-tiny-qwen2**")))
    assert md[tiny + 1].endswith("| paper | — | — | — | — | — |")  # an LLM the paper did not run
    assert any("like against like" in line and "Recipe script" in line for line in md)


@pytest.mark.parametrize("recipe, synthetic", [("paper", False), ("script", True), ("paper", True)])
def test_no_delta_unless_like_against_like(grid: tuple[list[Cell], dict], recipe: str, synthetic: bool) -> None:
    """The paper recipe, or synthetic data: no Δ row anywhere, and the caption says why."""
    cells, results = grid
    differs = () if recipe == "script" else ("token_position", "batchnorm_stats")
    groups = collect_groups(cells, results, recipe=recipe, differs_from_script=differs,
                            synthetic_datasets={"samm"} if synthetic else set())  # fmt: skip
    tables = build_tables(groups)
    for table in tables:
        md = to_markdown(table, groups)
        assert not any("| Δ" in line for line in md.splitlines()), table.key  # no Δ row
        assert f"[recipe: {recipe}" in table.title
        assert ("synthetic data" in table.title) == synthetic
        assert all(not e.like_against_like and e.delta() is None
                   for s in table.sections for b in s.blocks for e in b.entries.values())  # fmt: skip
    notes = " ".join(tables[0].notes)
    if synthetic:
        assert "Synthetic data" in notes and "no Δ against the paper" in notes
    else:
        assert "token_position, batchnorm_stats" in notes and "not like against like" in notes


def test_written_csv_holds_the_hand_numbers(grid: tuple[list[Cell], dict], tmp_path: Path) -> None:
    cells, results = grid
    groups = collect_groups(cells, results, recipe="script")
    files = write_outputs(groups, tmp_path / "out", title="hand", plots=False)
    names = {f.name for f in files}
    for stem in ("table2_samm", "table3_ablation", "table4_cross_domain", "table_other_per_au"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= names
    assert {"tables.md", "groups.csv", "summary.json"} <= names
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temp folder is gone

    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table2_samm.csv").read_text())))
    assert len(rows) == 4 * 5
    by = {(r["model"], r["column"]): r for r in rows}
    for col in COLS:
        r = by[("AU-Qwen2-1.5B", col)]
        assert float(r["ours_mean"]) == pytest.approx(A_OURS[col][0], abs=1e-4)
        assert float(r["ours_std"]) == pytest.approx(A_OURS[col][1], abs=1e-4)
        assert float(r["paper_compatible_mean"]) == pytest.approx(A_COMPAT[col][0], abs=1e-4)
        assert float(r["paper"]) == pytest.approx(PAPER_QWEN2_SAMM[col])
        assert float(r["delta_paper_compatible"]) == pytest.approx(A_COMPAT[col][0] - PAPER_QWEN2_SAMM[col], abs=1e-4)
        assert r["like_against_like"] == "true"
        assert r["n_seeds"] == "2" and r["status"] == "complete" and r["group"] == "samm/qwen2-1.5b/all"
        inc = by[("AU-Qwen2.5-1.5B", col)]
        assert inc["status"] == "incomplete" and inc["ours_mean"] == "" and inc["delta_paper_compatible"] == ""
        assert float(inc["paper"]) == pytest.approx(PAPER_QWEN25_SAMM[col])
        assert by[("AU-tiny-qwen2", col)]["paper"] == ""
    assert float(by[("AU-Qwen2-1.5B", "AU4")]["per_fold_mean_mean"]) == pytest.approx(500 / 12, abs=1e-4)

    gcsv = list(csv.DictReader(io.StringIO((tmp_path / "out" / "groups.csv").read_text())))
    inc = [r for r in gcsv if r["group"] == "samm/qwen2.5-1.5b/all"]
    assert len(inc) == 1 and inc[0]["status"] == "incomplete" and inc[0]["mean"] == ""
    assert inc[0]["missing"] == "007 (seed 1); 006 failed (seed 2)"
    assert len([r for r in gcsv if r["group"] == "samm/qwen2-1.5b/all"]) == 3 * 5  # 3 protocols x (4 AUs + Avg)

    doc = (tmp_path / "out" / "tables.md").read_text()
    assert "5 of 6 groups complete" in doc
    assert "| samm/qwen2.5-1.5b/all | incomplete | 007 (seed 1); 006 failed (seed 2) |" in doc
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    a = next(g for g in summary["groups"] if g["group"] == "samm/qwen2-1.5b/all")
    assert a["scores_percent"]["pooled_binary@0.5"]["average"]["mean"] == pytest.approx(845 / 12)
    tex = (tmp_path / "out" / "table2_samm.tex").read_text()
    assert r"\textbf{75.0 $\pm$ 35.4}" in tex and r"\begin{tabular}" in tex and "_" not in tex.replace(r"\_", "")


def test_duplicate_sample_across_folds_makes_the_group_invalid(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    c006 = _cell("qwen2-1.5b", "all", 1, "006").cell_id
    c007 = _cell("qwen2-1.5b", "all", 1, "007").cell_id
    results[c007]["predictions"]["sample_keys"][0] = results[c006]["predictions"]["sample_keys"][0]
    g = next(g for g in collect_groups(cells, results) if g.key.id == "samm/qwen2-1.5b/all")
    assert g.status == "invalid" and not g.summary
    assert c006 in g.problem and c007 in g.problem and "samm/006/a" in g.problem


def test_results_scoring_other_aus_make_the_group_invalid(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    cid = _cell("qwen2-1.5b", "all", 2, "007").cell_id
    results[cid]["predictions"]["aus"] = [2, 4, 7, 14]
    g = next(g for g in collect_groups(cells, results) if g.key.id == "samm/qwen2-1.5b/all")
    assert g.status == "invalid" and "[2, 4, 7, 14]" in g.problem and cid in g.problem


def test_manifest_dicts_and_cell_objects_give_the_same_groups(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    from_objects = collect_groups(cells, results)
    from_dicts = collect_groups([c.to_dict() for c in cells], results)
    assert [(g.key, g.status, g.summary) for g in from_objects] == [(g.key, g.status, g.summary) for g in from_dicts]
    # group ids equal the `aullm.group` tag of the cell runs (one MLflow filter shows both)
    assert {g.key.id for g in from_objects} >= {"/".join(c.group) for c in cells}


def test_bad_manifests_are_user_errors(grid: tuple[list[Cell], dict]) -> None:
    cells, results = grid
    dup = [c.to_dict() for c in cells] + [cells[0].to_dict()]
    with pytest.raises(UserInputError, match="appears twice"):
        collect_groups(dup, results)
    bad = {**cells[0].to_dict(), "kind": "kfold"}
    with pytest.raises(UserInputError, match="kind 'kfold' is not allowed"):
        collect_groups([bad], results)


def test_collect_sweep_reads_the_directory_and_replaces_its_files(grid: tuple[list[Cell], dict], tmp_path: Path) -> None:
    cells, results = grid
    sweep = write_hand_sweep(tmp_path / "sweep", cells, results)
    out = sweep.path / "results_tables"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")  # a user's file: collect never touches it
    (out / "old_table.md").write_text("stale")  # written by an earlier collect, no longer produced
    (out / "index.json").write_text(json.dumps({"files": ["old_table.md"]}))

    assert collect_main(Namespace(sweep=str(sweep.path), out=None, no_mlflow=True, no_plots=True)) == 0
    assert (out / "my_notes.txt").read_text() == "mine"
    assert not (out / "old_table.md").exists()
    produced = set(json.loads((out / "index.json").read_text())["files"])
    assert {p.name for p in out.iterdir()} == produced | {"my_notes.txt", "index.json"}
    first = (out / "table2_samm.csv").read_text()

    # The failed fold is retried and the missing one arrives: the group is now complete.
    c = {(x.seed, x.fold): x for x in cells if x.llm == "qwen2.5-1.5b"}
    sweep.write_result(c[(1, "007")].cell_id, _done(c[(1, "007")], PROBS_SEED1))
    sweep.write_result(c[(2, "006")].cell_id, _done(c[(2, "006")], PROBS_SEED2))
    report = collect_sweep(sweep.path, track=False, plots=False)
    assert all(g.complete for g in report.groups)
    rows = list(csv.DictReader(io.StringIO((out / "table2_samm.csv").read_text())))
    avg = next(r for r in rows if r["model"] == "AU-Qwen2.5-1.5B" and r["column"] == "Avg")
    assert float(avg["ours_mean"]) == pytest.approx(845 / 12, abs=1e-4)  # same predictions as group A
    assert (out / "table2_samm.csv").read_text() != first


def test_collect_job_and_cli_accept_the_directory(grid: tuple[list[Cell], dict], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cells, results = grid
    sweep = write_hand_sweep(tmp_path / "sweep", cells, results)
    from orchestrator.cli import main

    assert main(["collect", str(sweep.path), "--out", str(tmp_path / "elsewhere"), "--no-mlflow", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Table 2" in printed and "AU-Qwen2-1.5B" in printed and "5/6 groups complete" in printed
    assert (tmp_path / "elsewhere" / "table2_samm.md").is_file()
    assert main(["collect", str(tmp_path / "nowhere"), "--no-mlflow"]) == 2
    assert "neither a sweep directory nor a sweep file" in capsys.readouterr().err
    assert main(["collect", str(tmp_path), "--no-mlflow"]) == 2  # a folder without manifest.json


@pytest.mark.slow
def test_collect_job_writes_plots(grid: tuple[list[Cell], dict], tmp_path: Path) -> None:
    cells, results = grid
    sweep = write_hand_sweep(tmp_path / "sweep", cells, results)
    sweep.write_manifest({**sweep.read_manifest()["spec"], "tracking": {"uri": "http://127.0.0.1:9", "experiment": "x"}},
                         cells)  # fmt: skip
    summary = collect_job(str(sweep.path))  # what the dependent Slurm job runs
    assert summary["complete"] == 5 and list(summary["incomplete"]) == ["samm/qwen2.5-1.5b/all"]
    assert "MLflow not updated" in summary["tracking"]  # nothing listens there: tables are still written
    out = Path(summary["out_dir"])
    for name in ("ablation.png", "f1_per_au_samm.png", "f1_per_au_casme2_to_samm.png", "per_subject_samm.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_paper_tables_copy_keeps_the_reference_figures() -> None:
    # tests/data holds the project's copy of the reference figures (transcribed from the paper):
    # the test runs on every machine instead of skipping where a shared folder is missing.
    ref = Path(__file__).resolve().parent / "data" / "paper_tables_reference.yaml"
    import yaml

    reference = yaml.safe_load(ref.read_text())
    ours = load_paper_tables().raw
    for key, value in reference.items():
        assert ours[key] == value, key
    assert ours["table_4dme_loso"]["rows"]["AU-LLM"] == [53.7]


def test_collecting_imports_neither_torch_nor_mlflow() -> None:
    import subprocess
    import sys

    code = ("import sys, orchestrator.results.collect, orchestrator.results.tables, orchestrator.results.summary_runs; "
            "print(sorted({'torch', 'mlflow', 'matplotlib'} & set(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
