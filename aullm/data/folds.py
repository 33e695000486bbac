"""Train/test splits: Leave-One-Subject-Out within a dataset, and cross-domain."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aullm.constants import CROSS_DOMAIN_AUS, DATASET_AUS
from aullm.data.samples import Sample
from aullm.errors import UserInputError

if TYPE_CHECKING:  # numpy only where labels are built: the orchestrator sorts folds with natural_key
    import numpy as np


@dataclass(frozen=True)
class Split:
    """What one cell trains on, what it tests on, and which AUs it scores (column order)."""

    name: str
    train: list[Sample]
    test: list[Sample]
    aus: tuple[int, ...]


_DIGIT_RUNS = re.compile(r"(\d+)")


@functools.lru_cache(maxsize=8192)
def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """The order of folds everywhere (splits, cell ids, tables): 'S2' before 'S10', because 4DME
    sub_IDs are not zero-padded. Digit runs compare as numbers, tagged so a number never meets
    a string. Cached: a grid repeats each fold name for every LLM, variant and seed."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGIT_RUNS.split(text) if part)


def _single_dataset(samples: Sequence[Sample], what: str) -> str:
    datasets = sorted({s.dataset for s in samples})
    if not datasets:
        raise UserInputError(f"{what}: no samples")
    if len(datasets) > 1:
        raise UserInputError(f"{what}: samples come from several datasets ({', '.join(datasets)}); expected one")
    return datasets[0]


def loso_subjects(samples: Iterable[Sample]) -> list[str]:
    """Subjects in natural order: one LOSO fold each."""
    return sorted({s.subject for s in samples}, key=natural_key)


def loso_split(samples: Sequence[Sample], subject: str, aus: Sequence[int] | None = None) -> Split:
    """Test on `subject`'s clips, train on everyone else's. `aus` defaults to the dataset's list."""
    dataset = _single_dataset(samples, f"LOSO split for subject {subject!r}")
    test = [s for s in samples if s.subject == subject]
    if not test:
        raise UserInputError(
            f"LOSO subject {subject!r} has no samples in {dataset}; subjects: {', '.join(loso_subjects(samples))}"
        )
    train = [s for s in samples if s.subject != subject]
    fold_aus = tuple(aus) if aus is not None else DATASET_AUS[dataset]
    return Split(name=f"{dataset}/loso/{subject}", train=train, test=test, aus=fold_aus)


def cross_domain_split(source_samples: Sequence[Sample], target_samples: Sequence[Sample]) -> Split:
    """Train on all of one dataset, test on all of another, on the AUs both annotate."""
    source = _single_dataset(source_samples, "cross-domain source")
    target = _single_dataset(target_samples, "cross-domain target")
    if source == target:
        raise UserInputError(f"cross-domain split needs two different datasets, got {source} twice")
    return Split(
        name=f"{source}->{target}",
        train=list(source_samples),
        test=list(target_samples),
        aus=CROSS_DOMAIN_AUS,
    )


def label_matrix(samples: Sequence[Sample], aus: Sequence[int]) -> np.ndarray:
    """Multi-hot labels, float32 (N, len(aus)); column j is AU aus[j]."""
    import numpy as np

    labels = np.zeros((len(samples), len(aus)), dtype=np.float32)
    column = {au: j for j, au in enumerate(aus)}
    for i, sample in enumerate(samples):
        for au in sample.aus:
            j = column.get(au)
            if j is not None:
                labels[i, j] = 1.0
    return labels
