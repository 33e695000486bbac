"""Figures of a collected sweep (PNG, matplotlib's Agg canvas; no display needed).

- ``f1_per_au_<data>.png``: per-AU F1 of each LLM's full model (and the no-LLM baseline)
  in Tables 1, 2, 4 and 4DME, one panel per model: ours (pooled_binary@0.5, ± std over seeds), ours paper_compatible, the paper.
- ``ablation.png``: the paper's Fig. 2 as grouped bars: average F1 per variant, one bar
  per LLM, the paper's Table 3 figure as a black tick on each bar.
- ``settings_<field>.png``: headline F1 against each field the sweep varies (axes).
- ``per_subject_<data>.png``: a strip of per-subject F1 for each group, so subjects that
  drag a pooled score down stand out (the lowest, and any below the box-plot whisker,
  are named).

The figures are drawn from the tables' blocks, so a plot and its table can never
disagree about which paper figure belongs to which model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aullm.metrics import HEADLINE_PROTOCOL

from orchestrator.results.types import GroupResult
from orchestrator.results.settings_table import SettingsRow
from orchestrator.results.tables import BASELINE_VARIANT, COMPAT, Block, Section, Table, group_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_plots", "per_au_figure", "ablation_figure", "per_subject_figure"]

DPI = 110
OURS_COLOR = "#1f77b4"
COMPAT_COLOR = "#aec7e8"
PAPER_COLOR = "#7f7f7f"
N_NAMED_OUTLIERS = 3


def _figure(width: float, height: float) -> Figure:
    # A bare Figure on the Agg canvas: no pyplot state, no backend selection, safe in
    # a Slurm job or a test process that never had a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text)


def _section_data(section: Section) -> str:
    for block in section.blocks:
        for e in block.entries.values():
            if e.group:
                return e.group.split("/", 1)[0]
    return _safe_name(section.title or "data")


def per_au_figure(table: Table, section: Section) -> Figure | None:
    """One panel per complete model of a per-AU table section; None if none is complete."""
    # The full model of each LLM and the baseline, as the paper's tables have them; the
    # ablations' per-AU numbers stay in the tables (panels are the slow part to draw).
    blocks = [
        b for b in section.blocks
        if b.variant in ("all", BASELINE_VARIANT) and any(e.status == "complete" for e in b.entries.values())
    ]  # fmt: skip
    if not blocks:
        return None
    cols = section.columns
    n = len(blocks)
    ncols = min(n, 2)
    nrows = (n + ncols - 1) // ncols
    height = 3.0 * nrows + 1.0
    fig = _figure(max(6.0, 0.6 * len(cols) * ncols + 1.5), height)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    # Fixed margins rather than a layout engine: constrained layout doubles the drawing
    # time, and the room needed for titles and the shared legend is known in inches.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / height, top=1 - 0.95 / height, hspace=0.6, wspace=0.18)
    x = np.arange(len(cols))
    width = 0.27
    for ax, block in zip(axes, blocks):
        ours = [block.entries[c].ours for c in cols]
        compat = [block.entries[c].compat for c in cols]
        paper = [block.entries[c].paper for c in cols]
        ax.bar(x - width, [s.mean if s else np.nan for s in ours], width,
               yerr=[s.std if s and s.n > 1 else 0.0 for s in ours], capsize=2,
               color=OURS_COLOR, label=f"ours ({HEADLINE_PROTOCOL})")  # fmt: skip
        ax.bar(x, [s.mean if s else np.nan for s in compat], width, color=COMPAT_COLOR, hatch="//",
               edgecolor="white", label=f"ours ({COMPAT}, leaky)")  # fmt: skip
        ax.bar(x + width, [np.nan if p is None else p for p in paper], width, color=PAPER_COLOR,
               label="paper")
        ax.set_xticks(x, cols)
        ax.set_ylim(0, 100)
        ax.set_ylabel("F1 (%)")
        ax.set_title(f"{block.label}\n{block.detail}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.text(0.99, 0.98, f"paper: {block.paper_label or 'no figure'}", transform=ax.transAxes, ha="right",
                va="top", fontsize=7, color=PAPER_COLOR)  # fmt: skip
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, ["ours: " + HEADLINE_PROTOCOL, f"ours: {COMPAT} (leaky)", "paper"], loc="upper center",
               ncols=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.3 / height))  # fmt: skip
    fig.suptitle(table.title + (f" — {section.title}" if section.title else ""), fontsize=10, y=1 - 0.05 / height)
    return fig


def ablation_figure(table: Table) -> Figure | None:
    """The paper's Fig. 2: per dataset, average F1 by variant, one bar per LLM."""
    sections = [s for s in table.sections if any(e.status == "complete" for b in s.blocks for e in b.entries.values())]
    if not sections:
        return None
    height = 3.2 * len(sections) + 0.8
    fig = _figure(max(7.0, 1.3 * max(len(s.blocks) for s in sections) + 3.5), height)
    axes = np.atleast_1d(fig.subplots(len(sections), 1, squeeze=False)).ravel()
    fig.subplots_adjust(left=0.08, right=0.74, bottom=0.45 / height, top=1 - 0.6 / height, hspace=0.45)
    cmap = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for ax, section in zip(axes, sections):
        blocks: list[Block] = section.blocks
        x = np.arange(len(blocks))
        k = max(len(section.columns), 1)
        width = 0.8 / k
        for j, col in enumerate(section.columns):
            pos = x - 0.4 + width * (j + 0.5)
            stats = [b.entries[col].ours for b in blocks]
            ax.bar(pos, [s.mean if s else np.nan for s in stats], width * 0.95,
                   yerr=[s.std if s and s.n > 1 else 0.0 for s in stats], capsize=2,
                   color=cmap[j % len(cmap)], label=col)  # fmt: skip
            papers = [b.entries[col].paper for b in blocks]
            has = [i for i, p in enumerate(papers) if p is not None]
            if has:
                ax.scatter(pos[has], [papers[i] for i in has], marker="_", s=220, linewidths=2.5, color="black",
                           zorder=3, label="paper" if j == 0 else None)  # fmt: skip
        ax.set_xticks(x, [b.label for b in blocks], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"avg F1 (%), {HEADLINE_PROTOCOL}")
        ax.set_title(section.title or "", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("Ablations (paper Fig. 2): ours as bars, the paper's figure as a black tick", fontsize=10,
                 y=1 - 0.1 / height)  # fmt: skip
    return fig


def _outliers(vals: np.ndarray) -> list[int]:
    """Indices of the subjects to name: the lowest one, and any below Q1 - 1.5 IQR (the
    usual box-plot whisker), at most N_NAMED_OUTLIERS, lowest first."""
    if len(vals) == 0:
        return []
    q1, q3 = np.percentile(vals, [25, 75])
    low = [int(j) for j in np.argsort(vals) if vals[j] < q1 - 1.5 * (q3 - q1)]
    lowest = int(np.argmin(vals))
    return ([lowest] + [j for j in low if j != lowest])[:N_NAMED_OUTLIERS]


def per_subject_figure(groups: Sequence[GroupResult], data: str) -> Figure | None:
    """One row per complete group of `data`; each dot is one test subject's F1."""
    gs = [g for g in groups if g.complete and g.key.data == data and g.per_subject]
    if not gs:
        return None
    height = 0.45 * len(gs) + 1.4
    fig = _figure(9.0, height)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.33, right=0.98, bottom=0.75 / height, top=1 - 0.45 / height)
    rng = np.random.default_rng(0)  # fixed jitter: the same sweep draws the same picture
    for i, g in enumerate(gs):
        subjects = list(g.per_subject)
        vals = np.array([g.per_subject[s] for s in subjects])
        ax.scatter(vals, i + rng.uniform(-0.15, 0.15, len(vals)), s=14, alpha=0.75, color=OURS_COLOR)
        pooled = g.summary[HEADLINE_PROTOCOL].average.mean if HEADLINE_PROTOCOL in g.summary else None
        if pooled is not None:
            ax.plot([pooled, pooled], [i - 0.3, i + 0.3], color="black", lw=1.5)
        for j in _outliers(vals):
            ax.annotate(subjects[j], (vals[j], i), xytext=(2, 6), textcoords="offset points", fontsize=6, color="#d62728")
    ax.set_yticks(range(len(gs)), [group_label(g) for g in gs], fontsize=7)
    ax.set_xlim(-2, 102)
    ax.set_xlabel("per-subject F1 (%) at 0.5, all AU decisions of the subject pooled (mean over seeds)")
    ax.set_title(f"{data}: F1 per test subject (dots) and the group's pooled average F1 (bar)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def write_plots(groups: Sequence[GroupResult], tables: Sequence[Table], out_dir: str | Path) -> list[Path]:
    """Draw every figure that has data; returns the PNGs written into `out_dir`."""
    out = Path(out_dir)
    written: list[Path] = []

    def save(fig: Figure | None, name: str) -> None:
        if fig is None:
            return
        path = out / name
        fig.savefig(path, format="png")
        written.append(path)

    for table in tables:
        if table.key == "table3_ablation":
            save(ablation_figure(table), "ablation.png")
        elif table.key != "table_other_per_au":
            for section in table.sections:
                save(per_au_figure(table, section), f"f1_per_au_{_safe_name(_section_data(section))}.png")
    for data in sorted({g.key.data for g in groups}):
        save(per_subject_figure(groups, data), f"per_subject_{_safe_name(data)}.png")
    return written


def settings_figure(rows: Sequence[SettingsRow], field: str) -> Figure | None:
    """Headline F1 against one swept field: a line per (data, LLM, variant) and value of the
    other swept fields, so each line changes this field alone (± std from 2 seeds up)."""
    from orchestrator.sweep.settings import show_value

    scored = [r for r in rows if r.f1 is not None]
    values = sorted({json.dumps(r.values.get(field)) for r in scored}, key=lambda t: (type(json.loads(t)).__name__, json.loads(t)))
    if not scored or not values:
        return None
    series: dict[str, list[SettingsRow]] = {}
    for r in scored:
        others = ",".join(f"{k}={show_value(v)}" for k, v in r.values.items() if k != field)
        series.setdefault(f"{r.base}" + (f" ({others})" if others else ""), []).append(r)
    fig = _figure(max(5.0, 1.2 * len(values) + 3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = {v: i for i, v in enumerate(values)}
    for name, members in sorted(series.items()):
        members = sorted(members, key=lambda r: xs[json.dumps(r.values.get(field))])
        x = [xs[json.dumps(r.values.get(field))] for r in members]
        y = [r.f1.mean for r in members if r.f1 is not None]
        err = [r.f1.std if r.f1 is not None and r.f1.n >= 2 else 0.0 for r in members]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(values)), [show_value(json.loads(v)) for v in values])
    ax.set_xlabel(field)
    ax.set_ylabel(f"F1 % ({HEADLINE_PROTOCOL})")
    ax.set_title(f"F1 against {field}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def write_settings_plots(rows: Sequence[SettingsRow], out_dir: str | Path) -> list[Path]:
    """``settings_<field>.png`` for each swept field (nothing when nothing is swept)."""
    out = Path(out_dir)
    written: list[Path] = []
    for field in (list(rows[0].values) if rows else []):
        fig = settings_figure(rows, field)
        if fig is not None:
            path = out / f"settings_{_safe_name(field)}.png"
            fig.savefig(path)
            written.append(path)
    return written
