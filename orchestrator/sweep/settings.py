"""A cell's training settings as an identity: a stable hash and a short readable label.

A sweep may train the same (data, LLM, variant, seed) under several settings (grid axes,
`sweep: {lr: [...]}`). What a cell was trained with is its *full resolved* settings (every
training field, the recipe filled in), so that is what the hash covers: two cells with
the same hash were trained identically, and a changed value gives a new cell instead of
overwriting a result. The label names only what differs from the sweep's own `training:`
block, so people can read it; the hash is what makes it unique.

Cells trained under the sweep's `training:` block itself carry no label at all: their ids
are the ids sweeps had before axes existed, so old sweep directories keep their cells.

Pure Python: the spec, the ledger, the job side and the collector all read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

HASH_CHARS = 8
HASH_MARK = "@"  # between the label and the hash: never part of a field name or a shown value
MAX_VALUE_CHARS = 24
MAX_LABEL_CHARS = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def settings_hash(resolved: Mapping[str, Any]) -> str:
    """Stable hash of full resolved settings (key order and float spelling do not matter)."""
    text = json.dumps(dict(resolved), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def show_value(value: Any) -> str:
    """A value as the label writes it: 1e-4 rather than 0.0001, short, file-name safe."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and math.isfinite(value) and (abs(value) < 1e-3 or abs(value) >= 1e6):
            mantissa, exponent = f"{value:.3e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.6g}"
    if value is None:
        return "none"
    text = str(value)
    if "/" in text:  # a DeepSpeed config path: its file name says which
        text = PurePath(text).stem
    text = _UNSAFE.sub("-", text).strip("-") or "~"
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "~"


def differing(a: Mapping[str, Any], b: Mapping[str, Any], order: Sequence[str] = ()) -> list[str]:
    """Fields whose value differs between two resolved settings, in `order` then by name."""
    keys = set(a) | set(b)
    ranked = [k for k in order if k in keys] + sorted(keys - set(order))
    return [k for k in ranked if a.get(k) != b.get(k)]


def label(resolved: Mapping[str, Any], base: Mapping[str, Any], fields: Iterable[str]) -> str:
    """'lr=1e-4,lora_r=8@1a2b3c4d': the `fields` whose value differs from `base`, and the
    hash of the full settings; '' when `resolved` is `base` (the sweep's own settings)."""
    digest = settings_hash(resolved)
    if digest == settings_hash(base):
        return ""
    shown = [f"{k}={show_value(resolved.get(k))}" for k in fields if resolved.get(k) != base.get(k)]
    text = ",".join(shown)
    if len(text) > MAX_LABEL_CHARS:
        text = text[: MAX_LABEL_CHARS - 1] + "~"
    return f"{text}{HASH_MARK}{digest}"


def parse_label(text: str) -> dict[str, str]:
    """{field: shown value} of a label (the hash and a cut-off tail left out)."""
    body = text.split(HASH_MARK, 1)[0]
    out: dict[str, str] = {}
    for part in body.split(","):
        key, sep, value = part.partition("=")
        if sep and not value.endswith("~"):
            out[key] = value
    return out


def swept_fields(table: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """Fields whose value is not the same in every one of these resolved settings."""
    rows = list(table)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return tuple(k for k in keys if len({json.dumps(row.get(k), sort_keys=True) for row in rows}) > 1)
