"""The sweep directory: the durable record of a sweep (DESIGN.md §3).

    <out>/manifest.json          spec snapshot (paths absolute, profile merged) + cells + the
                                 resolved training settings of each distinct setting
    <out>/sweep.resolved.yaml    the same spec as a sweep file (the file + its --set overrides)
    <out>/results/<cell_id>.json one per finished cell (status done or failed)
    <out>/jobs.json              submissions: job id -> the cells of each array task
    <out>/attempts/<cell_id>     how many times a task started the cell
    <out>/checkpoints/           resumable state of preempted cells
    <out>/running/<cell_id>.json marker: a task is training this cell now
    <out>/logs/                  scheduler output
    <out>/lock                   held by `submit` / `retry` while they change the record
    <out>/index/                 derived, rebuildable caches that let `status` skip parsing:
                                 cells.json (cell ids and groups of the manifest), results.json
                                 (each result file's summary, keyed by its stat), sweep-files.json
                                 (sweep files `status` already validated)

Every file is written atomically (temp file in the same folder, fsync, os.replace), so
a reader sees the old or the new version, never half of one, and a killed writer
leaves no partial file behind. Nothing here imports torch, mlflow or submitit.

The index files are never the truth: each one carries the stat (size, mtime, inode) of
what it summarises and is ignored when that no longer matches, so a stale, missing or
unwritable index costs speed, never correctness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aullm.errors import UserInputError
from orchestrator.sweep.cells import Cell
from orchestrator.sweep.settings import differing

if TYPE_CHECKING:
    from filelock import FileLock

    from orchestrator.sweep.spec import SweepSpec
    from orchestrator.tracking.config import TrackingConfig

MANIFEST_FORMAT = 1
RESULT_STATUSES = ("done", "failed")
# Result files are written with their small top-level fields first, one per line
# (`indent=1`), so status/error/finished_at/timing can be read from the first bytes
# without parsing the predictions: `status` reads a thousand results in a blink.
_SUMMARY_FIRST = ("cell_id", "status", "error", "finished_at", "started_at", "attempt", "host", "timing")
_HEAD_BYTES = 16384
_HEAD_LINE = re.compile(r'^ "[^"]+": ("(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false|null|NaN|-?Infinity),?$')
_HEAD_KEY = re.compile(r'^ "([^"]+)": ')
# What `result_summaries` reports per cell (and the results index keeps): enough for
# status (state, error, retry order) and the cost report (measured cell time).
SUMMARY_FIELDS = ("status", "error", "finished_at", "started_at", "attempt", "cell_seconds")

INDEX_FORMAT = 1

# One FileLock per lock file in this process: filelock is re-entrant per instance,
# so every SweepDir of the same folder shares it (submit holds the lock while
# helpers it calls take it again).
_LOCKS: dict[str, Any] = {}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def dumps_record(payload: Any) -> str:
    """JSON with one top-level key per line and compact values.

    Indenting nested lists would put every probability on its own line (several
    times the size); one line per key keeps files small and lets the summary fields
    at the top be read line by line.
    """
    if not isinstance(payload, dict) or not payload:
        return json.dumps(payload, indent=1) + "\n"
    lines = [f" {json.dumps(str(k))}: {json.dumps(v, separators=(',', ':'))}" for k, v in payload.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _check_cell_id(cell_id: str) -> str:
    # Cell ids become file names: refuse anything that could escape the folder.
    if not cell_id or "/" in cell_id or "\\" in cell_id or cell_id.startswith(".") or "\0" in cell_id:
        raise ValueError(f"not a cell id: {cell_id!r}")
    return cell_id


def write_cache_json(path: Path, payload: Any) -> None:
    """Replace a derived cache file atomically, best effort, without fsync.

    A cache need not survive a crash (readers check it against what it summarises), and
    must never fail the command that refreshes it: an unwritable sweep directory (another
    user's sweep, a read-only mount) only costs the next call the same work again.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file is rewritten (our writes replace it: a new inode)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclasses.dataclass(frozen=True)
class CellIndex:
    """The manifest's cells as `status` needs them: ids and groups, in manifest order."""

    cell_ids: tuple[str, ...]
    groups: tuple[str, ...]  # "dataset/llm/variant", parallel to cell_ids
    resources: dict[str, Any]  # the spec's `resources` (executor, gres, gpus_per_node, ...)


def _cell_index_of(manifest: dict[str, Any]) -> CellIndex:
    cells = manifest["cells"]
    return CellIndex(
        tuple(c["cell_id"] for c in cells),
        tuple(c.get("group", "") for c in cells),
        dict((manifest.get("spec") or {}).get("resources") or {}),
    )


class SweepDir:
    """One sweep directory. Constructing it touches nothing on disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock: FileLock | None = None
        self._manifest: dict[str, Any] | None = None
        self._cell_index: tuple[list[int], CellIndex] | None = None  # (manifest stamp, index)

    def __repr__(self) -> str:
        return f"SweepDir({str(self.path)!r})"

    # ------------------------------------------------------------ layout

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def resolved_sweep_path(self) -> Path:
        return self.path / "sweep.resolved.yaml"

    def cell_settings(self) -> dict[str, dict[str, Any]]:
        """cell_id -> the resolved training settings the manifest says it trains under.

        A manifest from before axes has no `settings` table: every cell was trained under
        its `training` block (with the values of that time for fields it lacks)."""
        from aullm.recipes import recorded

        manifest = self.read_manifest()
        table = manifest.get("settings") or {}
        legacy = recorded((manifest.get("spec") or {}).get("training") or {})
        return {c["cell_id"]: table.get(c.get("settings_hash") or "", legacy) for c in manifest["cells"]}

    @property
    def results_dir(self) -> Path:
        return self.path / "results"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def jobs_path(self) -> Path:
        return self.path / "jobs.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def attempts_dir(self) -> Path:
        return self.path / "attempts"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def running_dir(self) -> Path:
        return self.path / "running"

    def result_path(self, cell_id: str) -> Path:
        return self.results_dir / f"{_check_cell_id(cell_id)}.json"

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.checkpoints_dir / f"{_check_cell_id(cell_id)}.pt"

    def exists(self) -> bool:
        """Has this sweep been submitted (is there a manifest)?"""
        return self.manifest_path.is_file()

    has_manifest = exists

    def create(self) -> None:
        for folder in (self.path, self.results_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ manifest

    def write_manifest(
        self, spec: SweepSpec | dict[str, Any], cells: Iterable[Cell], *, sweep_file: str | None = None
    ) -> dict[str, Any]:
        """Write (or rewrite) the manifest; keeps the first `created` time."""
        snapshot = spec if isinstance(spec, dict) else spec.snapshot()
        cells = list(cells)
        created = now_iso()
        if self.manifest_path.is_file():
            with contextlib.suppress(UserInputError):
                created = self.read_manifest().get("created", created)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": snapshot.get("name"),
            "created": created,
            "updated": now_iso(),
            "sweep_file": sweep_file,
            "spec": snapshot,
            "cells": [c.to_dict() for c in cells],
        }
        if not isinstance(spec, dict):
            # What each cell trains under, once per distinct setting (cells name it by hash):
            # the task reads its cell's row, never the spec's `training` alone.
            used = {c.settings_hash for c in cells}
            manifest["settings"] = {h: s for h, s in spec.settings_table().items() if h in used}
            manifest["overrides"] = spec.overrides
        self.create()
        atomic_write_json(self.manifest_path, manifest)
        if not isinstance(spec, dict):
            # The sweep as resolved (file + --set, paths absolute): `submit`, `retry` and
            # `collect` can be given this file, and no flag has to be repeated.
            import yaml

            atomic_write_text(self.resolved_sweep_path, yaml.safe_dump(snapshot, sort_keys=False, allow_unicode=True))
        self._manifest = manifest
        self._write_cell_index(manifest)
        return manifest

    def read_manifest(self) -> dict[str, Any]:
        """The manifest as stored: {format, name, created, updated, sweep_file, spec, cells}."""
        if self._manifest is None:
            if not self.manifest_path.is_file():
                raise UserInputError(
                    f"{self.path}: not a sweep directory (no manifest.json); `aullm-grid submit SWEEP` creates it"
                )
            try:
                manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserInputError(f"{self.manifest_path}: unreadable manifest ({exc})") from None
            if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
                raise UserInputError(
                    f"{self.manifest_path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else '?'} "
                    f"is not {MANIFEST_FORMAT}"
                )
            self._manifest = manifest
        return self._manifest

    def spec(self) -> SweepSpec:
        """The spec snapshot, as a SweepSpec."""
        from orchestrator.sweep.spec import SweepSpec

        return SweepSpec.from_snapshot(self.read_manifest()["spec"], source=str(self.manifest_path))

    def cells(self) -> list[Cell]:
        return [Cell.from_dict(c) for c in self.read_manifest()["cells"]]

    def cell(self, cell_id: str) -> Cell:
        for record in self.read_manifest()["cells"]:
            if record.get("cell_id") == cell_id:
                return Cell.from_dict(record)
        raise UserInputError(f"{self.path}: no cell {cell_id!r} in the manifest")

    def dataset_config(self, name: str) -> dict[str, Any]:
        """A dataset's entry of the spec snapshot (layout, root, sheet, frames_dir, folds)."""
        datasets = self.read_manifest()["spec"]["datasets"]
        if name not in datasets:
            raise UserInputError(f"{self.path}: no dataset {name!r} in the manifest")
        return dict(datasets[name])

    @property
    def cache_dir(self) -> Path:
        value = self.read_manifest()["spec"].get("cache_dir")
        return Path(value) if value else self.path / "cache"

    def tracking_config(self) -> TrackingConfig:
        """The sweep's MLflow settings (`uri` None = the embedded store in this directory)."""
        from orchestrator.tracking.config import TrackingConfig  # imports no mlflow

        spec = self.read_manifest()["spec"]
        values = dict(spec.get("tracking") or {})
        values["experiment"] = values.get("experiment") or spec.get("name")
        known = {f.name for f in dataclasses.fields(TrackingConfig)}
        return TrackingConfig(**{k: v for k, v in values.items() if k in known and v is not None})

    # ------------------------------------------------------------ index (derived caches)

    @property
    def index_dir(self) -> Path:
        return self.path / "index"

    def cell_index(self, *, update_index: bool = False) -> CellIndex:
        """Cell ids, groups and task resources of the manifest, without parsing the manifest.

        Read from index/cells.json when it was written for the manifest as it is now (same
        size, mtime and inode); otherwise built from the manifest, and with `update_index`
        stored for next time (`write_manifest` stores it too). A 10,000-cell manifest takes
        ~0.1 s to parse; the index ~0.01 s.
        """
        try:
            stamp = _stamp(self.manifest_path.stat())
        except FileNotFoundError:
            self.read_manifest()  # raises the usual "not a sweep directory" error
            raise
        if self._cell_index is not None and self._cell_index[0] == stamp:
            return self._cell_index[1]
        index: CellIndex | None = None
        try:
            data = json.loads((self.index_dir / "cells.json").read_text(encoding="utf-8"))
            if data.get("format") == INDEX_FORMAT and data.get("manifest") == stamp:
                ids, groups = data["cell_ids"], data["groups"]
                if len(ids) == len(groups):
                    index = CellIndex(tuple(ids), tuple(groups), dict(data.get("resources") or {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # missing, stale or torn: rebuild it from the manifest
        if index is None:
            # Stamped before reading: if the manifest is replaced meanwhile, the stored
            # index carries the older stamp and the next call rebuilds it.
            index = _cell_index_of(self.read_manifest())
            if update_index:
                self._store_cell_index(index, stamp)
        self._cell_index = (stamp, index)
        return index

    def _write_cell_index(self, manifest: dict[str, Any]) -> None:
        try:
            stamp = _stamp(self.manifest_path.stat())
        except OSError:
            return
        self._store_cell_index(_cell_index_of(manifest), stamp)

    def _store_cell_index(self, index: CellIndex, stamp: list[int]) -> None:
        payload = {"format": INDEX_FORMAT, "manifest": stamp, "cell_ids": list(index.cell_ids),
                   "groups": list(index.groups), "resources": index.resources}  # fmt: skip
        write_cache_json(self.index_dir / "cells.json", payload)

    # ------------------------------------------------------------ results

    def write_result(self, cell_id: str, payload: dict[str, Any]) -> Path:
        """Store one cell's result atomically; clears the cell's running marker.

        `payload['status']` is done or failed. Payload schema (the collector reads it):
        {cell_id, status, metrics?, predictions: {sample_keys, subjects, probs, labels,
        aus}, epoch_losses, timing, host, slurm: {job_id, array_job_id, array_task_id},
        error?}.
        """
        if payload.get("cell_id", cell_id) != cell_id:
            raise ValueError(f"payload is for {payload.get('cell_id')!r}, not {cell_id!r}")
        status = payload.get("status")
        if status not in RESULT_STATUSES:
            raise ValueError(f"result status must be one of {RESULT_STATUSES}, got {status!r}")
        ordered: dict[str, Any] = {"cell_id": cell_id}
        ordered.update((k, payload[k]) for k in _SUMMARY_FIRST if k in payload and k != "cell_id")
        ordered.update((k, v) for k, v in payload.items() if k not in ordered)
        path = self.result_path(cell_id)
        atomic_write_text(path, dumps_record(ordered))
        self.clear_running(cell_id)
        self.clear_progress(cell_id)
        return path

    def result_exists(self, cell_id: str, status: str | None = None) -> bool:
        """Is there a result file (with this status, if given)?"""
        path = self.result_path(cell_id)
        if not path.is_file():
            return False
        return status is None or self._summary_of(path).get("status") == status

    def read_result(self, cell_id: str) -> dict[str, Any]:
        path = self.result_path(cell_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserInputError(f"{path}: no result for cell {cell_id!r}") from None
        except ValueError as exc:
            raise UserInputError(f"{path}: not a valid result file ({exc})") from None

    def read_result_fields(self, cell_id: str, fields: Collection[str]) -> dict[str, Any]:
        """The given top-level fields of a result (those it has), for readers of many results.

        A file from `write_result` holds one top-level key per line, so only the wanted
        lines are parsed: the collector skips the epoch losses and tracebacks, most of a
        file's bytes. A file written some other way is parsed whole. Errors as `read_result`.
        """
        path = os.path.join(self.results_dir, f"{_check_cell_id(cell_id)}.json")  # no Path: 10,000 calls
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise UserInputError(f"{path}: no result for cell {cell_id!r}") from None
        if text.startswith("{\n") and text.endswith("\n}\n"):
            # JSON escapes the newlines inside strings, so a newline followed by one space
            # and a quoted key starts a top-level entry, and the entry ends at the next one.
            picked = []
            for name in fields:
                start = text.find(f"\n {json.dumps(name)}: ")
                if start >= 0:
                    line = text[start + 1 : text.index("\n", start + 1)]
                    picked.append(line[:-1] if line.endswith(",") else line)
            with contextlib.suppress(ValueError):  # an entry spread over lines: parse it all
                return json.loads("{" + ",".join(picked) + "}")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserInputError(f"{path}: not a valid result file ({exc})") from None
        if not isinstance(data, dict):
            raise UserInputError(f"{path}: not a valid result file (not a JSON object)")
        return {k: v for k, v in data.items() if k in fields}

    def result_ids(self) -> set[str]:
        """Cell ids that have a result file (whatever is in it): one directory listing."""
        if not self.results_dir.is_dir():
            return set()
        return {n[: -len(".json")] for n in os.listdir(self.results_dir) if n.endswith(".json") and not n.startswith(".")}

    def result_status(self, cell_id: str) -> str | None:
        """The status a result file's first bytes declare (None: no file, or no status there)."""
        status = self._summary_of(self.result_path(cell_id)).get("status")
        return status if isinstance(status, str) else None

    @staticmethod
    def _summary_of(path: Path) -> dict[str, Any]:
        """The top-level fields that lead the file (at least cell_id and status).

        Files from `write_result` start with the small summary fields one per line: they
        are joined and parsed with one `json.loads`, the predictions are never read.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return {}
        try:
            head = os.read(fd, _HEAD_BYTES).decode("utf-8", errors="replace")
        finally:
            os.close(fd)
        summary: dict[str, Any] = {}
        if head.startswith("{\n"):
            lines = head.split("\n")[1:-1]  # the last line may be cut off by the read limit
            picked = []
            for line in lines:
                key = _HEAD_KEY.match(line)
                if key is None or (key.group(1) not in _SUMMARY_FIRST and not _HEAD_LINE.match(line)):
                    break
                picked.append(line[:-1] if line.endswith(",") else line)
            try:
                summary = json.loads("{" + ",".join(picked) + "}")
            except ValueError:  # an odd line (hand-edited file): take the good ones one by one
                summary = {}
                for line in picked:
                    try:
                        summary.update(json.loads("{" + line + "}"))
                    except ValueError:
                        break
        if "status" in summary:
            return summary
        try:  # written some other way: parse all of it
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if not isinstance(v, (dict, list)) or k == "timing"}

    @staticmethod
    def _compact(summary: dict[str, Any]) -> dict[str, Any]:
        """The SUMMARY_FIELDS of a file's summary; `cell_seconds` comes from its timing."""
        out = {k: summary[k] for k in SUMMARY_FIELDS[:-1] if k in summary}
        timing = summary.get("timing")
        if isinstance(timing, dict) and isinstance(timing.get("cell_seconds"), (int, float)):
            out["cell_seconds"] = timing["cell_seconds"]
        return out

    def result_summaries(self, *, update_index: bool = False) -> dict[str, dict[str, Any]]:
        """cell_id -> {status, error?, finished_at?, started_at?, attempt?, cell_seconds?} of
        every result file, cheaply.

        One directory listing and one stat per file; a file is read (its first bytes) only
        when index/results.json has no summary for it at its current size, mtime and inode.
        With `update_index` (what `status` asks for) the refreshed index is stored back,
        best effort: a read-only sweep directory only means every call reads every file.
        Without it nothing is written (`submit --dry-run` writes nothing).
        """
        found: dict[str, dict[str, Any]] = {}
        if not self.results_dir.is_dir():
            return found
        index_path = self.index_dir / "results.json"
        cached: dict[str, list[Any]] = {}
        try:
            data = json.loads(index_path.read_text(encoding="utf-8"))
            if data.get("format") == INDEX_FORMAT and isinstance(data.get("files"), dict):
                cached = data["files"]
        except (OSError, ValueError, AttributeError):
            pass
        current: dict[str, list[Any]] = {}
        changed = False
        for entry in os.scandir(self.results_dir):
            name = entry.name
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                stamp = _stamp(entry.stat())
            except FileNotFoundError:
                continue  # removed while we listed it
            hit = cached.get(name)
            if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp and isinstance(hit[1], dict):
                summary = hit[1]
            else:
                # Read after the stat: if the file is replaced in between, the index holds
                # the newer summary under the older stamp, and the next call re-reads it.
                summary = self._compact(self._summary_of(Path(entry.path)))
                changed = True
            current[name] = [stamp, summary]
            if summary.get("status") in RESULT_STATUSES:
                found[name[: -len(".json")]] = summary
        if update_index and (changed or len(current) != len(cached)):
            write_cache_json(index_path, {"format": INDEX_FORMAT, "files": current})
        return found

    def statuses(self) -> dict[str, str]:
        """cell_id -> done | failed, for every result file."""
        return {cid: s["status"] for cid, s in self.result_summaries().items()}

    def done_cell_ids(self) -> set[str]:
        return {cid for cid, status in self.statuses().items() if status == "done"}

    def failed_cell_ids(self) -> set[str]:
        return {cid for cid, status in self.statuses().items() if status == "failed"}

    # ------------------------------------------------------------ running markers

    def mark_running(self, cell_id: str, info: dict[str, Any] | None = None) -> None:
        """Note that a task has started training the cell (cleared by write_result)."""
        atomic_write_json(self.running_dir / f"{_check_cell_id(cell_id)}.json", {"started_at": now_iso(), **(info or {})})

    def clear_running(self, cell_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.running_dir / f"{_check_cell_id(cell_id)}.json").unlink()

    def running_markers(self) -> dict[str, dict[str, Any]]:
        """cell_id -> marker of cells a task is training now (or was, if it was killed)."""
        found: dict[str, dict[str, Any]] = {}
        if not self.running_dir.is_dir():
            return found
        for entry in os.scandir(self.running_dir):
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                found[entry.name[: -len(".json")]] = json.loads(Path(entry.path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # removed or replaced while we listed it
        return found

    @property
    def superseded_dir(self) -> Path:
        return self.path / "superseded"

    def supersede_result(self, cell_id: str) -> Path | None:
        """Move the cell's result aside (superseded/<cell>.<n>.json) so the cell can run
        again as a new attempt without overwriting it; returns where it went."""
        src = self.result_path(cell_id)
        if not src.is_file():
            return None
        self.superseded_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while (dst := self.superseded_dir / f"{cell_id}.{n}.json").exists():
            n += 1
        os.replace(src, dst)
        self.reset_attempts([cell_id])
        return dst

    # ------------------------------------------------------------ progress

    @property
    def progress_dir(self) -> Path:
        return self.path / "progress"

    def progress_path(self, cell_id: str) -> Path:
        return self.progress_dir / f"{_check_cell_id(cell_id)}.json"

    def write_progress(self, cell_id: str, payload: dict[str, Any]) -> None:
        """Replace the cell's progress file (epoch, epochs, elapsed): atomic, no fsync, never
        raises. It is a hint for `status`, rewritten every few seconds; the result file is
        the record."""
        write_cache_json(self.progress_path(cell_id), payload)

    def clear_progress(self, cell_id: str) -> None:
        with contextlib.suppress(OSError):
            self.progress_path(cell_id).unlink()

    def read_progress(self, cell_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """cell_id -> progress of those of `cell_ids` that have a readable progress file."""
        found: dict[str, dict[str, Any]] = {}
        for cell_id in cell_ids:
            try:
                data = json.loads(self.progress_path(cell_id).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                found[cell_id] = data
        return found

    # ------------------------------------------------------------ attempts

    def attempts(self, cell_id: str) -> int:
        try:
            return int((self.attempts_dir / _check_cell_id(cell_id)).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def bump_attempts(self, cell_id: str) -> int:
        """Count one more start of the cell; returns the new count."""
        count = self.attempts(cell_id) + 1
        atomic_write_text(self.attempts_dir / _check_cell_id(cell_id), f"{count}\n")
        return count

    def reset_attempts(self, cell_ids: Iterable[str]) -> None:
        for cell_id in cell_ids:
            with contextlib.suppress(FileNotFoundError):
                (self.attempts_dir / _check_cell_id(cell_id)).unlink()

    # ------------------------------------------------------------ submissions

    def submissions(self) -> list[dict[str, Any]]:
        """Every submission recorded, oldest first."""
        try:
            records = json.loads(self.jobs_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise UserInputError(f"{self.jobs_path}: unreadable submission record ({exc})") from None
        if not isinstance(records, list):
            raise UserInputError(f"{self.jobs_path}: expected a list of submissions")
        return records

    def record_submission(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one submission record (job ids -> cells; the submitter's schema).

        Read-append-replace under the sweep lock, so concurrent submitters cannot
        lose each other's records; `recorded_at` is added.
        """
        entry = {**record, "recorded_at": now_iso()}
        with self.lock():
            records = self.submissions()
            records.append(entry)
            atomic_write_json(self.jobs_path, records)
        return entry

    # ------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        """Exclusive hold on the sweep directory (re-entrant within one SweepDir)."""
        from filelock import FileLock, Timeout

        if self._lock is None:
            self.path.mkdir(parents=True, exist_ok=True)
            key = str(self.lock_path.resolve())
            if key not in _LOCKS:
                _LOCKS[key] = FileLock(key)
            self._lock = _LOCKS[key]
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise UserInputError(
                f"{self.lock_path}: another aullm-grid command holds this sweep; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            self._lock.release()


def check_settings(spec: SweepSpec, sweep: SweepDir, cells: Sequence[Cell]) -> None:
    """Refuse a sweep file whose cells would land on results trained under other settings.

    A cell's id names its settings (orchestrator/sweep/settings.py) except for the sweep's
    own `training`, whose cells keep the ids they had before axes existed: so a cell id that
    the sweep directory already knows (in its manifest, or as a result file left by an
    earlier manifest) must stand for the same resolved settings, field for field. One check
    for validate, submit, retry and collect."""
    if not sweep.exists():
        return

    recorded = sweep.cell_settings()
    table = spec.settings_table()
    stray = sweep.result_ids() - set(recorded)
    for cell in cells:
        new = table[cell.settings_hash]
        if cell.cell_id in recorded:
            old = recorded[cell.cell_id]
        elif cell.cell_id in stray:
            digest = sweep.read_result_fields(cell.cell_id, ("settings_hash",)).get("settings_hash")
            if digest in (None, cell.settings_hash):
                continue  # results from before settings were recorded: the manifest check covers them
            old = {"settings_hash": digest}
            new = {"settings_hash": cell.settings_hash}
        else:
            continue
        changed = [k for k in differing(old, new, tuple(new)) if k in new]
        if changed:
            key = changed[0]
            loc = ("training", key) if not cell.settings else ("grid",)
            raise spec.field_error(
                loc,
                f"{new.get(key)!r} differs from {old.get(key)!r} that cell {cell.cell_id} was trained with in "
                f"{sweep.path}; results would mix: keep the old value and add the new one as an axis "
                f"(sweep: {{{key}: [...]}}), or use a new output_dir",
            )
