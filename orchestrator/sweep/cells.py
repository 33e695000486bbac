"""A sweep expanded into cells (one training run each), and cells packed into array tasks.

A cell is one (data unit, LLM, variant, seed): a LOSO fold of a dataset, or a
cross-domain pair. Its id is built from those values only, so it is the same on every
expansion whatever the order of the sweep file, and it names the cell's result file.

Packing: loading a 1.5B LLM costs about as much as training a cell (DESIGN.md §7), so
cells sharing an LLM are packed into tasks of at most `cells_per_task`, and tasks into
arrays no larger than the cluster's MaxArraySize.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from aullm.constants import VARIANTS, VARIANTS_WITHOUT_LLM
from aullm.data.folds import natural_key
from aullm.errors import UserInputError

if TYPE_CHECKING:  # the spec module loads pydantic; readers of a manifest need not
    from orchestrator.sweep.spec import SweepSpec

NO_LLM = "none"  # the LLM part of the id (and group) of a cell without an LLM
ID_SEPARATOR = "__"
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
# Variant order of the paper's tables, by name (a dict: sorting 10,000 cells asks 10,000 times).
_VARIANT_RANK = {v: i for i, v in enumerate(VARIANTS)}

T = TypeVar("T")


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


@dataclass(frozen=True)
class Cell:
    """One training run of the grid.

    For LOSO, `dataset` = `train_dataset` = `test_dataset` and `fold` is the held-out
    subject (as written in the sheet). For cross-domain, `dataset` is the label
    '<train>_to_<test>' and `fold` is None. `llm` and `llm_path` are None for variants
    without an LLM (no_llm).
    """

    cell_id: str
    kind: Literal["loso", "cross_domain"]
    dataset: str
    train_dataset: str
    test_dataset: str
    fold: str | None
    llm: str | None
    llm_path: str | None
    variant: str
    seed: int
    # Training settings other than the sweep's own `training`: 'lr=1e-4,lora_r=8@<hash>'
    # (orchestrator/sweep/settings.py), '' for the sweep's own. Part of the id and group.
    settings: str = ""
    # Hash of the full resolved settings the cell trains under (the manifest's `settings`
    # table has them); '' only in manifests written before axes existed.
    settings_hash: str = ""
    # What a task sets up once for all its cells (`task_setup`): cells that differ here
    # never share a task. '' in manifests written before axes.
    task_setup: str = ""

    @property
    def group(self) -> tuple[str, ...]:
        """(data, llm, variant[, settings]): the cells whose folds the collector pools (per seed)."""
        base = (self.dataset, self.llm or NO_LLM, self.variant)
        return (*base, self.settings) if self.settings else base

    @property
    def group_id(self) -> str:
        """The group as one string, 'casme2/qwen2-1.5b/all' (the manifest's `group`)."""
        return "/".join(self.group)

    def to_dict(self) -> dict[str, Any]:
        """Manifest record: every field, plus `group` (derived) for readers of the JSON."""
        return {**dataclasses.asdict(self), "group": self.group_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        """From a manifest record; derived keys such as `group` are ignored."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"cell record lacks {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    def params(self) -> dict[str, str | int]:
        """Flat values for MLflow params (no None: MLflow stores them as the text 'None')."""
        return {
            "cell_id": self.cell_id,
            "protocol": self.kind,
            "dataset": self.dataset,
            "train_dataset": self.train_dataset,
            "test_dataset": self.test_dataset,
            "fold": self.fold or "",
            "llm": self.llm or NO_LLM,
            "variant": self.variant,
            "seed": self.seed,
            "settings": self.settings,
        }

    def group_tags(self, sweep_name: str) -> dict[str, str]:
        """MLflow tags that every cell of this cell's group shares (its parent run gets them)."""
        return {
            "aullm.sweep": sweep_name,
            "aullm.protocol": self.kind,
            "aullm.dataset": self.dataset,
            "aullm.llm": self.llm or NO_LLM,
            "aullm.variant": self.variant,
            "aullm.group": self.group_id,
            "aullm.settings": self.settings,
        }

    def tags(self, sweep_name: str) -> dict[str, str]:
        """MLflow tags that let the UI filter and group runs of one sweep."""
        return {
            **self.group_tags(sweep_name),
            "aullm.cell_id": self.cell_id,
            "aullm.kind": "cell",
            "aullm.fold": self.fold or "",
            "aullm.seed": str(self.seed),
        }


def cross_domain_label(train: str, test: str) -> str:
    return f"{train}_to_{test}"


def make_cell_id(
    *, kind: str, train: str, test: str, fold: str | None, llm: str | None, variant: str, seed: int,
    settings: str = "",
) -> str:
    """`casme2-loso-sub01__qwen2-1.5b__all__s1`, `casme2-to-samm__none__no_llm__s1`; a cell
    trained under other settings than the sweep's own: `...__all__lr=1e-4@1a2b3c4d__s1`."""
    if kind == "loso":
        if fold is None:
            raise ValueError("a LOSO cell needs a fold")
        data = f"{train}-loso-{_safe(fold)}"
    else:
        data = f"{train}-to-{test}"
    parts = (data, llm or NO_LLM, variant, *((settings,) if settings else ()), f"s{seed}")
    return ID_SEPARATOR.join(parts)


def _sort_key(cell: Cell) -> tuple[Any, ...]:
    # LLM first (packing keeps an LLM's cells together), then data, variant, seed, fold.
    return (
        cell.llm or "",
        cell.kind != "loso",
        cell.train_dataset,
        cell.test_dataset,
        _VARIANT_RANK.get(cell.variant, len(VARIANTS)),
        cell.variant,
        cell.settings,
        cell.seed,
        natural_key(cell.fold or ""),
        cell.cell_id,
    )


def sort_cells(cells: Iterable[Cell]) -> list[Cell]:
    """The canonical order: the same set of cells always comes out the same way."""
    return sorted(cells, key=_sort_key)


def expand(spec: SweepSpec, subjects_by_dataset: Mapping[str, Sequence[str]]) -> list[Cell]:
    """Every cell of the grid, in canonical order.

    `subjects_by_dataset` maps each LOSO dataset to its subjects (from the sheets, see
    `spec.validate_paths`; tests pass lists directly). A dataset's `folds` subset, when
    given, replaces its subject list. A cell that several blocks produce (same id) is
    kept once: blocks are a union, and overlapping blocks are a convenience, not an error.
    """
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> None:
        previous = cells.get(cell.cell_id)
        if previous is not None and previous != cell:
            raise UserInputError(
                f"{spec.source}: cells {previous.fold!r} and {cell.fold!r} get the same id {cell.cell_id!r}; "
                "subject ids must differ in more than punctuation"
            )
        cells[cell.cell_id] = cell

    for index, block in enumerate(spec.grid):
        llm_names = spec.block_llms(block)
        seeds = spec.block_seeds(block)
        choices: list[tuple[str, str | None]] = []
        for variant in block.variants:
            if variant in VARIANTS_WITHOUT_LLM:
                choices.append((variant, None))
            else:
                choices.extend((variant, llm) for llm in llm_names)

        units: list[tuple[str, str, str | None]] = []  # (train, test, fold)
        if block.protocol == "loso":
            for name in block.datasets or []:
                for fold in _folds(spec, name, subjects_by_dataset, index):
                    units.append((name, name, fold))
        else:
            units.extend((pair.train, pair.test, None) for pair in block.pairs or [])

        for train, test, fold in units:
            for variant, llm in choices:
                for label, digest, resolved in spec.block_settings(index, llm=llm is not None):
                    for seed in seeds:
                        kind: Literal["loso", "cross_domain"] = "loso" if fold is not None else "cross_domain"
                        add(
                            Cell(
                                cell_id=make_cell_id(
                                    kind=kind, train=train, test=test, fold=fold, llm=llm, variant=variant, seed=seed,
                                    settings=label,
                                ),
                                kind=kind,
                                dataset=train if kind == "loso" else cross_domain_label(train, test),
                                train_dataset=train,
                                test_dataset=test,
                                fold=fold,
                                llm=llm,
                                llm_path=spec.llms[llm].path if llm is not None else None,
                                variant=variant,
                                seed=seed,
                                settings=label,
                                settings_hash=digest,
                                task_setup=task_setup(resolved),
                            )
                        )
    return sort_cells(cells.values())


def _folds(spec: SweepSpec, name: str, subjects_by_dataset: Mapping[str, Sequence[str]], block: int) -> list[str]:
    if name not in subjects_by_dataset:
        raise ValueError(f"no subject list for dataset {name!r} (grid[{block}]); read it with validate_paths")
    subjects = [str(s) for s in subjects_by_dataset[name]]
    if not subjects:
        raise spec.field_error(("datasets", name), "the coding sheet lists no subjects")
    wanted = spec.datasets[name].folds
    if wanted is None:
        return subjects
    present = set(subjects)
    for i, fold in enumerate(wanted):
        if fold not in present:
            raise spec.field_error(("datasets", name, "folds", i), f"subject '{fold}' is not in {name}")
    return list(wanted)


# ---------------------------------------------------------------- packing


def _balanced_chunks(items: Sequence[T], limit: int) -> list[list[T]]:
    """Fewest chunks of at most `limit` items, sizes differing by at most one.

    26 cells at 8 per task give 7+7+6+6, not 8+8+8+2: an array finishes with its
    slowest task, so even tasks finish sooner.
    """
    if limit < 1:
        raise ValueError(f"chunk size must be >= 1, got {limit}")
    if not items:
        return []
    count = math.ceil(len(items) / limit)
    base, extra = divmod(len(items), count)
    chunks: list[list[T]] = []
    start = 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


def task_setup(settings: Mapping[str, Any]) -> str:
    """The settings a task fixes for all its cells when it starts: the LLM's dtype (from
    `precision`) and the DeepSpeed engine, whose config takes the batch size. Everything
    else (lr, epochs, LoRA rank, ...) is per cell."""
    text = f"precision={settings.get('precision')}"
    if settings.get("deepspeed"):
        text += f",deepspeed={settings['deepspeed']},batch_size={settings.get('batch_size')}"
    return text


def pack_key(cell: Cell) -> tuple[str, str]:
    """What the cells of one task must share: the LLM it loads once (none for no_llm) and
    its `task_setup`. Cells differing only in per-cell settings share the LLM load that
    packing exists to save."""
    return (cell.llm_path or "", cell.task_setup)


def pack(cells: Iterable[Cell], cells_per_task: int) -> list[list[Cell]]:
    """Tasks of at most `cells_per_task` cells sharing one LLM; deterministic order."""
    if cells_per_task < 1:
        raise ValueError(f"cells_per_task must be >= 1, got {cells_per_task}")
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in sort_cells(cells):
        groups.setdefault(pack_key(cell), []).append(cell)
    tasks: list[list[Cell]] = []
    for key in sorted(groups):
        tasks.extend(_balanced_chunks(groups[key], cells_per_task))
    return tasks


def split_arrays(tasks: Sequence[T], max_array_size: int) -> list[list[T]]:
    """Cut tasks into arrays of at most `max_array_size` (balanced, order kept)."""
    return _balanced_chunks(tasks, max_array_size)
