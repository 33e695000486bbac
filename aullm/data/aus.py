"""Parsing the free-text "Action Units" cells of the coding sheets.

The sheets code AUs as '+'-joined pieces with decorations around the AU number:
laterality prefixes (L, R, B: 'R12'), intensity letters (A-E: '14A'), 4DME's '(k)'
mark ('4(k)'), an 'AU' prefix now and then, and in SAMM a few uncertain codings
written as alternatives ('R12 or 14'). Excel also turns a lone AU into a number cell
(4 or 4.0).

Rule (DESIGN.md §5, and what the authors' released script does): split on '+', and
from each piece keep every AU number it contains. For an 'or' piece that means BOTH
alternatives become labels. We follow the script on purpose: the coder saw movement
consistent with either AU, dropping one would be an arbitrary choice of ours, and
keeping both makes our labels, and therefore our F1, comparable with the published
numbers.
"""

from __future__ import annotations

import re

from aullm.errors import UserInputError

_NUMBER = re.compile(r"\d+")
# Excel sometimes stores a numeric AU as text "4.0"; without this the digits would read "40".
_FLOAT_ARTEFACT = re.compile(r"(?<=\d)\.0+(?!\d)")


def parse_au_string(s: str | int | float | None, *, source: str) -> frozenset[int]:
    """AU numbers coded in one sheet cell: '1+2+R4' -> {1, 2, 4}, 'R14A' -> {14}.

    `source` says where the cell comes from (e.g. "CASME2-coding-20140508.xlsx row 17")
    and is quoted in the error raised for a cell that codes no AU number: an empty cell,
    or a '+'-piece with no digit in it ('none', '?').
    Empty pieces from a stray '+' ('4+', '1++2') are ignored: they carry no information
    and are plain typing slips.
    """
    if isinstance(s, bool):  # bool is an int subclass; True is not AU 1
        raise UserInputError(f"{source}: AU cell {s!r} is not an AU string (expected e.g. '1+2+R4')")
    if isinstance(s, int):
        return frozenset({s})
    if isinstance(s, float):
        if s.is_integer() and s >= 0:
            return frozenset({int(s)})
        raise UserInputError(f"{source}: AU cell {s!r} is not a whole AU number (expected e.g. '1+2+R4')")
    if s is None or not str(s).strip():
        raise UserInputError(f"{source}: AU string is empty (expected AU numbers such as '1+2+R4')")

    text = _FLOAT_ARTEFACT.sub("", str(s))
    aus: set[int] = set()
    for piece in text.split("+"):
        if not piece.strip():
            continue
        numbers = _NUMBER.findall(piece)
        if not numbers:
            where = "" if piece.strip() == str(s).strip() else f" in piece {piece.strip()!r}"
            raise UserInputError(
                f"{source}: AU string {str(s)!r} has no AU number{where} (expected AU numbers such as '1+2+R4')"
            )
        aus.update(int(n) for n in numbers)
    if not aus:
        raise UserInputError(f"{source}: AU string {str(s)!r} has no AU number (expected e.g. '1+2+R4')")
    return frozenset(aus)
