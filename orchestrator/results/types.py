"""What collecting produces and everything after it reads: group keys, per-seed statistics,
group results. Its own module so that tables, plots and summary runs depend on the types,
not on the collector (they once formed a ring through collect.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aullm.errors import UserInputError
from aullm.metrics import ScoreRow
from orchestrator.sweep.cells import NO_LLM

__all__ = ["CellRef", "GroupKey", "GroupResult", "MissingCell", "ProtocolSummary", "Stat"]


# --------------------------------------------------------------------------- cells and groups


@dataclass(frozen=True, order=True)
class GroupKey:
    """What one table entry stands on. `data` is the dataset name for LOSO groups and
    ``"<train>_to_<test>"`` for cross-domain ones (the paper_tables.yaml spelling)."""

    kind: str  # "loso" | "cross_domain"
    data: str
    llm: str  # "" for variants without an LLM
    variant: str
    settings: str = ""  # the cells' settings label ('' = the sweep's own `training`)

    @property
    def id(self) -> str:
        """Stable, human-readable id; the MLflow tag ``aullm.group`` of the parent run."""
        # the cells' own NO_LLM: group ids equal the `aullm.group` tag cell runs carry ("casme2/none/no_llm")
        base = f"{self.data}/{self.llm or NO_LLM}/{self.variant}"
        return f"{base}/{self.settings}" if self.settings else base


@dataclass(frozen=True)
class CellRef:
    """The fields of one manifest cell that collecting needs."""

    cell_id: str
    kind: str
    dataset: str | None  # LOSO: the dataset name
    train_dataset: str | None  # cross-domain: trained on all of this one ...
    test_dataset: str | None  # ... tested on all of this one
    fold: str
    llm: str
    variant: str
    seed: int
    settings: str = ""
    settings_hash: str = ""

    @classmethod
    def from_any(cls, obj: Any) -> CellRef:
        """From a manifest entry (mapping) or an `orchestrator.sweep.cells.Cell`-like object."""
        if isinstance(obj, CellRef):
            return obj

        def get(name: str, default: Any = None) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(name, default)
            return getattr(obj, name, default)

        cell_id = get("cell_id")
        if not cell_id:
            raise UserInputError(f"manifest cell {obj!r}: field cell_id is missing")
        kind = str(get("kind") or "loso")
        if kind not in ("loso", "cross_domain"):
            raise UserInputError(f"manifest cell {cell_id}: kind {kind!r} is not allowed; allowed: loso, cross_domain")
        train = get("train_dataset")
        test = get("test_dataset")
        dataset = get("dataset")
        if kind == "loso" and not dataset:
            raise UserInputError(f"manifest cell {cell_id}: a loso cell needs field dataset")
        if kind == "cross_domain" and not (train and test):
            raise UserInputError(f"manifest cell {cell_id}: a cross_domain cell needs train_dataset and test_dataset")
        llm = get("llm")
        # a manifest writes NO_LLM for a cell without an LLM, a Cell object holds None
        llm = "" if llm is None or str(llm) == NO_LLM else str(llm)
        variant = get("variant")
        if not variant:
            raise UserInputError(f"manifest cell {cell_id}: field variant is missing")
        seed = get("seed", 0)
        try:
            seed_int = int(seed)
        except (TypeError, ValueError):
            raise UserInputError(f"manifest cell {cell_id}: seed {seed!r} is not an integer") from None
        fold = get("fold")
        return cls(
            cell_id=str(cell_id),
            kind=kind,
            dataset=str(dataset) if dataset else None,
            train_dataset=str(train) if train else None,
            test_dataset=str(test) if test else None,
            fold=str(fold) if fold not in (None, "") else ("all" if kind == "cross_domain" else "?"),
            llm=llm,
            variant=str(variant),
            seed=seed_int,
            settings=str(get("settings") or ""),
            settings_hash=str(get("settings_hash") or ""),
        )

    @property
    def group_key(self) -> GroupKey:
        data = self.dataset if self.kind == "loso" else f"{self.train_dataset}_to_{self.test_dataset}"
        return GroupKey(self.kind, str(data), self.llm, self.variant, self.settings)


@dataclass(frozen=True)
class Stat:
    """Mean and std (ddof=1, 0 for one seed) over seeds, F1 in percent."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class ProtocolSummary:
    per_au: dict[int, Stat]
    average: Stat


