"""Table shapes and the pairing of our groups with the paper's rows (no training, no MLflow)."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from aullm.constants import CROSS_DOMAIN_AUS, DATASET_AUS
from aullm.metrics import PROTOCOLS
from orchestrator.results.types import GroupKey, GroupResult, MissingCell, ProtocolSummary, Stat
from orchestrator.results.plots import _outliers, per_subject_figure
from orchestrator.results.tables import (
    Table,
    build_tables,
    groups_csv,
    llm_label,
    load_paper_tables,
    print_terminal,
    to_csv,
    to_latex,
    to_markdown,
)

PAPER = load_paper_tables()


def group(data: str, llm: str, variant: str, *, kind: str = "loso", layout: str | None = None,
          train_layout: str | None = None, status: str = "complete", avg: float = 50.0,
          recipe: str = "paper") -> GroupResult:  # fmt: skip
    """A scored group with made-up numbers: AU n scores 40 + n, the average `avg`."""
    layout = layout or data
    aus = CROSS_DOMAIN_AUS if kind == "cross_domain" else DATASET_AUS[layout]
    g = GroupResult(GroupKey(kind, data, llm, variant), layout, train_layout, ("c1",), (1, 2), ("f1",), status, aus=aus,
                    recipe=recipe)
    if status == "complete":
        per_au = {a: Stat(40.0 + a, 1.0, 2) for a in aus}
        g.summary = {p: ProtocolSummary(per_au, Stat(avg, 2.0, 2)) for p in PROTOCOLS}
        g.per_subject = {"sub01": 10.0, "sub02": 60.0}
    else:
        g.missing = [MissingCell(1, "sub03", "c1", "no result")]
    return g


def _table(tables: list[Table], key: str) -> Table:
    return next(t for t in tables if t.key == key)


def test_llm_keys_map_to_the_papers_names() -> None:
    assert llm_label("qwen2-1.5b") == "AU-Qwen2-1.5B"
    assert llm_label("Qwen/Qwen2.5-1.5B") == "AU-Qwen2.5-1.5B"  # a hub id maps by its last part
    assert llm_label("deepseek-r1-distill-qwen-1.5b") == "AU-DeepSeek-R1-1.5B"
    assert llm_label("deepseek-r1-distill-qwen-1.5b", table3=True) == "DeepSeek-R1-Distill-Qwen-1.5B"
    assert llm_label("tiny-qwen2") == "AU-tiny-qwen2" and llm_label("tiny-qwen2", table3=True) == "tiny-qwen2"
    assert llm_label("") == "no LLM"


def test_table1_pairs_each_llm_and_the_baseline_with_its_paper_row() -> None:
    groups = [group("casme2", llm, "all") for llm in ("qwen2.5-1.5b", "deepseek-r1-distill-qwen-1.5b", "qwen2-1.5b")]
    groups.append(group("casme2", "", "no_llm"))
    t1 = _table(build_tables(groups, PAPER), "table1_casme2")
    (section,) = t1.sections
    assert section.columns == ["AU1", "AU2", "AU4", "AU7", "AU12", "AU14", "AU15", "AU17", "Avg"]
    assert [b.label for b in section.blocks] == ["LED baseline (no LLM)", "AU-DeepSeek-R1-1.5B", "AU-Qwen2-1.5B",
                                                 "AU-Qwen2.5-1.5B"]  # fmt: skip
    raw = PAPER.raw["table1_casme2_loso"]
    for block, row in zip(section.blocks, ["SSSNet-LED", "AU-DeepSeek-R1-1.5B", "AU-Qwen2-1.5B", "AU-Qwen2.5-1.5B"]):
        assert [block.entries[c].paper for c in section.columns] == raw["rows"][row] + [raw["avg"][row]]
        assert block.entries["AU12"].delta() is None  # recipe paper: nothing compares like with like
    assert section.blocks[0].paper_label == "SSSNet-LED (LED-family baseline)"
    # ablations are not rows of Table 1: they are Table 3's
    assert "table3_ablation" not in [t.key for t in build_tables(groups, PAPER)]


def test_table3_puts_variants_in_rows_and_llms_in_columns() -> None:
    groups = [group("casme2", llm, v, avg=60.0 + i)
              for i, v in enumerate(["efp_linear", "prompt_learning", "all", "f_mid"])
              for llm in ("deepseek-r1-distill-qwen-1.5b", "qwen2.5-1.5b")]  # fmt: skip
    groups.append(group("casme2", "", "no_llm"))
    t3 = _table(build_tables(groups, PAPER), "table3_ablation")
    (section,) = t3.sections
    assert section.title == "CASME II"
    assert section.columns == ["DeepSeek-R1-Distill-Qwen-1.5B", "Qwen2.5-1.5B", "no LLM"]
    assert [b.label for b in section.blocks] == ["F_mid", "EFP-", "Prompt Learning", "all", "LED baseline (no LLM)"]
    efp = section.blocks[1]
    assert efp.entries["DeepSeek-R1-Distill-Qwen-1.5B"].paper == 78.6
    assert efp.entries["Qwen2.5-1.5B"].paper == 77.7
    assert efp.entries["Qwen2.5-1.5B"].ours == Stat(60.0, 2.0, 2)
    assert efp.entries["no LLM"].status == "absent" and efp.entries["no LLM"].paper is None
    base = section.blocks[-1]
    assert base.entries["no LLM"].paper == 78.4  # SSSNet-LED's CASME II average, only where our baseline is
    assert base.entries["Qwen2.5-1.5B"].paper is None
    # the ablations' per-AU numbers are not lost: they go to the extra per-AU table
    other = _table(build_tables(groups, PAPER), "table_other_per_au")
    assert {b.label for b in other.sections[0].blocks} >= {"AU-Qwen2.5-1.5B · EFP-", "AU-DeepSeek-R1-1.5B · F_mid"}


def test_table4_cross_domain_both_directions() -> None:
    groups = [
        group("casme2_to_samm", "qwen2-1.5b", "all", kind="cross_domain", layout="samm", train_layout="casme2"),
        group("samm_to_casme2", "qwen2-1.5b", "all", kind="cross_domain", layout="casme2", train_layout="samm"),
        group("samm_to_casme2", "", "no_llm", kind="cross_domain", layout="casme2", train_layout="samm"),
        group("samm_to_casme2", "tiny-qwen2", "all", kind="cross_domain", layout="casme2", train_layout="samm"),
    ]
    t4 = _table(build_tables(groups, PAPER), "table4_cross_domain")
    assert [s.title for s in t4.sections] == ["CASME II → SAMM (casme2_to_samm)", "SAMM → CASME II (samm_to_casme2)"]
    assert t4.sections[0].columns == ["AU2", "AU4", "AU7", "AU12", "Avg"]
    c2s = t4.sections[0].blocks[0]
    assert [c2s.entries[c].paper for c in t4.sections[0].columns] == [47.0, 62.4, 41.5, 48.8, 49.9]
    s2c = {b.label: b for b in t4.sections[1].blocks}
    assert [s2c["AU-Qwen2-1.5B"].entries[c].paper for c in t4.sections[1].columns] == [67.8, 39.4, 50.4, 53.6, 52.8]
    assert s2c["LED baseline (no LLM)"].entries["AU4"].paper == 44.5
    # the paper's "AU-LLM" is one of its three LLMs: a tiny test model is not compared with it
    assert all(e.paper is None for e in s2c["AU-tiny-qwen2"].entries.values())


def test_4dme_has_only_the_au1_figure() -> None:
    groups = [group("4dme", "qwen2-1.5b", "all"), group("4dme", "tiny-qwen2", "all")]
    t = _table(build_tables(groups, PAPER), "table_4dme")
    (section,) = t.sections
    assert section.columns == ["AU1", "AU2", "AU4", "AU6", "AU7", "AU12", "AU17", "AU45", "Avg"]
    qwen, tiny = section.blocks
    assert qwen.entries["AU1"].paper == 53.7 and qwen.paper_label == "AU-LLM"
    assert [qwen.entries[c].paper for c in section.columns[1:]] == [None] * 8
    assert all(e.paper is None for e in tiny.entries.values()) and tiny.paper_label == ""


def test_renamed_dataset_uses_its_layout_and_says_so() -> None:
    g = group("casme2_cropped", "qwen2-1.5b", "all", layout="casme2")
    t1 = _table(build_tables([g], PAPER), "table1_casme2")
    assert t1.sections[0].title == "casme2_cropped (layout casme2)"
    assert t1.sections[0].blocks[0].entries["AU1"].paper == 88.4


def test_incomplete_groups_render_as_incomplete_everywhere() -> None:
    groups = [group("samm", "qwen2-1.5b", "all", status="incomplete"), group("samm", "qwen2.5-1.5b", "all")]
    (t2,) = build_tables(groups, PAPER)
    md = to_markdown(t2, groups)
    assert "samm/qwen2-1.5b/all: incomplete: sub03 (seed 1)" in md
    # one line for the unscored group, not a column of "incomplete" in every row
    block = [x for x in md.splitlines() if "AU-Qwen2-1.5B" in x and x.startswith("|")]
    assert len(block) == 1 and block[0].count("incomplete") == 1, block
    rows = to_csv(t2).splitlines()
    assert rows[0].startswith("table,section,model,detail,group,llm,variant,column,status,ours_mean,ours_std")
    assert sum(",incomplete," in r for r in rows) == 5


def test_latex_is_escaped_and_balanced() -> None:
    groups = [group("samm", "my_llm&co", "all", recipe="script"), group("samm", "", "no_llm", recipe="script")]
    tex = to_latex(build_tables(groups, PAPER)[0])
    assert r"my\_llm\&co" in tex and "my_llm" not in tex
    assert r"$\pm$" in tex and r"$\Delta$" in tex and "±" not in tex and "Δ" not in tex
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    body = [line for line in tex.splitlines() if line.endswith(r"\\") and "&" in line]
    # model, row label, 4 AUs and Avg: 7 cells, 6 separators on every row
    assert {line.replace(r"\&", "").count("&") for line in body} == {6}
    assert "$-$19.5" in tex  # a negative Δ is a minus sign, not a hyphen
    assert r"\label{tab:table2-samm}" in tex  # so that \ref works


def test_terminal_rendering_is_compact_and_escapes_markup() -> None:
    groups = [group("samm", "[bold]odd", "all"), group("samm", "qwen2-1.5b", "all", status="incomplete")]
    console = Console(record=True, width=220)
    print_terminal(groups, console=console, title="demo")
    text = console.export_text()
    assert "demo: 1/2 groups complete" in text
    assert "AU-[bold]odd" in text  # shown literally, not eaten as rich markup
    assert "incomplete samm/qwen2-1.5b/all: sub03 (seed 1)" in text
    assert "Δ" not in text  # recipe paper: no difference with the paper's figures is shown
    assert "Table 2 — SAMM" in text


def test_one_seed_has_no_plus_minus_and_no_std_column() -> None:
    one = group("samm", "qwen2-1.5b", "all")
    one.seeds = (1,)
    one.summary = {p: ProtocolSummary({a: Stat(40.0 + a, 0.0, 1) for a in one.aus}, Stat(50.0, 0.0, 1))
                   for p in PROTOCOLS}  # fmt: skip
    (t2,) = build_tables([one], PAPER)
    rows = [line for line in to_markdown(t2, [one]).splitlines() if line.startswith("|")]
    assert rows and not [r for r in rows if "±" in r] and r"\pm" not in to_latex(t2)
    assert "_std" not in to_csv(t2).splitlines()[0] and ",std," not in groups_csv([one]).splitlines()[0]
    two = group("samm", "qwen2-1.5b", "all")
    (t2,) = build_tables([two], PAPER)
    assert "±" in to_markdown(t2, [two]) and "ours_std" in to_csv(t2).splitlines()[0]
    assert ",std," in groups_csv([two]).splitlines()[0]


def test_outlier_subjects_are_the_lowest_and_those_below_the_whisker() -> None:
    vals = np.array([70.0, 72.0, 71.0, 69.0, 10.0, 73.0, 68.0, 30.0])
    assert _outliers(vals) == [4, 7]
    assert _outliers(np.array([50.0, 60.0])) == [0]
    assert _outliers(np.array([])) == []
    assert per_subject_figure([group("samm", "x", "all", status="incomplete")], "samm") is None
