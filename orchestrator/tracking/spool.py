"""The tracking spool: ``<sweep>/tracking-spool/<cell_id>.jsonl``, where a job appends what it
could not send to MLflow. The file format, written by the job side and replayed by `sync`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.tracking.config import SPOOL_DIR

# --------------------------------------------------------------------------- spool


def _spool_dir(sweep_dir: str | os.PathLike[str]) -> Path:
    return Path(sweep_dir).resolve() / SPOOL_DIR


def _spool_name(cell_id: str) -> str:
    return re.sub(r"[^\w.\-]", "_", cell_id) + ".jsonl"


def _read_spool(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a killed writer leaves at most one torn line; skip it
        if isinstance(rec, dict):
            records.append(rec)
    return records
