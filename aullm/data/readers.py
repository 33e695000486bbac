"""Readers for the official on-disk layouts of CASME II, SAMM and 4DME.

Each distribution keeps a coding sheet (xlsx) at the dataset root and the frames in a
subfolder, one folder per clip (DESIGN.md §5):

    casme2  CASME2-coding-*.xlsx   CASME2_RAW_selected/sub{NN}/{Filename}/img{n}.jpg
    samm    SAMM_Micro_FACS_Codes_v2.xlsx (header on row 12 after a title block)
                                   SAMM/{NNN}/{Filename}/{NNN}_{nnnnn}.jpg
    4dme    4DME*.xlsx             4DME/{sub_ID}/{fold_name}/{n}.jpg

The 4DME frame layout is our assumption (we have not seen a copy): pass `frames_dir`
and keep the `{sub_ID}/{fold_name}/` folders if yours differ.

Tolerances, each for a quirk of the real files:
- columns are matched ignoring case, spaces and underscores ('OnsetFrame' = 'Onset Frame');
- the header row is searched for in the first rows of every worksheet, so a title block
  above it (SAMM) or an extra sheet in the workbook (4DME) does not matter;
- frame numbers are the trailing digits of the file stem, so any zero padding works
  ('img46', '006_05562', '0046');
- an apex cell that is '/', empty or negative gives apex None.

Rows whose AUs include none of the dataset's evaluated AUs are kept: they are real
clips whose labels are all negative, and the published protocols count them.

Everything here is cheap (one sheet, one directory listing per clip): the CLI's
`validate` runs it before a sweep is submitted. No torch, no image decoding.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aullm.data.aus import parse_au_string
from aullm.data.samples import Sample
from aullm.errors import UserInputError

FRAME_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_DIGITS = re.compile(r"\d+")
# How far down a worksheet we look for the header row (SAMM's is on row 12).
_HEADER_SEARCH_ROWS = 40

# The roles every layout must provide, in the order error messages list them.
ROLES: tuple[str, ...] = ("subject", "clip", "onset", "apex", "offset", "aus")


def _norm(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower()) if name is not None else ""


def _whole_number(value: Any) -> int | None:
    """An int from an int, an integral float (Excel's 46.0) or a digit string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.0+)?", text):
            return int(float(text))
    return None


def _subject_number(value: Any) -> int | None:
    """1 from 1, 1.0, '01', 'sub01' or '006'."""
    number = _whole_number(value)
    if number is None:
        digits = _DIGITS.findall(str(value))
        number = int(digits[-1]) if digits else None
    return number


def _casme2_subject(value: Any) -> str | None:
    number = _subject_number(value)
    return f"sub{number:02d}" if number is not None else None


def _samm_subject(value: Any) -> str | None:
    number = _subject_number(value)
    return f"{number:03d}" if number is not None else None


def _folder_name(value: Any) -> str:
    """A cell used verbatim as a folder name; only Excel's float artefact (12.0) is undone."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value).strip()


def _plain_subject(value: Any) -> str | None:
    return _folder_name(value) or None


@dataclass(frozen=True)
class Layout:
    """How one dataset distribution is laid out on disk."""

    name: str
    sheet_globs: tuple[str, ...]
    frames_dir: str
    columns: dict[str, str]  # role -> official column name (matched loosely, see _norm)
    subject_folder: Callable[[Any], str | None]  # sheet value -> frame subfolder name
    subject_hint: str  # what a valid subject cell looks like, for error messages


LAYOUTS: dict[str, Layout] = {
    "casme2": Layout(
        name="casme2",
        sheet_globs=("CASME2-coding-*.xlsx",),
        frames_dir="CASME2_RAW_selected",
        columns={
            "subject": "Subject",
            "clip": "Filename",
            "onset": "OnsetFrame",
            "apex": "ApexFrame",
            "offset": "OffsetFrame",
            "aus": "Action Units",
        },
        subject_folder=_casme2_subject,
        subject_hint="a subject number such as 1, '01' or 'sub01'",
    ),
    "samm": Layout(
        name="samm",
        sheet_globs=("SAMM_Micro_FACS_Codes_v2.xlsx", "SAMM_Micro_FACS_Codes*.xlsx"),
        frames_dir="SAMM",
        columns={
            "subject": "Subject",
            "clip": "Filename",
            "onset": "Onset Frame",
            "apex": "Apex Frame",
            "offset": "Offset Frame",
            "aus": "Action Units",
        },
        subject_folder=_samm_subject,
        subject_hint="a subject number such as 6 or '006'",
    ),
    "4dme": Layout(
        name="4dme",
        sheet_globs=("4DME*.xlsx", "*4DME*.xlsx"),
        frames_dir="4DME",
        columns={
            "subject": "sub_ID",
            "clip": "fold_name",
            "onset": "Onset",
            "apex": "Apex",
            "offset": "Offset",
            "aus": "AUs",
        },
        subject_folder=_plain_subject,
        subject_hint="a non-empty sub_ID",
    ),
}


def read_dataset(
    layout: str,
    root: str | os.PathLike[str],
    *,
    sheet: str | os.PathLike[str] | None = None,
    frames_dir: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """All labelled clips of one dataset, in sheet order.

    `sheet` and `frames_dir` override the layout's defaults; relative values are taken
    from `root`, and `sheet` may be a glob. Raises UserInputError (one line, naming the
    path or value) for anything the files get wrong.
    """
    spec = LAYOUTS.get(layout)
    if spec is None:
        raise UserInputError(f"unknown dataset layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UserInputError(f"dataset root {str(root_path)!r} ({layout}) does not exist or is not a folder")
    root_path = root_path.resolve()

    sheet_path = _find_sheet(spec, root_path, sheet)
    frames_root = _frames_root(spec, root_path, frames_dir)
    samples: list[Sample] = []
    seen: dict[tuple[str, str], int] = {}  # (subject, clip) -> sheet row
    for row_number, row in _sheet_rows(spec, sheet_path):
        source = f"{sheet_path.name} row {row_number}"
        samples.append(_row_to_sample(spec, frames_root, row, source, seen, row_number))
    if not samples:
        raise UserInputError(f"{sheet_path}: the coding sheet has a header but no clip rows")
    return samples


# ---------------------------------------------------------------- locating files


def _find_sheet(spec: Layout, root: Path, sheet: str | os.PathLike[str] | None) -> Path:
    if sheet is not None:
        candidate = Path(sheet).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
        if any(c in str(candidate) for c in "*?["):  # a glob such as 'codes-*.xlsx'
            matches = sorted(Path(p) for p in glob.glob(str(candidate)))
            return _one_sheet(matches, str(candidate), root)
        if not candidate.is_file():
            raise UserInputError(f"coding sheet {str(candidate)!r} ({spec.name}) not found")
        return candidate
    for pattern in spec.sheet_globs:
        # Skip Excel's lock files ('~$name.xlsx') which match the same globs.
        matches = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("~$"))
        if matches:
            return _one_sheet(matches, pattern, root)
    raise UserInputError(
        f"no {spec.name} coding sheet matching {' or '.join(repr(g) for g in spec.sheet_globs)} "
        f"in {str(root)!r}; name it with sheet="
    )


def _one_sheet(matches: list[Path], pattern: str, root: Path) -> Path:
    if not matches:
        raise UserInputError(f"no coding sheet matches {pattern!r} (root {str(root)!r})")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise UserInputError(
            f"several coding sheets match {pattern!r} in {str(root)!r} ({names}); name one with sheet="
        )
    return matches[0]


def _frames_root(spec: Layout, root: Path, frames_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(frames_dir).expanduser() if frames_dir is not None else Path(spec.frames_dir)
    if not path.is_absolute():
        path = root / path
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UserInputError(
            f"frames folder {str(path)!r} ({spec.name}) not found; folders in the root: "
            f"{', '.join(present) or 'none'}; name the frames folder with frames_dir="
        )
    return path.resolve()


# ---------------------------------------------------------------- the sheet


def _sheet_rows(spec: Layout, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sheet row number, {role: cell value}) for every non-empty data row."""
    from openpyxl import load_workbook  # local: openpyxl costs ~0.2 s to import

    try:
        workbook = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise UserInputError(f"coding sheet {str(path)!r} is not a readable .xlsx file ({exc})") from exc
    try:
        wanted = {role: _norm(name) for role, name in spec.columns.items()}
        best: tuple[int, str, list[str]] | None = None  # (matches, worksheet title, missing roles)
        for worksheet in workbook.worksheets:
            rows = worksheet.iter_rows(values_only=True)
            for header_number, header in enumerate(rows, start=1):
                if header_number > _HEADER_SEARCH_ROWS:
                    break
                positions = {_norm(cell): i for i, cell in reversed(list(enumerate(header))) if cell is not None}
                found = {role: positions[col] for role, col in wanted.items() if col in positions}
                missing = [role for role in ROLES if role not in found]
                if best is None or len(found) > best[0]:
                    best = (len(found), worksheet.title, missing)
                if missing:
                    continue
                for row_number, row in enumerate(rows, start=header_number + 1):
                    values = {role: (row[i] if i < len(row) else None) for role, i in found.items()}
                    if all(_blank(v) for v in values.values()):
                        continue  # Excel keeps formatted-but-empty rows at the end
                    yield row_number, values
                return
    finally:
        workbook.close()
    if best is None or best[0] == 0:
        raise UserInputError(
            f"coding sheet {str(path)!r}: no header row with the {spec.name} columns "
            f"({', '.join(repr(spec.columns[r]) for r in ROLES)}) in its first {_HEADER_SEARCH_ROWS} rows"
        )
    missing_names = ", ".join(repr(spec.columns[r]) for r in best[2])
    raise UserInputError(f"coding sheet {str(path)!r} (worksheet {best[1]!r}): required column {missing_names} missing")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _frame_cell(value: Any, column: str, source: str) -> int:
    number = _whole_number(value)
    if number is None or number < 0:
        raise UserInputError(f"{source}: column {column!r} has {value!r}, expected a frame number")
    return number


def _apex_cell(value: Any) -> int | None:
    number = _whole_number(value)
    # CASME II writes '/' where the apex was not coded; other copies leave it empty or -1.
    return number if number is not None and number >= 0 else None


def _row_to_sample(
    spec: Layout, frames_root: Path, row: dict[str, Any], source: str, seen: dict[tuple[str, str], int], row_number: int
) -> Sample:
    subject = spec.subject_folder(row["subject"]) if not _blank(row["subject"]) else None
    if subject is None:
        raise UserInputError(
            f"{source}: column {spec.columns['subject']!r} has {row['subject']!r}, expected {spec.subject_hint}"
        )
    clip = _folder_name(row["clip"])
    if not clip:
        raise UserInputError(f"{source}: column {spec.columns['clip']!r} is empty, expected the clip folder name")
    if (subject, clip) in seen:
        raise UserInputError(f"{source}: clip {subject}/{clip} is listed twice (first on row {seen[subject, clip]})")
    seen[subject, clip] = row_number
    onset = _frame_cell(row["onset"], spec.columns["onset"], source)
    offset = _frame_cell(row["offset"], spec.columns["offset"], source)
    if offset < onset:
        raise UserInputError(
            f"{source}: {spec.columns['offset']!r} {offset} is before {spec.columns['onset']!r} {onset}"
        )
    aus = parse_au_string(row["aus"], source=source)
    clip_dir = frames_root / subject / clip
    frame_paths = _clip_frames(clip_dir, onset, offset, source)
    return Sample(
        dataset=spec.name,
        subject=subject,
        clip=clip,
        onset=onset,
        apex=_apex_cell(row["apex"]),
        offset=offset,
        aus=aus,
        frame_paths=frame_paths,
    )


# ---------------------------------------------------------------- frame folders


def _clip_frames(clip_dir: Path, onset: int, offset: int, source: str) -> tuple[str, ...]:
    """Paths of frames onset..offset in the clip folder; every one must be there."""
    try:
        entries = list(os.scandir(clip_dir))
    except FileNotFoundError:
        raise UserInputError(f"{source}: clip folder {str(clip_dir)!r} not found") from None
    except NotADirectoryError:
        raise UserInputError(f"{source}: clip folder {str(clip_dir)!r} is not a folder") from None
    by_number: dict[int, str] = {}
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in FRAME_EXTENSIONS or entry.name.startswith("."):
            continue
        match = _TRAILING_NUMBER.search(stem)
        if match is None:
            continue
        number = int(match.group(1))
        if number in by_number:
            other = os.path.basename(by_number[number])
            raise UserInputError(
                f"clip folder {str(clip_dir)!r}: frames {other!r} and {entry.name!r} both carry frame number {number}"
            )
        by_number[number] = entry.path
    expected = offset - onset + 1
    present = [n for n in range(onset, offset + 1) if n in by_number]
    if len(present) != expected:
        first_missing = next(n for n in range(onset, offset + 1) if n not in by_number)
        raise UserInputError(
            f"clip folder {str(clip_dir)!r}: {source} says frames {onset}..{offset} "
            f"(expected {expected}) but found {len(present)} of them (first missing: frame {first_missing})"
        )
    return tuple(by_number[n] for n in range(onset, offset + 1))
