"""The paper's tables, computed from collected groups, with the paper's figures beside ours.

Shape: as in the paper, columns are AUs (+ Avg) for Tables 1, 2, 4 and 4DME, and LLMs for
Table 3; rows are models (or variants). Each model is a *block* of rows:

    ours   pooled_binary@0.5            the headline (DESIGN.md §6), mean ± std over seeds
    paper  the paper's figure           from orchestrator/data/paper_tables.yaml
    ours   paper_compatible †           the authors' leaky protocol, labelled
    Δ †    paper_compatible − paper     only where it is like against like: real data,
                                        cells trained with recipe `script` (nothing overridden)

There is never a "headline − paper" row: the paper's figures are not pooled binary F1,
and a difference of two different metrics means nothing. Each table's caption names the
recipe its cells were trained with and says when the data is synthetic.

The same numbers go out as a tidy CSV (one line per model x column, with the paper's
figure in a column beside ours), Markdown, LaTeX, and a rich terminal rendering.
F1 is in percent everywhere here. Pure Python: no torch, no mlflow.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from aullm.constants import DATASET_AUS
from aullm.metrics import HEADLINE_PROTOCOL, PROTOCOLS
from aullm.recipes import RECIPE_FIELDS

from orchestrator.results.types import GroupResult, Stat

__all__ = [
    "PAPER_LLM_ROWS",
    "PAPER_TABLE3_LLMS",
    "VARIANT_LABELS",
    "Block",
    "Entry",
    "PaperTables",
    "Section",
    "Table",
    "build_tables",
    "document_markdown",
    "groups_csv",
    "group_label",
    "llm_label",
    "load_paper_tables",
    "print_terminal",
    "to_csv",
    "to_latex",
    "to_markdown",
]

COMPAT = "paper_compatible"
PER_FOLD = "per_fold_mean"

# Sweep LLM keys -> the paper's row names (Tables 1, 2) and Table 3 column names.
PAPER_LLM_ROWS: dict[str, str] = {
    "deepseek-r1-distill-qwen-1.5b": "AU-DeepSeek-R1-1.5B",
    "qwen2-1.5b": "AU-Qwen2-1.5B",
    "qwen2.5-1.5b": "AU-Qwen2.5-1.5B",
}
PAPER_TABLE3_LLMS: dict[str, str] = {
    "deepseek-r1-distill-qwen-1.5b": "DeepSeek-R1-Distill-Qwen-1.5B",
    "qwen2-1.5b": "Qwen2-1.5B",
    "qwen2.5-1.5b": "Qwen2.5-1.5B",
}
# Our variant names -> the paper's Table 3 row names. no_llm has no Table 3 row in the
# paper; its natural comparison is the LED family (SSSNet-LED) of Tables 1, 2 and 4.
VARIANT_LABELS: dict[str, str] = {
    "f_high": "F_high",
    "f_mid": "F_mid",
    "efp_linear": "EFP-",
    "prompt_learning": "Prompt Learning",
    "all": "all",
    "no_llm": "no LLM",
}
BASELINE_VARIANT = "no_llm"
BASELINE_PAPER_ROW = "SSSNet-LED"
BASELINE_LABEL = "LED baseline (no LLM)"
BASELINE_PAPER_LABEL = "SSSNet-LED (LED-family baseline)"
CROSS_PAPER_ROW = "AU-LLM"  # the paper's Table 4 and its 4DME figure do not name the LLM

# Per-AU tables by dataset layout: (file key, title, paper_tables.yaml key).
PER_AU_TABLES: dict[str, tuple[str, str, str]] = {
    "casme2": ("table1_casme2", "Table 1 — CASME II, LOSO: per-AU F1 (%)", "table1_casme2_loso"),
    "samm": ("table2_samm", "Table 2 — SAMM, LOSO: per-AU F1 (%)", "table2_samm_loso"),
    "4dme": ("table_4dme", "4DME, LOSO: per-AU F1 (%)", "table_4dme_loso"),
}
DATASET_TITLES = {"casme2": "CASME II", "samm": "SAMM", "4dme": "4DME"}
MISSING = "—"
DAGGER = "†"
HEADLINE_ROW = f"ours: {HEADLINE_PROTOCOL}"
DELTA_ROW = f"Δ {COMPAT} − paper {DAGGER} (like against like)"
COMPAT_ROW = f"ours: {COMPAT} {DAGGER}"
NOTES = [
    f"ours: {HEADLINE_PROTOCOL} is the headline: the predictions of all LOSO folds pooled, binary F1 of "
    "the positive class at probability >= 0.5 per AU, averaged over AUs; mean ± std over seeds (std with "
    "ddof=1; no ± for one seed).",
    f"{DAGGER} {COMPAT}: the authors' script's protocol (per AU the mean of positive- and negative-class F1, "
    "threshold chosen on the test predictions from 0.10 to 0.85). It is optimistic; it is shown only to compare "
    "like with like with the paper's figures, never as our result.",
    "— : no figure (not run, or not in the paper).",
]


def _norm_llm(llm: str) -> str:
    """'Qwen/Qwen2-1.5B' -> 'qwen2-1.5b': sweeps may name an LLM by its hub id."""
    return llm.strip().lower().rsplit("/", 1)[-1]


def llm_label(llm: str, *, table3: bool = False) -> str:
    if not llm:
        return "no LLM"
    names = PAPER_TABLE3_LLMS if table3 else PAPER_LLM_ROWS
    return names.get(_norm_llm(llm), llm if table3 else f"AU-{llm}")


def variant_label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


# --------------------------------------------------------------------------- paper figures


def _au_num(name: Any) -> int:
    s = str(name)
    return int(s[2:] if s.upper().startswith("AU") else s)


@dataclass(frozen=True)
class PaperTables:
    """The paper's figures (percent), read from paper_tables.yaml."""

    raw: Mapping[str, Any]

    def per_au(self, table: str, row: str) -> dict[int, float]:
        t = self.raw.get(table) or {}
        values = (t.get("rows") or {}).get(row)
        if values is None:
            return {}
        return {_au_num(a): float(v) for a, v in zip(t["aus"], values) if v is not None}

    def average(self, table: str, row: str) -> float | None:
        v = ((self.raw.get(table) or {}).get("avg") or {}).get(row)
        return None if v is None else float(v)

    def table3(self, dataset: str, variant_row: str, llm_col: str) -> float | None:
        t = self.raw.get("table3_ablation") or {}
        llms = list(t.get("llms") or [])
        values = (t.get(dataset) or {}).get(variant_row)
        if values is None or llm_col not in llms:
            return None
        return float(values[llms.index(llm_col)])

    def cross(self, direction: str, row: str) -> tuple[dict[int, float], float | None]:
        t = self.raw.get("table4_cross_domain") or {}
        values = (t.get(direction) or {}).get(row)
        per_au = {} if values is None else {_au_num(a): float(v) for a, v in zip(t["aus"], values)}
        avg = (t.get(f"{direction}_avg") or {}).get(row)
        return per_au, None if avg is None else float(avg)


