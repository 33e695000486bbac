"""Figures without defects (issue 15.6): every figure is drawn and its text checked on the
canvas -- each title, label, tick label, legend entry and annotation inside the canvas and
none overlapping another -- and the marks that carry meaning: a 0.0 bar visibly marked,
no error caps with one seed, the `all` against `no_llm` figure whenever both ran."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any


from aullm.metrics import PROTOCOLS
from orchestrator.results import plots
from orchestrator.results.tables import build_tables
from orchestrator.results.types import ProtocolSummary, Stat

from tests.test_tables import PAPER, group


def _one_seed(g: Any, zero_au: int | None = None) -> Any:
    g.seeds = (1,)
    per_au = {a: Stat(0.0 if a == zero_au else 40.0 + a, 0.0, 1) for a in g.aus}
    g.summary = {p: ProtocolSummary(dict(per_au), Stat(45.0, 0.0, 1)) for p in PROTOCOLS}
    return g


def _groups() -> list[Any]:
    """Long names everywhere (the longest LLM name of the paper, an ablation label, a
    cropped dataset name): what clips or collides first."""
    llm = "deepseek-r1-distill-qwen-1.5b"
    return [
        group("samm", llm, "all"), group("samm", "qwen2-1.5b", "all"), group("samm", "qwen2.5-1.5b", "all"),
        group("samm", "", "no_llm"), group("samm", llm, "f_high"), group("samm", "qwen2-1.5b", "efp_minus"),
        group("casme2", llm, "all"), group("casme2", "", "no_llm"), group("casme2", llm, "prompt_learning"),
        group("casme2_to_samm", llm, "all", kind="cross_domain", layout="samm", train_layout="casme2"),
    ]  # fmt: skip


def _figures(groups: list[Any]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    for t in build_tables(groups, PAPER):
        if t.key == "table3_ablation":
            figs["ablation"] = plots.ablation_figure(t)
        elif t.key != "table_other_per_au":
            for i, section in enumerate(t.sections):
                figs[f"per_au:{t.key}:{i}"] = plots.per_au_figure(t, section)
    for data in sorted({g.key.data for g in groups}):
        figs[f"per_subject:{data}"] = plots.per_subject_figure(groups, data)
        figs[f"all_vs_no_llm:{data}"] = plots.llm_vs_baseline_figure(groups, data)
    return {k: f for k, f in figs.items() if f is not None}


def _drawn_texts(fig: Any) -> list[tuple[str, Any]]:
    """(text, window extent) of every piece of text the canvas shows. Tick labels of ticks
    outside the axis range are created but never drawn: they are left out."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden: set[int] = set()
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks():
                if not lim[0] - 1e-9 <= tick.get_loc() <= lim[1] + 1e-9:
                    hidden.update(id(t) for t in (tick.label1, tick.label2))
    out = []
    for t in fig.findobj(Text):
        if id(t) in hidden or not t.get_text().strip() or not t.get_visible():
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        out.append((t.get_text(), t.get_window_extent(renderer)))
    return out


def test_every_figure_keeps_its_text_inside_and_apart() -> None:
    groups = _groups()
    figs = _figures(groups)
    assert {"ablation", "per_subject:samm", "all_vs_no_llm:samm", "all_vs_no_llm:casme2"} <= set(figs), list(figs)
    assert len([k for k in figs if k.startswith("per_au:")]) >= 3
    for name, fig in figs.items():
        width, height = fig.canvas.get_width_height()
        texts = _drawn_texts(fig)
        assert len(texts) > 5, name
        outside = [s for s, b in texts if b.x0 < 0 or b.y0 < 0 or b.x1 > width or b.y1 > height]
        assert not outside, f"{name}: text clipped by the canvas edge: {outside}"
        overlapping = [(a[0], b[0]) for a, b in itertools.combinations(texts, 2) if a[1].overlaps(b[1])]
        assert not overlapping, f"{name}: overlapping text: {overlapping[:5]}"


def test_per_subject_figure_is_sized_to_its_content() -> None:
    few = [group("samm", "qwen2-1.5b", "all")]
    many = [group("samm", f"llm-{i}-with-a-rather-long-name", "all") for i in range(12)]
    small, big = plots.per_subject_figure(few, "samm"), plots.per_subject_figure(many, "samm")
    assert small.get_size_inches()[1] < big.get_size_inches()[1]  # taller with more groups
    assert small.get_size_inches()[0] < big.get_size_inches()[0]  # wider with longer labels


def _bars(fig: Any) -> list[Any]:
    from matplotlib.patches import Rectangle

    return [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]


def test_zero_bar_is_marked_and_one_seed_has_no_error_caps() -> None:
    from matplotlib.collections import LineCollection

    groups = [_one_seed(group("samm", "qwen2-1.5b", "all"), zero_au=4), _one_seed(group("samm", "", "no_llm"))]
    (t2, *_rest) = build_tables(groups, PAPER)
    fig = plots.per_au_figure(t2, t2.sections[0])
    zeros = [t for ax in fig.axes for t in ax.texts if t.get_text() == "0"]
    assert len(zeros) == 2, "ours and ours paper_compatible score 0.0 on AU4: both marked"
    # one seed: no whisker and no cap anywhere (errorbar draws whiskers as LineCollections)
    assert not [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]
    assert not [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() == "_"]
    vs = plots.llm_vs_baseline_figure(groups, "samm")
    assert vs is not None and [t for ax in vs.axes for t in ax.texts if t.get_text() == "0"]

    two = [group("samm", "qwen2-1.5b", "all"), group("samm", "", "no_llm")]  # two seeds: whiskers
    (t2, *_rest) = build_tables(two, PAPER)
    fig = plots.per_au_figure(t2, t2.sections[0])
    assert [c for ax in fig.axes for c in ax.collections if isinstance(c, LineCollection)]
    assert not [t for ax in fig.axes for t in ax.texts if t.get_text() == "0"]  # nothing at zero


def test_all_against_no_llm_figure_only_when_both_ran(tmp_path: Path) -> None:
    only_llm = [group("samm", "qwen2-1.5b", "all")]
    assert plots.llm_vs_baseline_figure(only_llm, "samm") is None
    both = [*only_llm, group("samm", "", "no_llm"), group("samm", "qwen2.5-1.5b", "all")]
    fig = plots.llm_vs_baseline_figure(both, "samm")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["AU-Qwen2-1.5B", "AU-Qwen2.5-1.5B", "LED baseline (no LLM)"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["AU2", "AU4", "AU7", "AU12", "Avg"]
    names = {p.name for p in plots.write_plots(both, [], tmp_path)}
    assert "all_vs_no_llm_samm.png" in names
