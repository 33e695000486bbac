"""The synthetic generator: official layouts, sizes, label statistics, determinism, learnability."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from aullm.constants import DATASET_AUS
from aullm.constants import SYNTHETIC_MARKER
from aullm.data import ClipStore, loso_subjects, parse_au_string, read_dataset, write_synthetic
from aullm.data.synth import _PLANS, AU_REGIONS, _plan_clips
from aullm.errors import UserInputError


def _plan_labels(layout: str, subjects: int | None = None) -> list[frozenset[int]]:
    plan = _PLANS[layout]
    clips = _plan_clips(layout, plan, subjects or plan.subjects, None, seed=0)
    return [parse_au_string(c.au_string(), source="plan") for c in clips]


@pytest.mark.parametrize(("layout", "subjects", "clips"), [("casme2", 26, 255), ("samm", 32, 159), ("4dme", 41, 267)])
def test_default_sizes_match_the_real_sets(layout: str, subjects: int, clips: int) -> None:
    plan = _PLANS[layout]
    planned = _plan_clips(layout, plan, plan.subjects, None, seed=0)
    assert (plan.subjects, len(planned)) == (subjects, clips)
    assert len({c.subject for c in planned}) == subjects  # every subject has clips
    assert len({(c.subject, c.name) for c in planned}) == clips  # clip folders are unique


@pytest.mark.parametrize("layout", ["casme2", "samm", "4dme"])
def test_labels_are_imbalanced_and_co_occur_like_the_real_sets(layout: str) -> None:
    labels = _plan_labels(layout)
    aus = DATASET_AUS[layout]
    counts = Counter(au for s in labels for au in s if au in aus)
    per_clip = np.mean([len(s) for s in labels])
    assert 1.0 <= per_clip <= 3.0
    assert all(counts[au] > 0 for au in aus), counts  # every evaluated AU has positives
    assert any(not (s & set(aus)) for s in labels)  # some all-negative rows, as in the real sheets
    if layout in ("casme2", "4dme"):
        assert counts.most_common(1)[0][0] == 4
        assert counts[4] > 3 * counts[17]
        with_1 = [s for s in labels if 1 in s]
        assert sum(2 in s for s in with_1) / len(with_1) > 0.5  # AU1 mostly with AU2
        with_7 = [s for s in labels if 7 in s]
        assert sum(4 in s for s in with_7) / len(with_7) > 0.5  # AU7 mostly with AU4
    if layout == "casme2":
        assert counts[4] > 3 * counts[15]


@pytest.mark.parametrize("layout", ["casme2", "samm", "4dme"])
def test_small_sets_keep_the_official_layout(layout: str, tmp_path: Path) -> None:
    root = write_synthetic(layout, tmp_path / layout, subjects=3, clips_per_subject=2, seed=1)
    samples = read_dataset(layout, root)
    assert len(samples) == 6 and len(loso_subjects(samples)) == 3
    expected_dirs = {"casme2": "CASME2_RAW_selected", "samm": "SAMM", "4dme": "4DME"}
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [
            SYNTHETIC_MARKER,  # how the tables know the data is synthetic (docs/results.md)
            expected_dirs[layout],
            {
                "casme2": "CASME2-coding-20140508.xlsx",
                "samm": "SAMM_Micro_FACS_Codes_v2.xlsx",
                "4dme": "4DME_Labelling_Micro_release.xlsx",
            }[layout],
        ]
    )
    for sample in samples:
        assert 10 <= sample.num_frames <= 36
        if sample.apex is not None:
            assert sample.onset < sample.apex < sample.offset


def test_quirks_appear_at_any_size(tmp_path: Path) -> None:
    cells = {}
    for layout, header_row, column in (("casme2", 1, "Action Units"), ("samm", 12, "Action Units"), ("4dme", 1, "AUs")):
        root = write_synthetic(layout, tmp_path / layout, subjects=1, clips_per_subject=4)
        sheet = openpyxl.load_workbook(next(root.glob("*.xlsx"))).active
        names = [c.value for c in sheet[header_row]]
        cells[layout] = [row[names.index(column)] for row in sheet.iter_rows(min_row=header_row + 1, values_only=True)]
        if layout == "casme2":
            apex = [row[names.index("ApexFrame")] for row in sheet.iter_rows(min_row=2, values_only=True)]
            assert "/" in apex
    assert any(str(c).startswith(("L", "R")) for c in cells["casme2"])
    assert any(" or " in str(c) for c in cells["samm"])
    assert any(re.search(r"\d[A-E]\b", str(c)) for c in cells["samm"])  # intensity letters
    assert any("(k)" in str(c) for c in cells["4dme"])
    assert any(isinstance(c, int) for c in cells["casme2"])  # number cells, as Excel stores a lone AU


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> tuple[list[tuple[object, ...]], list[bytes]]:
        root = write_synthetic("samm", tmp_path / name, subjects=2, clips_per_subject=1, seed=seed)
        samples = read_dataset("samm", root)
        rows = [(s.subject, s.clip, s.onset, s.apex, s.offset, s.aus, s.num_frames) for s in samples]
        return rows, [Path(p).read_bytes() for s in samples for p in s.frame_paths[:3]]

    a, b, c = make("a", 7), make("b", 7), make("c", 8)
    assert a == b
    assert a[1] != c[1]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="unknown dataset layout 'casme'; allowed: casme2, samm, 4dme"):
        write_synthetic("casme", tmp_path / "x")
    with pytest.raises(UserInputError, match="subjects=0 must be at least 1"):
        write_synthetic("casme2", tmp_path / "x", subjects=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="exists and is not empty"):
        write_synthetic("casme2", tmp_path / "full", subjects=1)


def _region(au: int) -> tuple[slice, slice]:
    y0, y1, x0, x1 = AU_REGIONS[au]
    return slice(int(y0 * 64), int(y1 * 64)), slice(int(x0 * 64), int(x1 * 64))


def test_motion_is_where_the_label_says(tmp_path: Path) -> None:
    """Learnability: apex-vs-onset change inside an AU's region is larger with that AU than without.

    Read through the real reader and ClipStore, at the 64x64 the model sees.
    """
    root = write_synthetic("casme2", tmp_path / "casme2", subjects=3, clips_per_subject=8, seed=0)
    samples = [s for s in read_dataset("casme2", root) if s.apex is not None]
    store = ClipStore.load(samples, None)
    change = {}
    for sample in samples:
        frames = store.frames(sample).astype(np.float32)
        change[sample.key] = np.abs(frames[sample.apex - sample.onset] - frames[0])
    checked = []
    for au in DATASET_AUS["casme2"]:
        region = _region(au)
        with_au = [change[s.key][region].mean() for s in samples if au in s.aus]
        without = [change[s.key][region].mean() for s in samples if au not in s.aus]
        if not with_au:
            continue
        ratio = np.mean(with_au) / np.mean(without)
        assert ratio > 1.15, f"AU{au}: mean change {np.mean(with_au):.2f} with vs {np.mean(without):.2f} without"
        checked.append(au)
    assert {1, 2, 4, 7, 12, 14, 17} <= set(checked)  # this seed has positives for these