@lru_cache(maxsize=4)
def _load_raw(path: str | None) -> Mapping[str, Any]:
    if path is None:
        text = resources.files("orchestrator").joinpath("data/paper_tables.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def load_paper_tables(path: str | Path | None = None) -> PaperTables:
    """The package's copy of paper_tables.yaml (or another file of the same shape)."""
    return PaperTables(_load_raw(None if path is None else str(path)))


# --------------------------------------------------------------------------- table model


@dataclass(frozen=True)
class Entry:
    """One model x one column: our numbers under each protocol and the paper's figure."""

    status: str  # "complete" | "incomplete" | "invalid" | "absent" (no such group)
    scores: Mapping[str, Stat] = field(default_factory=dict)  # protocol -> stat
    paper: float | None = None
    group: str = ""
    like_against_like: bool = False  # see GroupResult.like_against_like

    @property
    def ours(self) -> Stat | None:
        return self.scores.get(HEADLINE_PROTOCOL)

    @property
    def compat(self) -> Stat | None:
        return self.scores.get(COMPAT)

    def delta(self) -> float | None:
        """paper_compatible − paper, where that compares like with like; else None."""
        s = self.compat
        if s is None or self.paper is None or not self.like_against_like:
            return None
        return s.mean - self.paper


@dataclass
class Block:
    label: str
    detail: str
    paper_label: str  # which paper row the figures come from ("" when none)
    entries: dict[str, Entry]
    llm: str = ""
    variant: str = ""

    @property
    def like_against_like(self) -> bool:
        present = [e for e in self.entries.values() if e.status != "absent"]
        return bool(present) and all(e.like_against_like for e in present)


@dataclass
class Section:
    title: str | None
    columns: list[str]
    blocks: list[Block]


@dataclass
class Table:
    key: str  # file stem
    title: str
    sections: list[Section]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- building


def _entry(group: GroupResult | None, column: str, paper: float | None) -> Entry:
    if group is None:
        return Entry("absent", paper=paper)
    if not group.complete:
        return Entry(group.status, paper=paper, group=group.key.id, like_against_like=group.like_against_like)
    scores: dict[str, Stat] = {}
    for proto, summ in group.summary.items():
        if column == "Avg":
            scores[proto] = summ.average
        elif _au_num(column) in summ.per_au:
            scores[proto] = summ.per_au[_au_num(column)]
    return Entry("complete", scores, paper, group.key.id, group.like_against_like)


def caption(groups: Sequence[GroupResult]) -> tuple[str, list[str]]:
    """(title suffix, notes) saying how a table's cells were trained and on what data,
    and so whether its paper_compatible rows compare like with like."""
    recipes = sorted({g.recipe for g in groups})
    differing = {f for g in groups for f in g.differs_from_script}
    differs = [f for f in RECIPE_FIELDS if f in differing]  # the recipe table's order
    synthetic = any(g.synthetic for g in groups)
    parts = [f"recipe: {', '.join(recipes)}"] + (["synthetic data"] if synthetic else [])
    notes = []
    if groups and all(g.recipe == "script" and not g.differs_from_script for g in groups):
        tail = ("but the data is synthetic, so no Δ is shown" if synthetic
                else "so its Δ against them is shown")  # fmt: skip
        notes.append(f"Recipe script (everything the released script does): {COMPAT} {DAGGER} is computed "
                     f"like against like with the paper's figures (same recipe, same protocol); {tail}.")  # fmt: skip
    else:
        what = ", ".join(differs) if differs else "nothing but the recipe's name"
        notes.append(f"Recipe {', '.join(recipes)}: these cells differ from the released script's recipe in "
                     f"{what} (docs/results.md), so {COMPAT} {DAGGER} is not like against like with the paper's "
                     "figures and no Δ is shown.")  # fmt: skip
    if synthetic:
        notes.append("Synthetic data (aullm-grid data synth): these numbers are about the pipeline, not the "
                     "science; no Δ against the paper is shown.")  # fmt: skip
    return " [" + "; ".join(parts) + "]", notes


def _captioned(table: Table, groups: Sequence[GroupResult]) -> Table:
    suffix, notes = caption(groups)
    table.title += suffix
    table.notes = notes + table.notes
    return table


def _seeds_text(g: GroupResult) -> str:
    n = len(g.seeds)
    return f"{n} seed{'s' if n != 1 else ''}"


def _detail(g: GroupResult, *, paper_known: bool) -> str:
    parts = [g.key.llm or "no LLM", g.key.variant, _seeds_text(g)]
    if g.key.kind == "loso" and g.key.data != g.layout:
        parts.insert(0, g.key.data)
    if not g.complete:
        parts.append(f"{g.status} (see below)")
    elif not paper_known:
        parts.append("no paper figure")
    return " · ".join(parts)


def _llm_order(llm: str) -> tuple[int, str]:
    keys = list(PAPER_LLM_ROWS)
    n = _norm_llm(llm)
    return (keys.index(n) if n in keys else len(keys), llm)


def _block_order(g: GroupResult) -> tuple[int, tuple[int, str], int, str]:
    # Baselines first and the full model next, as in the paper; then the ablations.
    variants = [BASELINE_VARIANT, "all", *VARIANT_LABELS]
    v = g.key.variant
    first = 0 if v == BASELINE_VARIANT else 1
    return (first, _llm_order(g.key.llm), variants.index(v) if v in variants else len(variants), v)


def _columns_for(layout: str, groups: Sequence[GroupResult]) -> list[str]:
    aus: list[int] = list(DATASET_AUS.get(layout, ()))
    for g in groups:
        for a in g.aus:
            if a not in aus:
                aus.append(a)
    return [f"AU{a}" for a in aus] + ["Avg"]


def _per_au_block(
    g: GroupResult, columns: list[str], paper_per_au: dict[int, float], paper_avg: float | None,
    paper_row: str, label: str,
) -> Block:  # fmt: skip
    entries = {}
    for col in columns:
        paper = paper_avg if col == "Avg" else paper_per_au.get(_au_num(col))
        entries[col] = _entry(g, col, paper)
    known = bool(paper_per_au) or paper_avg is not None
    paper_label = (BASELINE_PAPER_LABEL if paper_row == BASELINE_PAPER_ROW else paper_row) if known else ""
    return Block(label, _detail(g, paper_known=known), paper_label, entries, g.key.llm, g.key.variant)


def _loso_paper_row(layout: str, g: GroupResult) -> str:
    if g.key.variant == BASELINE_VARIANT:
        return BASELINE_PAPER_ROW
    if g.key.variant != "all" or _norm_llm(g.key.llm) not in PAPER_LLM_ROWS:
        return ""
    return CROSS_PAPER_ROW if layout == "4dme" else PAPER_LLM_ROWS[_norm_llm(g.key.llm)]


def group_label(g: GroupResult) -> str:
    if g.key.variant == BASELINE_VARIANT:
        return BASELINE_LABEL if not g.key.llm else f"{BASELINE_LABEL} [{g.key.llm}]"
    if g.key.variant == "all":
        return llm_label(g.key.llm)
    return f"{llm_label(g.key.llm)} · {variant_label(g.key.variant)}"


def _per_au_table(layout: str, groups: Sequence[GroupResult], paper: PaperTables) -> Table:
    key, title, paper_key = PER_AU_TABLES[layout]
    sections = []
    by_data: dict[str, list[GroupResult]] = {}
    for g in groups:
        by_data.setdefault(g.key.data, []).append(g)
    for data, gs in sorted(by_data.items()):
        columns = _columns_for(layout, gs)
        blocks = []
        for g in sorted(gs, key=_block_order):
            row = _loso_paper_row(layout, g)
            per_au = paper.per_au(paper_key, row) if row else {}
            avg = paper.average(paper_key, row) if row else None
            blocks.append(_per_au_block(g, columns, per_au, avg, row, group_label(g)))
        title_s = None if len(by_data) == 1 and data == layout else f"{data} (layout {layout})"
        sections.append(Section(title_s, columns, blocks))
    return Table(key, title, sections, list(NOTES))


def _table3(groups: Sequence[GroupResult], paper: PaperTables) -> Table:
    sections = []
    by_data: dict[tuple[str, str], list[GroupResult]] = {}
    for g in groups:
        by_data.setdefault((g.layout, g.key.data), []).append(g)
    layout_order = ["casme2", "samm", "4dme"]
    for (layout, data), gs in sorted(
        by_data.items(), key=lambda kv: (layout_order.index(kv[0][0]) if kv[0][0] in layout_order else 9, kv[0][1])
    ):
        llms = sorted({g.key.llm for g in gs}, key=lambda l: (l == "", _llm_order(l)))
        columns = [llm_label(l, table3=True) for l in llms]
        variants = sorted({g.key.variant for g in gs}, key=lambda v: (
            list(VARIANT_LABELS).index(v) if v in VARIANT_LABELS else len(VARIANT_LABELS), v))  # fmt: skip
        index = {(g.key.llm, g.key.variant): g for g in gs}
        blocks = []
        for v in variants:
            entries = {}
            paper_label = ""
            for l, col in zip(llms, columns):
                if v == BASELINE_VARIANT:
                    # only where our baseline has a number: the column of its (no) LLM
                    ref = PER_AU_TABLES.get(layout, ("", "", ""))[2]
                    p = paper.average(ref, BASELINE_PAPER_ROW) if ref and (l, v) in index else None
                    if p is not None:
                        paper_label = BASELINE_PAPER_LABEL
                else:
                    p = paper.table3(layout, variant_label(v), col)
                    if p is not None:
                        paper_label = "Table 3"
                entries[col] = _entry(index.get((l, v)), "Avg", p)
            present = [index[(l, v)] for l in llms if (l, v) in index]
            seeds = sorted({len(g.seeds) for g in present})
            n_text = "" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
            detail = v + (f" · {n_text} seed{'s' if n_text != '1' else ''}" if seeds else "")
            blocks.append(Block(variant_label(v) if v != BASELINE_VARIANT else BASELINE_LABEL, detail,
                                paper_label, entries, "", v))  # fmt: skip
        name = DATASET_TITLES.get(layout, layout)
        sections.append(Section(name if data == layout else f"{name} ({data})", columns, blocks))
    return Table("table3_ablation", "Table 3 — ablations: average F1 (%) by variant and LLM", sections, list(NOTES))


def _table4(groups: Sequence[GroupResult], paper: PaperTables) -> Table:
    sections = []
    by_data: dict[str, list[GroupResult]] = {}
    for g in groups:
        by_data.setdefault(g.key.data, []).append(g)
    for data, gs in sorted(by_data.items(), key=lambda kv: (kv[0] != "casme2_to_samm", kv[0])):
        first = gs[0]
        direction = f"{first.train_layout}_to_{first.layout}"
        columns = _columns_for("", gs) if gs else []
        blocks = []
        for g in sorted(gs, key=_block_order):
            row = _cross_paper_row(g)
            per_au, avg = paper.cross(direction, row) if row else ({}, None)
            blocks.append(_per_au_block(g, columns, per_au, avg, row, group_label(g)))
        src, _, dst = data.partition("_to_")
        sections.append(Section(f"{DATASET_TITLES.get(first.train_layout or '', src)} → "
                                f"{DATASET_TITLES.get(first.layout, dst)} ({data})", columns, blocks))  # fmt: skip
    return Table("table4_cross_domain", "Table 4 — cross-domain (train on one dataset, test on the other): F1 (%)",
                 sections, list(NOTES))  # fmt: skip


def _cross_paper_row(g: GroupResult) -> str:
    """Table 4's rows: SSSNet-LED for our baseline; "AU-LLM" (the paper does not say which
    LLM) for the full model of each of the paper's three LLMs, and for nothing else."""
    if g.key.variant == BASELINE_VARIANT:
        return BASELINE_PAPER_ROW
    if g.key.variant == "all" and _norm_llm(g.key.llm) in PAPER_LLM_ROWS:
        return CROSS_PAPER_ROW
    return ""


def _extra_table(groups: Sequence[GroupResult]) -> Table:
    sections = []
    by_data: dict[str, list[GroupResult]] = {}
    for g in groups:
        by_data.setdefault(g.key.data, []).append(g)
    for data, gs in sorted(by_data.items()):
        columns = _columns_for(gs[0].layout, gs)
        blocks = [_per_au_block(g, columns, {}, None, "", group_label(g)) for g in sorted(gs, key=_block_order)]
        sections.append(Section(data, columns, blocks))
    return Table("table_other_per_au", "Per-AU F1 (%) of the other groups (ablations and datasets "
                 "outside Tables 1, 2, 4 and 4DME)", sections, list(NOTES))  # fmt: skip


def build_tables(groups: Sequence[GroupResult], paper: PaperTables | None = None) -> list[Table]:
    """Tables 1, 2, 3, 4 and 4DME (those with at least one group), then one table for
    every group none of them shows, so nothing the sweep computed is left out."""
    paper = paper or load_paper_tables()
    # Only the sweep's own `training` settings: a group trained under an axis value is a
    # row of the settings table (settings_table.py), never an entry beside these.
    groups = [g for g in groups if not g.key.settings]
    shown: set[str] = set()
    tables: list[Table] = []
    loso = [g for g in groups if g.key.kind == "loso"]
    cross = [g for g in groups if g.key.kind == "cross_domain"]
    for layout in ("casme2", "samm"):
        gs = [g for g in loso if g.layout == layout and g.key.variant in ("all", BASELINE_VARIANT)]
        if gs:
            tables.append(_captioned(_per_au_table(layout, gs, paper), gs))
            shown.update(g.key.id for g in gs)
    t3 = [g for g in loso if g.layout in ("casme2", "samm")]
    if any(g.key.variant not in ("all", BASELINE_VARIANT) for g in t3):
        tables.append(_captioned(_table3(t3, paper), t3))
        shown.update(g.key.id for g in t3 if g.key.variant not in ("all", BASELINE_VARIANT))
    if cross:
        tables.append(_captioned(_table4(cross, paper), cross))
        shown.update(g.key.id for g in cross)
    gs = [g for g in loso if g.layout == "4dme" and g.key.variant in ("all", BASELINE_VARIANT)]
    if gs:
        tables.append(_captioned(_per_au_table("4dme", gs, paper), gs))
        shown.update(g.key.id for g in gs)
    # Table 3 shows ablations only as averages: their per-AU numbers, and any dataset the
    # paper has no table for, go here.
    rest = [g for g in groups if g.key.id not in shown or (g.key.kind == "loso" and g.key.variant not in ("all", BASELINE_VARIANT))]
    if rest:
        tables.append(_captioned(_extra_table(rest), rest))
    return tables


# --------------------------------------------------------------------------- formatting


def fmt_stat(s: Stat | None) -> str:
    if s is None:
        return MISSING
    return f"{s.mean:.1f}" if s.n <= 1 else f"{s.mean:.1f} ± {s.std:.1f}"


def fmt_num(x: float | None) -> str:
    return MISSING if x is None else f"{x:.1f}"


def fmt_delta(x: float | None) -> str:
    return MISSING if x is None else f"{x:+.1f}"


def _status_cell(e: Entry) -> str | None:
    return {"incomplete": "incomplete", "invalid": "invalid"}.get(e.status)


@dataclass(frozen=True)
class RenderRow:
    kind: str  # ours | paper | compat | delta
    model: str  # first column (label on the first row of a block, detail on the second)
    what: str  # second column
    cells: list[str]


def block_rows(block: Block, columns: Sequence[str]) -> list[RenderRow]:
    """The rows of one block, in the order of the module docstring; a block with nothing
    scored is one line (why it is not scored is listed under the table)."""
    es = [block.entries.get(c, Entry("absent")) for c in columns]
    unscored = [e.status for e in es if e.status in ("incomplete", "invalid")]
    if unscored and not any(e.status == "complete" for e in es):
        return [RenderRow("status", block.label, f"{unscored[0]}: not scored (see below)", [MISSING] * len(es))]

    def ours(proto: str) -> list[str]:
        return [_status_cell(e) or fmt_stat(e.scores.get(proto)) for e in es]

    # The paper rows are there even when the paper has no figure (an LLM it did not
    # run): every block has the same shape, and '—' says "nothing to compare with".
    rows: list[tuple[str, str, list[str]]] = [
        ("ours", HEADLINE_ROW, ours(HEADLINE_PROTOCOL)),
        ("paper", f"paper: {block.paper_label}" if block.paper_label else "paper", [fmt_num(e.paper) for e in es]),
        ("compat", COMPAT_ROW, ours(COMPAT)),
    ]
    # The one difference that means something, and only where it compares like with like.
    if block.like_against_like:
        rows.append(("delta", DELTA_ROW, [fmt_delta(e.delta()) for e in es]))
    labels = [block.label, block.detail]
    return [RenderRow(k, labels[i] if i < 2 else "", what, cells) for i, (k, what, cells) in enumerate(rows)]


def _incomplete_notes(table: Table, groups: Sequence[GroupResult] | None) -> list[str]:
    ids = {e.group for s in table.sections for b in s.blocks for e in b.entries.values()
           if e.status in ("incomplete", "invalid")}  # fmt: skip
    if not groups:
        return sorted(ids)
    return [f"{g.key.id}: {g.status}: {g.missing_text()}" for g in groups if g.key.id in ids]


def to_markdown(table: Table, groups: Sequence[GroupResult] | None = None, *, level: int = 3) -> str:
    out = [f"{'#' * level} {table.title}", ""]
    for section in table.sections:
        if section.title:
            out += [f"{'#' * (level + 1)} {section.title}", ""]
        out.append("| Model | | " + " | ".join(section.columns) + " |")
        out.append("|---|---|" + "|".join("---:" for _ in section.columns) + "|")
        for block in section.blocks:
            for r in block_rows(block, section.columns):
                model = f"**{_md(r.model)}**" if r.model and r.model == block.label else _md(r.model)
                what = f"**{_md(r.what)}**" if r.kind == "ours" else _md(r.what)
                cells = [f"**{c}**" if r.kind == "ours" and c != MISSING else c for c in r.cells]
                out.append(f"| {model} | {what} | " + " | ".join(cells) + " |")
        out.append("")
    inc = _incomplete_notes(table, groups)
    if inc:
        out += ["Not scored (never averaged over fewer folds):", ""] + [f"- {_md(n)}" for n in inc] + [""]
    out += [f"- {_md(n)}" for n in table.notes] + [""]
    return "\n".join(out)


def _md(s: str) -> str:
    return s.replace("|", "\\|")


CSV_FIELDS = [
    "table", "section", "model", "detail", "group", "llm", "variant", "column", "status",
    "ours_mean", "ours_std", "n_seeds", "paper_compatible_mean", "paper_compatible_std",
    "per_fold_mean_mean", "per_fold_mean_std", "paper", "paper_row", "delta_paper_compatible", "like_against_like",
]  # fmt: skip


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _has_spread(table: Table) -> bool:
    """Any score of the table over two seeds or more: only then has it a std to show."""
    return any(st.n > 1 for sec in table.sections for b in sec.blocks for e in b.entries.values()
               for st in e.scores.values() if st is not None)  # fmt: skip


def table_records(table: Table) -> list[dict[str, str]]:
    """Tidy rows: one per model x column, ours and the paper's figure side by side."""
    recs = []
    for section in table.sections:
        for block in section.blocks:
            for col in section.columns:
                e = block.entries.get(col, Entry("absent"))
                ours, compat, pf = e.ours, e.compat, e.scores.get(PER_FOLD)
                recs.append({
                    "table": table.key, "section": section.title or "", "model": block.label,
                    "detail": block.detail, "group": e.group, "llm": block.llm, "variant": block.variant,
                    "column": col, "status": e.status,
                    "ours_mean": _f(ours.mean if ours else None), "ours_std": _f(ours.std if ours else None),
                    "n_seeds": str(ours.n) if ours else "",
                    "paper_compatible_mean": _f(compat.mean if compat else None),
                    "paper_compatible_std": _f(compat.std if compat else None),
                    "per_fold_mean_mean": _f(pf.mean if pf else None), "per_fold_mean_std": _f(pf.std if pf else None),
                    "paper": _f(e.paper), "paper_row": block.paper_label if e.paper is not None else "",
                    "delta_paper_compatible": _f(e.delta()), "like_against_like": str(e.like_against_like).lower(),
                })  # fmt: skip
    return recs


def to_csv(table: Table) -> str:
    """The tidy records; the *_std columns only when some score has two seeds or more
    (one seed has no spread, and a column of zeros would read as a measured one)."""
    fields = CSV_FIELDS if _has_spread(table) else [f for f in CSV_FIELDS if not f.endswith("_std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(table_records(table))
    return buf.getvalue()


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "†": r"$^\dagger$", "—": "---", "→": r"$\to$", "−": "$-$",
    "·": r"$\cdot$", ">": r"$>$", "<": r"$<$",
}  # fmt: skip


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def _tex_num(s: str) -> str:
    # "-19.5" typeset as text would get a hyphen
    return "$-$" + _tex(s[1:]) if s.startswith("-") else _tex(s)


def _tex_label(key: str) -> str:
    # \label takes no escapes: keep letters, digits and a few safe marks
    return re.sub(r"[^A-Za-z0-9:.-]", "-", key)


def to_latex(table: Table) -> str:
    """A booktabs table (\\usepackage{booktabs}); one tabular per section."""
    out = ["% generated by aullm-grid collect; needs \\usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
           rf"\caption{{{_tex(table.title)}}}", rf"\label{{tab:{_tex_label(table.key)}}}"]  # fmt: skip
    for section in table.sections:
        n = len(section.columns) + 2
        out.append(r"\begin{tabular}{ll" + "r" * len(section.columns) + "}")
        out.append(r"\toprule")
        if section.title:
            out.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{_tex(section.title)}}}}} \\")
            out.append(r"\midrule")
        out.append("Model & & " + " & ".join(_tex(c) for c in section.columns) + r" \\")
        for block in section.blocks:
            out.append(r"\midrule")
            for r in block_rows(block, section.columns):
                model = rf"\textbf{{{_tex(r.model)}}}" if r.model and r.model == block.label else rf"\small {_tex(r.model)}" if r.model else ""
                cells = [rf"\textbf{{{_tex(c)}}}" if r.kind == "ours" and c != MISSING else _tex_num(c) for c in r.cells]
                out.append(f"{model} & {_tex(r.what)} & " + " & ".join(cells) + r" \\")
        out.append(r"\bottomrule")
        out.append(r"\end{tabular}")
        out.append(r"\par\medskip")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def groups_csv(groups: Sequence[GroupResult]) -> str:
    """Every group x protocol x AU (and Avg): the complete record, incomplete groups included."""
    fields = ["group", "kind", "data", "layout", "llm", "variant", "status", "n_seeds", "protocol", "column",
              "mean", "std", "missing"]  # fmt: skip
    if not any(len(g.seeds) > 1 for g in groups if g.complete):
        fields.remove("std")  # one seed everywhere: no spread to report
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for g in groups:
        base = {"group": g.key.id, "kind": g.key.kind, "data": g.key.data, "layout": g.layout, "llm": g.key.llm,
                "variant": g.key.variant, "status": g.status, "n_seeds": str(len(g.seeds))}  # fmt: skip
        if not g.complete:
            w.writerow({**base, "protocol": "", "column": "", "mean": "", "std": "", "missing": g.missing_text(10**6)})
            continue
        for proto in PROTOCOLS:
            summ = g.summary[proto]
            items: list[tuple[str, Stat]] = [(f"AU{a}", s) for a, s in summ.per_au.items()] + [("Avg", summ.average)]
            for col, s in items:
                w.writerow({**base, "protocol": proto, "column": col, "mean": _f(s.mean), "std": _f(s.std), "missing": ""})
    return buf.getvalue()


