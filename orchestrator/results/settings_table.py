"""The settings table: one row per distinct training setting of each (data, LLM, variant).

When a sweep has axes (`sweep: {lr: [...]}`), the paper's tables show only the sweep's own
`training` settings, so no table ever pools or ranks numbers trained differently; this table
is where the settings meet: each row is one group (its own folds and seeds, never mixed),
with the headline F1 (mean over seeds; ± std only from 2 seeds up, one seed has none) and
its difference to the default setting of the same data, LLM and variant.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aullm.metrics import HEADLINE_PROTOCOL

from orchestrator.results.types import GroupResult, Stat
from orchestrator.sweep.cells import NO_LLM
from orchestrator.sweep.settings import show_value

MISSING = "—"
DEFAULT_LABEL = "default (training:)"


@dataclass(frozen=True)
class SettingsRow:
    base: str  # 'casme2/tiny/all': the group without its settings
    setting: str  # the settings label, or DEFAULT_LABEL
    values: dict[str, Any]  # swept field -> this setting's value
    status: str
    seeds: int
    f1: Stat | None
    delta: float | None  # F1 mean minus the default setting's (None: no default to compare)
    group: str


def _headline(g: GroupResult) -> Stat | None:
    return g.summary[HEADLINE_PROTOCOL].average if g.complete and HEADLINE_PROTOCOL in g.summary else None


def settings_rows(groups: Sequence[GroupResult]) -> list[SettingsRow]:
    """The table's rows (empty when the sweep trains under one setting only)."""
    if not any(g.key.settings for g in groups):
        return []
    swept = next((g.swept for g in groups if g.swept), ())
    by_base: dict[str, list[GroupResult]] = defaultdict(list)
    for g in groups:
        by_base[f"{g.key.data}/{g.key.llm or NO_LLM}/{g.key.variant}"].append(g)
    rows: list[SettingsRow] = []
    for base in sorted(by_base):
        members = by_base[base]
        default = next((g for g in members if not g.key.settings), None)
        ref = _headline(default) if default is not None else None

        def order(g: GroupResult) -> tuple[Any, ...]:
            return (bool(g.key.settings), [str(type(g.settings.get(k))) + repr(g.settings.get(k)) for k in swept])

        for g in sorted(members, key=order):
            f1 = _headline(g)
            rows.append(SettingsRow(
                base=base, setting=g.key.settings or DEFAULT_LABEL,
                values={k: g.settings.get(k) for k in swept}, status=g.status, seeds=len(g.seeds), f1=f1,
                delta=None if f1 is None or ref is None or not g.key.settings else f1.mean - ref.mean,
                group=g.key.id,
            ))  # fmt: skip
    return rows


def fmt_f1(s: Stat | None) -> str:
    if s is None:
        return MISSING
    return f"{s.mean:.1f} ± {s.std:.1f}" if s.n >= 2 else f"{s.mean:.1f}"


def _fmt_delta(x: float | None) -> str:
    return MISSING if x is None else f"{x:+.1f}"


def _columns(rows: Sequence[SettingsRow]) -> list[str]:
    return list(rows[0].values) if rows else []


def to_markdown(rows: Sequence[SettingsRow], *, level: int = 3) -> str:
    if not rows:
        return ""
    fields = _columns(rows)
    out = [
        f"{'#' * level} Settings: headline F1 ({HEADLINE_PROTOCOL}, %) per training setting",
        "",
        "| group | setting | " + " | ".join(fields) + " | seeds | F1 | Δ vs default | status |",
        "|---|---|" + "".join("---|" for _ in fields) + "---:|---:|---:|---|",
    ]
    for r in rows:
        values = [show_value(r.values[k]) for k in fields]
        out.append(f"| {r.base} | {r.setting} | " + " | ".join(values) + f" | {r.seeds} | {fmt_f1(r.f1)} | "
                   f"{_fmt_delta(r.delta)} | {r.status} |")  # fmt: skip
    out += ["", f"- One row per setting; its folds and seeds are pooled and scored on their own, never with "
            f"another setting's. Δ: F1 minus the default setting's (the sweep's `training:`) for the same "
            f"data, LLM and variant; {MISSING} where that default is not in the sweep or not complete.", ""]
    return "\n".join(out)


def to_csv(rows: Sequence[SettingsRow]) -> str:
    fields = _columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "setting", *fields, "seeds", "f1_mean", "f1_std", "delta_vs_default", "status"])
    for r in rows:
        w.writerow([r.base, r.setting, *(r.values[k] for k in fields), r.seeds,
                    "" if r.f1 is None else f"{r.f1.mean:.4f}",
                    "" if r.f1 is None or r.f1.n < 2 else f"{r.f1.std:.4f}",
                    "" if r.delta is None else f"{r.delta:.4f}", r.status])  # fmt: skip
    return buf.getvalue()
