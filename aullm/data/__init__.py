"""Data: coding-sheet readers, LOSO and cross-domain splits, the decoded-frame cache, and
the synthetic dataset generator.

Importing this package costs nothing: each name below loads its module on first use (PEP 562),
so `aullm.data.folds.natural_key` (the fold order the orchestrator sorts by) loads no numpy or
PIL, and the CLI's `validate` reads datasets without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aullm.data.aus import parse_au_string
    from aullm.data.clips import ClipStore, decode_frame, test_frame_indices, train_frame_indices
    from aullm.data.folds import Split, cross_domain_split, label_matrix, loso_split, loso_subjects
    from aullm.data.readers import LAYOUTS, read_dataset
    from aullm.data.samples import Sample
    from aullm.data.synth import write_synthetic

_MODULE_OF = {
    "parse_au_string": "aus",
    "ClipStore": "clips", "decode_frame": "clips", "test_frame_indices": "clips", "train_frame_indices": "clips",
    "Split": "folds", "cross_domain_split": "folds", "label_matrix": "folds", "loso_split": "folds",
    "loso_subjects": "folds",
    "LAYOUTS": "readers", "read_dataset": "readers",
    "Sample": "samples",
    "write_synthetic": "synth",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'aullm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aullm.data.{_MODULE_OF[name]}"), name)


__all__ = [
    "LAYOUTS",
    "ClipStore",
    "Sample",
    "Split",
    "cross_domain_split",
    "decode_frame",
    "label_matrix",
    "loso_split",
    "loso_subjects",
    "parse_au_string",
    "read_dataset",
    "test_frame_indices",
    "train_frame_indices",
    "write_synthetic",
]