def document_markdown(tables: Sequence[Table], groups: Sequence[GroupResult], *, title: str = "") -> str:
    """tables.md: every table, then the groups that are not finished and why."""
    n_done = sum(g.complete for g in groups)
    out = [f"# Results{': ' + title if title else ''}", "",
           f"{n_done} of {len(groups)} groups complete. F1 in percent. How to read these tables: docs/results.md.",
           ""]  # fmt: skip
    for t in tables:
        out.append(to_markdown(t, groups, level=2))
    pending = [g for g in groups if not g.complete]
    if pending:
        out += ["## Groups not scored", "", "| group | status | missing or failed folds |", "|---|---|---|"]
        out += [f"| {_md(g.key.id)} | {g.status} | {_md(g.missing_text())} |" for g in pending]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- terminal


_ROW_STYLES = {"ours": "bold", "paper": "dim", "compat": "italic", "delta": "dim italic", "status": "yellow"}


def _delta_style(cell: str) -> str:
    return "green" if cell.startswith("+") else "red" if cell.startswith("-") else ""


def print_terminal(groups: Sequence[GroupResult], *, console: Any = None, title: str = "",
                   tables: Sequence[Table] | None = None) -> None:  # fmt: skip
    """A compact rendering with rich: each table's ours / paper / Δ / paper_compatible rows,
    then the groups that are not scored and why."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    if console is None:
        console = Console()
        if not console.is_terminal:  # a Slurm log: do not wrap tables at 80 columns
            console = Console(width=200)
    tables = list(tables) if tables is not None else build_tables(groups)
    n_done = sum(g.complete for g in groups)
    console.print(f"[bold]{title or 'results'}[/bold]: {n_done}/{len(groups)} groups complete "
                  f"(F1 %, headline {HEADLINE_PROTOCOL}; {DAGGER} = {COMPAT}, leaky)", highlight=False)  # fmt: skip
    for t in tables:
        for s in t.sections:
            rt = RichTable(title=t.title + (f" — {s.title}" if s.title else ""), title_justify="left",
                           show_edge=False, pad_edge=False, box=None, header_style="bold")  # fmt: skip
            rt.add_column("model", overflow="fold", max_width=34)
            rt.add_column("", overflow="fold", max_width=44)
            for c in s.columns:
                rt.add_column(c, justify="right", no_wrap=True)
            for block in s.blocks:
                rows = block_rows(block, s.columns)
                for i, r in enumerate(rows):
                    cells = [f"[{_delta_style(c)}]{c}[/]" if r.kind == "delta" and _delta_style(c) else escape(c)
                             for c in r.cells]  # fmt: skip
                    rt.add_row(escape(r.model), escape(r.what), *cells, style=_ROW_STYLES.get(r.kind) or None,
                               end_section=i == len(rows) - 1)  # fmt: skip
            console.print(rt)
            console.print()
    pending = [g for g in groups if not g.complete]
    for g in pending[:40]:
        console.print(f"[yellow]{g.status}[/yellow] {escape(g.key.id)}: {escape(g.missing_text())}", highlight=False)
    if len(pending) > 40:
        console.print(f"... and {len(pending) - 40} more not scored (see tables.md)")