@dataclass(frozen=True)
class MissingCell:
    seed: int
    fold: str
    cell_id: str
    reason: str  # "no result" | "failed: <error>" | "unreadable: ..."


@dataclass
class GroupResult:
    key: GroupKey
    layout: str  # the dataset layout the AUs follow: LOSO dataset's, or the test dataset's
    train_layout: str | None  # cross-domain only
    cell_ids: tuple[str, ...]
    seeds: tuple[int, ...]
    folds: tuple[str, ...]
    status: str  # "complete" | "incomplete" | "invalid"
    missing: list[MissingCell] = field(default_factory=list)
    problem: str = ""  # why an "invalid" group could not be scored
    aus: tuple[int, ...] = ()
    n_samples: int = 0
    per_seed: dict[int, dict[str, ScoreRow]] = field(default_factory=dict)  # fractions, as metrics returns
    summary: dict[str, ProtocolSummary] = field(default_factory=dict)  # percent
    per_subject: dict[str, float] = field(default_factory=dict)  # percent, mean over seeds
    # How the cells were trained and on what: the tables compare with the paper's figures
    # only what was computed as the paper's were (docs/results.md).
    recipe: str = "paper"
    differs_from_script: tuple[str, ...] = ()  # recipe fields whose value is not the released script's
    synthetic: bool = False  # trained and tested on `aullm-grid data synth` data
    # The full resolved training settings of the group's cells (empty when not known), and
    # which fields the sweep varies (the settings table and plot show those).
    settings: dict[str, Any] = field(default_factory=dict)
    swept: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def like_against_like(self) -> bool:
        """Our paper_compatible score is computed as the paper's figures were: real data,
        cells trained with the released script's recipe and nothing of it overridden."""
        return self.recipe == "script" and not self.differs_from_script and not self.synthetic

    def missing_text(self, limit: int = 12) -> str:
        """'sub03, sub07 (seed 1); sub03 failed (seed 2)' -- the folds a reader must chase."""
        if self.status == "invalid":
            return self.problem
        by_seed: dict[int, list[str]] = defaultdict(list)
        for m in self.missing:
            by_seed[m.seed].append(m.fold if m.reason == "no result" else f"{m.fold} {m.reason.split(':')[0]}")
        parts = []
        for seed in sorted(by_seed):
            folds = by_seed[seed]
            shown = ", ".join(folds[:limit]) + (f", ... (+{len(folds) - limit})" if len(folds) > limit else "")
            parts.append(f"{shown} (seed {seed})")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.key.id,
            "kind": self.key.kind,
            "data": self.key.data,
            "llm": self.key.llm,
            "variant": self.key.variant,
            "layout": self.layout,
            "status": self.status,
            "seeds": list(self.seeds),
            "folds": list(self.folds),
            "cells": list(self.cell_ids),
            "missing": [m.__dict__ for m in self.missing],
            "problem": self.problem,
            "aus": list(self.aus),
            "n_samples": self.n_samples,
            "scores_percent": {
                proto: {
                    "per_au": {str(au): s.__dict__ for au, s in summ.per_au.items()},
                    "average": summ.average.__dict__,
                }
                for proto, summ in self.summary.items()
            },
            "per_seed_fraction": {
                str(seed): {proto: row.to_dict() for proto, row in rows.items()} for seed, rows in self.per_seed.items()
            },
            "per_subject_f1_percent": self.per_subject,
            "recipe": self.recipe,
            "differs_from_script": list(self.differs_from_script),
            "synthetic": self.synthetic,
            "like_against_like": self.like_against_like,
            "settings_label": self.key.settings,
            "swept": {k: self.settings.get(k) for k in self.swept},
            "training": self.settings,
        }
