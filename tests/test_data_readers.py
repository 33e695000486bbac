"""AU strings, the three coding-sheet readers (on generated official layouts), and folds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from aullm.constants import CROSS_DOMAIN_AUS, DATASET_AUS
from aullm.data import (
    Sample,
    cross_domain_split,
    label_matrix,
    loso_split,
    loso_subjects,
    parse_au_string,
    read_dataset,
    write_synthetic,
)
from aullm.errors import UserInputError

CASME_SHEET = "CASME2-coding-20140508.xlsx"
SAMM_SHEET = "SAMM_Micro_FACS_Codes_v2.xlsx"
FOURDME_SHEET = "4DME_Labelling_Micro_release.xlsx"


# ---------------------------------------------------------------- AU strings


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("1+2+R4", {1, 2, 4}),  # DESIGN.md examples
        ("R14A", {14}),
        ("4+L10", {4, 10}),
        ("R12 or 14", {12, 14}),  # SAMM alternatives: both kept, as the released script does
        ("L4 or 7", {4, 7}),
        ("4(k)", {4}),  # 4DME mark
        ("4(k)+7", {4, 7}),
        ("B4", {4}),
        ("12E", {12}),
        ("R12B+L14A", {12, 14}),
        (" 1 + 2 ", {1, 2}),
        ("AU4+AU7", {4, 7}),
        ("4+", {4}),  # stray '+': an empty piece carries nothing
        ("10", {10}),
        ("4.0", {4}),  # Excel float stored as text: not AU 40
        ("12.0+4", {12, 4}),
        (4, {4}),  # number cells
        (4.0, {4}),
        (17, {17}),
    ],
)
def test_parse_au_string(cell: object, expected: set[int]) -> None:
    assert parse_au_string(cell, source="sheet row 2") == frozenset(expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("cell", ["none", "", "   ", None, "4+x", "?", 4.5, True])
def test_parse_au_string_rejects_cells_without_an_au(cell: object) -> None:
    with pytest.raises(UserInputError) as err:
        parse_au_string(cell, source="CASME2-coding-20140508.xlsx row 17")  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith("CASME2-coding-20140508.xlsx row 17: ")
    assert "\n" not in message


def test_parse_au_string_message_names_the_value() -> None:
    with pytest.raises(UserInputError, match=r"row 17: AU string 'none' has no AU number"):
        parse_au_string("none", source="CASME2-coding-20140508.xlsx row 17")
    with pytest.raises(UserInputError, match=r"'4\+x' has no AU number in piece 'x'"):
        parse_au_string("4+x", source="s")


# ---------------------------------------------------------------- generated datasets


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("readers")
    return {
        layout: write_synthetic(layout, base / layout, subjects=2, clips_per_subject=3, seed=3)
        for layout in ("casme2", "samm", "4dme")
    }




def _sheet_rows(path: Path, header_row: int) -> tuple[list[str], list[tuple[object, ...]]]:
    sheet = openpyxl.load_workbook(path).active
    rows = list(sheet.iter_rows(values_only=True))
    header = [str(c) for c in rows[header_row - 1]]
    return header, [r for r in rows[header_row:] if any(c is not None for c in r)]


def test_casme2_reader_follows_the_sheet(datasets: dict[str, Path]) -> None:
    root = datasets["casme2"]
    samples = read_dataset("casme2", root)
    header, rows = _sheet_rows(root / CASME_SHEET, 1)
    assert header == [
        "Subject",
        "Filename",
        "OnsetFrame",
        "ApexFrame",
        "OffsetFrame",
        "Action Units",
        "Estimated Emotion",
    ]
    assert len(samples) == len(rows) == 6
    for sample, row in zip(samples, rows, strict=True):
        subject, filename, onset, apex, offset, _aus, _emotion = row
        assert sample.dataset == "casme2"
        assert sample.subject == f"sub{int(subject):02d}"  # type: ignore[arg-type]
        assert sample.clip == filename
        assert (sample.onset, sample.offset) == (onset, offset)
        assert sample.apex == (None if apex == "/" else apex)
        assert sample.key == f"casme2/{sample.subject}/{filename}"
        names = [Path(p).name for p in sample.frame_paths]
        assert names == [f"img{n}.jpg" for n in range(onset, offset + 1)]  # type: ignore[arg-type]
        assert all(
            Path(p).parent == root / "CASME2_RAW_selected" / sample.subject / sample.clip for p in sample.frame_paths
        )
    # The quirks the generator plants in the first rows, as the reader must see them.
    assert rows[0][0] == "01" and samples[0].subject == "sub01"  # text subject cell
    assert rows[0][3] == "/" and samples[0].apex is None
    assert rows[0][5] == "1+2+R4" and samples[0].aus == {1, 2, 4}
    assert rows[1][5] == "4+L10" and samples[1].aus == {4, 10}
    assert rows[2][5] == "R14A" and samples[2].aus == {14}
    assert rows[3][5] == 4 and samples[3].aus == {4}  # a number cell


def test_samm_reader_reads_below_the_title_block(datasets: dict[str, Path]) -> None:
    root = datasets["samm"]
    sheet = openpyxl.load_workbook(root / SAMM_SHEET).active
    assert [sheet.cell(row=r, column=1).value for r in (12,)] == ["Subject"]
    assert all(sheet.cell(row=r, column=1).value != "Subject" for r in range(1, 12))
    header, rows = _sheet_rows(root / SAMM_SHEET, 12)
    assert header[:10] == [
        "Subject",
        "Filename",
        "Inducement Code",
        "Onset Frame",
        "Apex Frame",
        "Offset Frame",
        "Duration",
        "Type",
        "Action Units",
        "Notes",
    ]
    samples = read_dataset("samm", root)
    assert len(samples) == len(rows) == 6
    for sample, row in zip(samples, rows, strict=True):
        assert sample.subject == f"{int(row[0]):03d}"  # type: ignore[arg-type]
        assert (sample.clip, sample.onset, sample.apex, sample.offset) == (row[1], row[3], row[4], row[5])
        first = Path(sample.frame_paths[0]).name
        assert first == f"{sample.subject}_{sample.onset:05d}.jpg"
        assert len(sample.frame_paths) == row[6]  # Duration
    assert rows[0][8] == "R12 or 14" and samples[0].aus == {12, 14}
    assert rows[1][8] == "4+7B" and samples[1].aus == {4, 7}
    assert rows[2][8] == "R14A+L2" and samples[2].aus == {14, 2}
    assert rows[1][0] == "006" and samples[1].subject == "006"  # text subject cell


def test_4dme_reader(datasets: dict[str, Path]) -> None:
    root = datasets["4dme"]
    header, rows = _sheet_rows(root / FOURDME_SHEET, 1)
    assert header == ["sub_ID", "fold_name", "Emotion", "Onset", "Apex", "Offset", "AUs"]
    samples = read_dataset("4dme", root)
    assert [(s.subject, s.clip, s.onset, s.apex, s.offset) for s in samples] == [
        (r[0], r[1], r[3], r[4], r[5]) for r in rows
    ]
    assert rows[0][6] == "4(k)+7" and samples[0].aus == {4, 7}
    assert rows[1][6] == "L12+6" and samples[1].aus == {12, 6}
    assert rows[2][6] == 45 and samples[2].aus == {45}
    assert Path(samples[0].frame_paths[0]) == root / "4DME" / "S1" / samples[0].clip / f"{samples[0].onset}.jpg"


def test_sheet_and_frames_dir_overrides(casme2_copy: Path, tmp_path: Path) -> None:
    (casme2_copy / "CASME2_RAW_selected").rename(casme2_copy / "Cropped")
    with pytest.raises(UserInputError, match=r"frames folder .*CASME2_RAW_selected.* not found.*Cropped.*frames_dir="):
        read_dataset("casme2", casme2_copy)
    relative = read_dataset("casme2", casme2_copy, frames_dir="Cropped")
    absolute = read_dataset("casme2", casme2_copy, frames_dir=casme2_copy / "Cropped")
    assert relative == absolute and len(relative) == 4  # 2 subjects x 2 clips
    assert all("/Cropped/" in p for s in relative for p in s.frame_paths)

    moved = tmp_path / "elsewhere" / "my-coding.xlsx"
    moved.parent.mkdir()
    (casme2_copy / CASME_SHEET).rename(moved)
    with pytest.raises(UserInputError, match=r"no casme2 coding sheet matching 'CASME2-coding-\*\.xlsx'"):
        read_dataset("casme2", casme2_copy, frames_dir="Cropped")
    assert read_dataset("casme2", casme2_copy, sheet=moved, frames_dir="Cropped") == relative
    shutil.copy(moved, casme2_copy / "codes-v3.xlsx")
    assert read_dataset("casme2", casme2_copy, sheet="codes-*.xlsx", frames_dir="Cropped") == relative


def test_two_candidate_sheets_is_an_error(casme2_copy: Path) -> None:
    shutil.copy(casme2_copy / CASME_SHEET, casme2_copy / "CASME2-coding-20990101.xlsx")
    with pytest.raises(UserInputError, match=r"several coding sheets match .*sheet="):
        read_dataset("casme2", casme2_copy)


# ---------------------------------------------------------------- errors


def _edit_sheet(path: Path, header_row: int, column: str, data_row: int, value: object) -> None:
    workbook = openpyxl.load_workbook(path)
    sheet = workbook.active
    names = [c.value for c in sheet[header_row]]
    # ws.cell(..., value=None) would leave the old value: assign explicitly.
    sheet.cell(row=header_row + data_row, column=names.index(column) + 1).value = value
    workbook.save(path)


def test_missing_root_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"dataset root .*nowhere.* does not exist"):
        read_dataset("casme2", tmp_path / "nowhere")
    with pytest.raises(UserInputError, match=r"unknown dataset layout 'casme3'; allowed: casme2, samm, 4dme"):
        read_dataset("casme3", tmp_path)


@pytest.mark.parametrize(
    ("layout", "sheet_name", "header_row", "column"),
    [
        ("casme2", CASME_SHEET, 1, "Action Units"),
        ("samm", SAMM_SHEET, 12, "Onset Frame"),
        ("4dme", FOURDME_SHEET, 1, "sub_ID"),
    ],
)
def test_missing_column_names_file_and_column(
    datasets: dict[str, Path], tmp_path: Path, layout: str, sheet_name: str, header_row: int, column: str
) -> None:
    root = Path(shutil.copytree(datasets[layout], tmp_path / layout))
    workbook = openpyxl.load_workbook(root / sheet_name)
    sheet = workbook.active
    sheet.delete_cols([c.value for c in sheet[header_row]].index(column) + 1)
    workbook.save(root / sheet_name)
    with pytest.raises(UserInputError) as err:
        read_dataset(layout, root)
    assert sheet_name in str(err.value)
    assert f"required column '{column}' missing" in str(err.value)


def test_au_string_without_digits_names_the_row(casme2_copy: Path) -> None:
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "Action Units", 2, "none")
    with pytest.raises(UserInputError, match=r"^CASME2-coding-20140508\.xlsx row 3: AU string 'none' has no AU number"):
        read_dataset("casme2", casme2_copy)


def test_missing_clip_folder(casme2_copy: Path) -> None:
    sample = read_dataset("casme2", casme2_copy)[1]
    shutil.rmtree(Path(sample.frame_paths[0]).parent)
    with pytest.raises(UserInputError, match=rf"row 3: clip folder .*sub01/{sample.clip}' not found"):
        read_dataset("casme2", casme2_copy)


def test_missing_frame_is_a_count_contradiction(casme2_copy: Path) -> None:
    sample = read_dataset("casme2", casme2_copy)[0]
    Path(sample.frame_paths[3]).unlink()
    n = sample.offset - sample.onset + 1
    with pytest.raises(UserInputError) as err:
        read_dataset("casme2", casme2_copy)
    message = str(err.value)
    assert f"clip folder '{Path(sample.frame_paths[0]).parent}'" in message
    assert f"(expected {n}) but found {n - 1}" in message
    assert f"first missing: frame {sample.onset + 3}" in message


def test_offset_beyond_the_frames_is_a_count_contradiction(casme2_copy: Path) -> None:
    sample = read_dataset("casme2", casme2_copy)[0]
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "OffsetFrame", 1, sample.offset + 5)
    with pytest.raises(UserInputError, match=rf"expected {sample.num_frames + 5}\) but found {sample.num_frames}"):
        read_dataset("casme2", casme2_copy)


@pytest.mark.parametrize(
    ("column", "value", "pattern"),
    [
        ("OnsetFrame", "abc", r"row 2: column 'OnsetFrame' has 'abc', expected a frame number"),
        ("OffsetFrame", 1, r"row 2: 'OffsetFrame' 1 is before 'OnsetFrame'"),
        ("Subject", "x", r"row 2: column 'Subject' has 'x', expected a subject number"),
        ("Filename", None, r"row 2: column 'Filename' is empty"),
    ],
)
def test_bad_cells(casme2_copy: Path, column: str, value: object, pattern: str) -> None:
    _edit_sheet(casme2_copy / CASME_SHEET, 1, column, 1, value)
    with pytest.raises(UserInputError, match=pattern):
        read_dataset("casme2", casme2_copy)


def test_not_an_xlsx(casme2_copy: Path) -> None:
    (casme2_copy / CASME_SHEET).write_bytes(b"this is not a workbook")
    with pytest.raises(UserInputError, match=r"is not a readable \.xlsx file"):
        read_dataset("casme2", casme2_copy)


def test_duplicate_row(casme2_copy: Path) -> None:
    first = read_dataset("casme2", casme2_copy)[0]
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "Filename", 2, first.clip)
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "Subject", 2, 1)
    with pytest.raises(UserInputError, match=r"row 3: clip sub01/.* is listed twice \(first on row 2\)"):
        read_dataset("casme2", casme2_copy)


def test_rows_without_evaluated_aus_are_kept_and_apex_variants(casme2_copy: Path) -> None:
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "Action Units", 2, "25")
    _edit_sheet(casme2_copy / CASME_SHEET, 1, "ApexFrame", 2, None)
    samples = read_dataset("casme2", casme2_copy)
    assert len(samples) == 4
    assert samples[1].aus == {25} and samples[1].apex is None
    labels = label_matrix(samples, DATASET_AUS["casme2"])
    assert labels[1].sum() == 0  # an all-negative sample
    assert labels[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # '1+2+R4' over (1, 2, 4, 7, 12, 14, 15, 17)


def test_header_found_on_a_later_worksheet(casme2_copy: Path) -> None:
    workbook = openpyxl.load_workbook(casme2_copy / CASME_SHEET)
    readme = workbook.create_sheet("README", 0)
    readme.append(["This workbook lists the clips."])
    workbook.save(casme2_copy / CASME_SHEET)
    assert len(read_dataset("casme2", casme2_copy)) == 4


# ---------------------------------------------------------------- folds


def _sample(dataset: str, subject: str, clip: str, aus: set[int]) -> Sample:
    return Sample(dataset, subject, clip, 1, None, 10, frozenset(aus), tuple(f"/f/{i}.jpg" for i in range(10)))


def test_loso_folds_partition_by_subject(datasets: dict[str, Path]) -> None:
    samples = read_dataset("casme2", datasets["casme2"])
    subjects = loso_subjects(samples)
    assert subjects == ["sub01", "sub02"]
    seen: list[str] = []
    for subject in subjects:
        split = loso_split(samples, subject)
        assert split.aus == DATASET_AUS["casme2"]
        assert {s.subject for s in split.test} == {subject}
        assert subject not in {s.subject for s in split.train}
        assert sorted(s.key for s in split.train + split.test) == sorted(s.key for s in samples)
        seen += [s.key for s in split.test]
    assert sorted(seen) == sorted(s.key for s in samples)  # every clip tested exactly once
    assert loso_split(samples, "sub01", (4, 12)).aus == (4, 12)
    with pytest.raises(UserInputError, match=r"LOSO subject 'sub99' has no samples in casme2; subjects: sub01, sub02"):
        loso_split(samples, "sub99")


def test_loso_subjects_natural_order_and_mixed_datasets() -> None:
    samples = [_sample("4dme", f"S{i}", f"c{i}", {4}) for i in (10, 2, 1, 33, 2)]
    assert loso_subjects(samples) == ["S1", "S2", "S10", "S33"]
    with pytest.raises(UserInputError, match="several datasets"):
        loso_split([*samples, _sample("samm", "006", "x", {4})], "S1")


def test_cross_domain_split_uses_shared_aus() -> None:
    casme = [_sample("casme2", "sub01", "a", {1, 4}), _sample("casme2", "sub02", "b", {12, 14})]
    samm = [_sample("samm", "006", "c", {2, 7}), _sample("samm", "007", "d", {12})]
    split = cross_domain_split(casme, samm)
    assert split.aus == CROSS_DOMAIN_AUS == (2, 4, 7, 12)
    assert split.train == casme and split.test == samm and split.name == "casme2->samm"
    np.testing.assert_array_equal(label_matrix(split.train, split.aus), [[0, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(label_matrix(split.test, split.aus), [[1, 0, 1, 0], [0, 0, 0, 1]])
    assert label_matrix(split.test, split.aus).dtype == np.float32
    with pytest.raises(UserInputError, match="two different datasets"):
        cross_domain_split(casme, casme)
