"""Data: coding-sheet readers, LOSO and cross-domain splits, the decoded-frame cache, and
the synthetic dataset generator.

Importing this package is light (numpy, PIL; openpyxl only when a sheet is read or
written): the CLI's `validate` reads datasets without paying for torch.
"""

from aullm.data.aus import parse_au_string
from aullm.data.clips import ClipStore, decode_frame, test_frame_indices, train_frame_indices
from aullm.data.folds import Split, cross_domain_split, label_matrix, loso_split, loso_subjects
from aullm.data.readers import LAYOUTS, read_dataset
from aullm.data.samples import Sample
from aullm.data.synth import write_synthetic

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
