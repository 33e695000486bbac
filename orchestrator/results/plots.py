"""Figures of a collected sweep (PNG, matplotlib's Agg canvas; no display needed).

- ``f1_per_au_<data>.png``: per-AU F1 of each LLM's full model (and the no-LLM baseline)
  in Tables 1, 2, 4 and 4DME, one panel per model: ours (pooled_binary@0.5, ± std over seeds), ours paper_compatible, the paper.
- ``ablation.png``: the paper's Fig. 2 as grouped bars: average F1 per variant, one bar
  per LLM, the paper's Table 3 figure as a black tick on each bar.
- ``settings_<field>.png``: headline F1 against each field the sweep varies (axes).
- ``all_vs_no_llm_<data>.png``: per AU, each LLM's full model beside the no-LLM baseline
  (only when both ran to completion).
- ``per_subject_<data>.png``: a strip of per-subject F1 for each group, so subjects that
  drag a pooled score down stand out (the lowest, and any below the box-plot whisker,
  are named).

The figures are drawn from the tables' blocks, so a plot and its table can never
disagree about which paper figure belongs to which model.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aullm.metrics import HEADLINE_PROTOCOL

from orchestrator.results.settings_table import SettingsRow
from orchestrator.results.types import GroupResult, Stat
from orchestrator.results.tables import BASELINE_VARIANT, COMPAT, Block, Section, Table, group_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_plots", "per_au_figure", "ablation_figure", "per_subject_figure", "llm_vs_baseline_figure"]

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


def _error_bars(stats: Sequence[Stat | None]) -> dict[str, Any]:
    """`bar` keywords for the ± std whiskers: only bars over two seeds or more get one; with
    one seed there is no spread, and a cap on a zero-length whisker reads as a measured one."""
    if not any(s is not None and s.n > 1 for s in stats):
        return {}
    return {"yerr": [s.std if s is not None and s.n > 1 else np.nan for s in stats], "capsize": 2}


def _mark_zeros(ax: Any, xs: Sequence[float], values: Sequence[float], width: float) -> None:
    """A bar of height 0.0 is invisible: draw a short dark line on the axis and a "0" above
    it, so a measured zero cannot be mistaken for a missing bar."""
    for x, v in zip(xs, values):
        if v is not None and np.isfinite(v) and v == 0.0:
            ax.plot([x - width / 2, x + width / 2], [0.0, 0.0], color="black", lw=2.5, solid_capstyle="butt",
                    clip_on=False, zorder=4)  # fmt: skip
            ax.text(x, 1.0, "0", ha="center", va="bottom", fontsize=6)


def _text_inches(text: str, fontsize: float) -> float:
    """A generous width of `text` in inches (DejaVu Sans averages ~0.6 em a character):
    margins are sized from the labels so nothing is clipped, without a layout engine."""
    return 0.62 * fontsize / 72 * len(text)


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
    width_in = max(6.0, 0.6 * len(cols) * ncols + 1.5)
    # a long table title wraps rather than runs off the canvas; each extra line takes room
    title = textwrap.wrap(table.title + (f" — {section.title}" if section.title else ""),
                          max(20, int((width_in - 0.3) / _text_inches("x", 10))))  # fmt: skip
    extra = 0.18 * (len(title) - 1)
    height = 3.0 * nrows + 1.0 + extra
    fig = _figure(width_in, height)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    # Fixed margins rather than a layout engine: constrained layout doubles the drawing
    # time, and the room needed for titles, y labels and the shared legend is known in inches.
    fig.subplots_adjust(left=0.65 / width_in, right=1 - 0.12 / width_in, bottom=0.45 / height,
                        top=1 - (0.95 + extra) / height, hspace=0.6, wspace=0.75 / (width_in / ncols))  # fmt: skip
    x = np.arange(len(cols))
    width = 0.27
    for ax, block in zip(axes, blocks):
        ours = [block.entries[c].ours for c in cols]
        compat = [block.entries[c].compat for c in cols]
        paper = [block.entries[c].paper for c in cols]
        ours_v = [s.mean if s else np.nan for s in ours]
        compat_v = [s.mean if s else np.nan for s in compat]
        paper_v = [np.nan if p is None else p for p in paper]
        ax.bar(x - width, ours_v, width, color=OURS_COLOR, label=f"ours ({HEADLINE_PROTOCOL})", **_error_bars(ours))
        ax.bar(x, compat_v, width, color=COMPAT_COLOR, hatch="//", edgecolor="white", label=f"ours ({COMPAT}, leaky)")
        ax.bar(x + width, paper_v, width, color=PAPER_COLOR, label="paper")
        for offset, values in ((-width, ours_v), (0.0, compat_v), (width, paper_v)):
            _mark_zeros(ax, x + offset, values, width)
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
               ncols=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - (0.3 + extra) / height))  # fmt: skip
    fig.suptitle("\n".join(title), fontsize=10, y=1 - 0.05 / height)
    return fig


def ablation_figure(table: Table) -> Figure | None:
    """The paper's Fig. 2: per dataset, average F1 by variant, one bar per LLM."""
    sections = [s for s in table.sections if any(e.status == "complete" for b in s.blocks for e in b.entries.values())]
    if not sections:
        return None
    height = 3.2 * len(sections) + 0.8
    # the legend sits right of the axes: as wide as its longest LLM name
    legend_in = 0.55 + max(_text_inches(str(c), 7) for s in sections for c in [*s.columns, "paper"])
    axes_in = max(4.5, 1.3 * max(len(s.blocks) for s in sections) + 1.0)
    width_in = 0.75 + axes_in + legend_in
    fig = _figure(width_in, height)
    axes = np.atleast_1d(fig.subplots(len(sections), 1, squeeze=False)).ravel()
    fig.subplots_adjust(left=0.75 / width_in, right=(0.75 + axes_in) / width_in, bottom=0.45 / height,
                        top=1 - 0.6 / height, hspace=0.45)  # fmt: skip
    cmap = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for ax, section in zip(axes, sections):
        blocks: list[Block] = section.blocks
        x = np.arange(len(blocks))
        k = max(len(section.columns), 1)
        width = 0.8 / k
        for j, col in enumerate(section.columns):
            pos = x - 0.4 + width * (j + 0.5)
            stats = [b.entries[col].ours for b in blocks]
            values = [s.mean if s else np.nan for s in stats]
            ax.bar(pos, values, width * 0.95, color=cmap[j % len(cmap)], label=col, **_error_bars(stats))
            _mark_zeros(ax, pos, values, width * 0.95)
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
    # sized to its content: the y labels' room from the longest group label, then the plot
    left_in = 0.25 + max(_text_inches(group_label(g), 7) for g in gs)
    width_in = left_in + 6.6
    fig = _figure(width_in, height)
    ax = fig.subplots()
    fig.subplots_adjust(left=left_in / width_in, right=1 - 0.15 / width_in, bottom=0.75 / height,
                        top=1 - 0.45 / height)  # fmt: skip
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
    ax.set_xlabel("per-subject F1 (%) at 0.5, the subject's AU decisions pooled (mean over seeds)", fontsize=9)
    ax.set_title(f"{data}: F1 per test subject (dots), pooled average F1 (bar)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def llm_vs_baseline_figure(groups: Sequence[GroupResult], data: str) -> Figure | None:
    """Per AU (and the average), each LLM's full model (`all`) beside the no-LLM baseline
    on the same data: what the LLM adds. None unless both ran to completion."""
    done = [g for g in groups if g.complete and g.key.data == data and HEADLINE_PROTOCOL in g.summary]
    base = [g for g in done if g.key.variant == BASELINE_VARIANT]
    full = sorted((g for g in done if g.key.variant == "all"), key=lambda g: g.key.llm or "")
    if not base or not full:
        return None
    shown = [*full, base[0]]
    summaries = [g.summary[HEADLINE_PROTOCOL] for g in shown]
    aus = sorted({a for s in summaries for a in s.per_au})
    cols = [f"AU{a}" for a in aus] + ["Avg"]
    labels = [group_label(g) for g in shown]
    legend_in = 0.55 + max(_text_inches(lab, 7) for lab in labels)
    axes_in = max(4.5, 0.55 * len(cols) * len(shown) / 2 + 1.5)
    width_in, height = 0.75 + axes_in + legend_in, 3.6
    fig = _figure(width_in, height)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.75 / width_in, right=(0.75 + axes_in) / width_in, bottom=0.5 / height,
                        top=1 - 0.45 / height)  # fmt: skip
    x = np.arange(len(cols))
    width = 0.8 / len(shown)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for j, (g, summ) in enumerate(zip(shown, summaries)):
        stats = [summ.per_au.get(a) for a in aus] + [summ.average]
        values = [s.mean if s else np.nan for s in stats]
        pos = x - 0.4 + width * (j + 0.5)
        color = PAPER_COLOR if g.key.variant == BASELINE_VARIANT else colors[j % len(colors)]
        ax.bar(pos, values, width * 0.95, color=color, label=labels[j], **_error_bars(stats))
        _mark_zeros(ax, pos, values, width * 0.95)
    ax.set_xticks(x, cols)
    ax.set_ylim(0, 100)
    ax.set_ylabel("F1 (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{data}: full model (all) against the no-LLM baseline, {HEADLINE_PROTOCOL}", fontsize=10)
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
        save(llm_vs_baseline_figure(groups, data), f"all_vs_no_llm_{_safe_name(data)}.png")
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
