"""Collect finished cells into groups, score them, and write the paper's tables.

A *group* is everything one table entry stands on: (dataset or cross-domain pair, LLM,
variant), over all of its LOSO folds and seeds. F1 is a property of a group, never of
a cell (docs/architecture.md): the fold predictions of one seed are pooled, scored under
every protocol of `aullm.metrics`, and the per-seed scores give mean and std.

A group is scored only when every one of its cells (every fold of every seed) has a
result with status "done". Otherwise it is *incomplete* and its missing or failed folds
are named: averaging over fewer folds would quietly change the test set (DESIGN.md §6).

The core, `collect_groups`, is a pure function of the cell descriptors (manifest
entries) and the result payloads, so tests feed it directly; `collect_sweep` reads a
sweep directory, writes tables and plots atomically, prints them, and updates MLflow.
Nothing here imports torch; mlflow and matplotlib are imported only where used.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aullm.errors import UserInputError
from aullm.metrics import (
    HEADLINE_PROTOCOL,
    PROTOCOLS,
    ScoreRow,
    mean_std_over_seeds,
    per_subject_micro_f1,
    score_predictions,
)
from orchestrator.ledger import RESULT_STATUSES
from orchestrator.results.types import CellRef, GroupKey, GroupResult, MissingCell, ProtocolSummary, Stat
from orchestrator.sweep.settings import swept_fields

__all__ = [
    "CollectReport",
    "collect_groups",
    "collect_job",
    "collect_main",
    "collect_sweep",
    "write_outputs",
    "RESULTS_DIRNAME",
]

RESULTS_DIRNAME = "results_tables"
# Written into the output folder: the list of files this collector produced, so a later
# run can remove its own stale files without touching anything else a user put there.
INDEX_FILE = "index.json"


class _Invalid(Exception):
    """A result that cannot be pooled (shape, AU list, duplicate sample)."""


def _pct(x: float) -> float:
    return 100.0 * float(x)


def _summarise(rows: Sequence[ScoreRow]) -> ProtocolSummary:
    mean, std = mean_std_over_seeds(rows)
    n = len(rows)
    return ProtocolSummary(
        per_au={au: Stat(_pct(mean.per_au[au]), _pct(std.per_au[au]), n) for au in mean.per_au},
        average=Stat(_pct(mean.average), _pct(std.average), n),
    )


def _pool_seed(cells: Sequence[CellRef], results: Mapping[str, Mapping[str, Any]]) -> tuple[
    tuple[int, ...], np.ndarray, np.ndarray, list[str], list[str]
]:
    """Concatenate the predictions of one seed's folds: (aus, probs, labels, fold_ids, subjects)."""
    aus: tuple[int, ...] | None = None
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    folds: list[str] = []
    subjects: list[str] = []
    seen_keys: dict[str, str] = {}
    for cell in cells:
        pred = results[cell.cell_id].get("predictions")
        if not isinstance(pred, Mapping):
            raise _Invalid(f"result {cell.cell_id}: no predictions")
        try:
            cell_aus = tuple(int(a) for a in pred["aus"])
            p = np.asarray(pred["probs"], dtype=np.float64)
            y = np.asarray(pred["labels"])
            keys = [str(k) for k in pred.get("sample_keys") or []]
            subs = [str(s) for s in pred.get("subjects") or []]
        except (KeyError, TypeError, ValueError) as exc:
            raise _Invalid(f"result {cell.cell_id}: unreadable predictions ({exc})") from None
        if aus is None:
            aus = cell_aus
        elif cell_aus != aus:
            raise _Invalid(f"result {cell.cell_id}: AUs {list(cell_aus)} differ from the group's {list(aus)}")
        n = p.shape[0] if p.ndim == 2 else -1
        if p.ndim != 2 or p.shape[1] != len(aus) or y.shape != p.shape:
            raise _Invalid(
                f"result {cell.cell_id}: probs {p.shape} and labels {y.shape} must both be (N, {len(aus)})"
            )
        if len(keys) != n or (subs and len(subs) != n):
            raise _Invalid(f"result {cell.cell_id}: {len(keys)} sample_keys / {len(subs)} subjects for {n} predictions")
        for k in keys:
            # LOSO folds test disjoint subjects: a sample scored twice means a broken split
            # or a stale result, and would weigh that clip double.
            if k in seen_keys:
                raise _Invalid(f"sample {k} is predicted by both {seen_keys[k]} and {cell.cell_id}")
            seen_keys[k] = cell.cell_id
        probs.append(p)
        labels.append(y)
        folds.extend([cell.fold] * n)
        subjects.extend(subs or [k.split("/")[1] if k.count("/") >= 2 else cell.fold for k in keys])
    assert aus is not None
    return aus, np.concatenate(probs), np.concatenate(labels), folds, subjects


def _score_group(group: GroupResult, cells: Sequence[CellRef], results: Mapping[str, Mapping[str, Any]]) -> None:
    by_seed: dict[int, list[CellRef]] = defaultdict(list)
    for c in cells:
        by_seed[c.seed].append(c)
    subject_scores: dict[str, list[float]] = defaultdict(list)
    aus_all: tuple[int, ...] | None = None
    n_samples = 0
    for seed in sorted(by_seed):
        seed_cells = sorted(by_seed[seed], key=lambda c: c.fold)
        aus, p, y, folds, subjects = _pool_seed(seed_cells, results)
        if aus_all is None:
            aus_all = aus
        elif aus != aus_all:
            raise _Invalid(f"seed {seed} scores AUs {list(aus)}, another seed {list(aus_all)}")
        try:
            group.per_seed[seed] = score_predictions(p, y, aus, folds)
        except ValueError as exc:
            raise _Invalid(f"seed {seed}: {exc}") from None
        n_samples = max(n_samples, p.shape[0])
        for s, f1 in per_subject_micro_f1(p, y, subjects).items():
            if f1 is not None:
                subject_scores[s].append(_pct(f1))
    group.aus = aus_all or ()
    group.n_samples = n_samples
    seeds = sorted(group.per_seed)
    group.summary = {proto: _summarise([group.per_seed[s][proto] for s in seeds]) for proto in PROTOCOLS}
    group.per_subject = {s: float(np.mean(v)) for s, v in subject_scores.items()}


def collect_groups(
    cells: Iterable[Any],
    results: Mapping[str, Mapping[str, Any] | None],
    *,
    layouts: Mapping[str, str] | None = None,
    recipe: str = "paper",
    differs_from_script: Sequence[str] = (),
    synthetic_datasets: Collection[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[GroupResult]:
    """Group the manifest's cells, check each group is whole, and score the whole ones.

    `cells`: manifest entries (mappings) or `Cell` objects; `results`: cell_id -> result
    payload (``status``, ``predictions``: sample_keys, subjects, aus, probs, labels), missing
    or None for cells without a result file. `layouts`: dataset name -> layout
    (``casme2``/``samm``/``4dme``) for sweeps that name their datasets differently; by
    default a dataset's name is its layout. `recipe` and `differs_from_script` say how the
    cells were trained (the manifest's resolved training settings), `synthetic_datasets`
    which datasets are synthetic copies. Groups come back sorted by key.
    """
    layouts = dict(layouts or {})
    refs = [CellRef.from_any(c) for c in cells]
    ids = [r.cell_id for r in refs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserInputError(f"manifest: cell id {dup} appears twice")
    grouped: dict[GroupKey, list[CellRef]] = defaultdict(list)
    for r in refs:
        grouped[r.group_key].append(r)

    out: list[GroupResult] = []
    for key in sorted(grouped):
        members = sorted(grouped[key], key=lambda c: (c.seed, c.fold))
        first = members[0]
        if key.kind == "loso":
            layout, train_layout = layouts.get(first.dataset or "", first.dataset or ""), None
        else:
            layout = layouts.get(first.test_dataset or "", first.test_dataset or "")
            train_layout = layouts.get(first.train_dataset or "", first.train_dataset or "")
        group = GroupResult(
            key=key,
            layout=layout,
            train_layout=train_layout,
            cell_ids=tuple(c.cell_id for c in members),
            seeds=tuple(sorted({c.seed for c in members})),
            folds=tuple(sorted({c.fold for c in members})),
            status="incomplete",
            recipe=recipe,
            differs_from_script=tuple(differs_from_script),
            synthetic=any(d in synthetic_datasets for d in (first.dataset, first.train_dataset, first.test_dataset) if d),
        )
        if settings is not None and first.settings_hash in settings:
            # each setting says its own recipe: one sweep may train both
            from aullm.recipes import differs_from

            group.settings = dict(settings[first.settings_hash])
            group.recipe = str(group.settings.get("recipe", recipe))
            group.differs_from_script = differs_from(group.settings, "script")
            group.swept = swept_fields(settings.values())
        for c in members:
            res = results.get(c.cell_id)
            if res is None:
                group.missing.append(MissingCell(c.seed, c.fold, c.cell_id, "no result"))
            elif res.get("status") == "done" and c.settings_hash and res.get("settings_hash", c.settings_hash) != c.settings_hash:
                # never pool a fold trained under other settings than the manifest's for it
                group.missing.append(MissingCell(c.seed, c.fold, c.cell_id,
                                                 f"other settings: trained under {res.get('settings_hash')}, "
                                                 f"the manifest says {c.settings_hash}"))
            elif res.get("status") != "done":
                err = " ".join(str(res.get("error") or res.get("status") or "unknown").split())[:200]
                group.missing.append(MissingCell(c.seed, c.fold, c.cell_id, f"failed: {err}"))
        if not group.missing:
            try:
                _score_group(group, members, results)  # type: ignore[arg-type]
                group.status = "complete"
            except _Invalid as exc:
                group.status = "invalid"
                group.problem = str(exc)
                group.per_seed.clear()
        out.append(group)
    return out


# --------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# (plot jobs, folder) for forked plot workers: set before the pool forks, read by _plot_job
_PLOT_JOBS: tuple[list[tuple[list[GroupResult], list[Any]]], Path] | None = None
# Most worker processes for the figures (each imports matplotlib, ~0.5 s).
MAX_PLOT_WORKERS = 8


def _plot_job(index: int) -> list[str]:
    from orchestrator.results import plots as plt_mod

    assert _PLOT_JOBS is not None, "plot workers are forked after _PLOT_JOBS is set"
    jobs, folder = _PLOT_JOBS
    groups, tables = jobs[index]
    return [p.name for p in plt_mod.write_plots(groups, tables, folder)]


class _Plotter:
    """The figures of a collect, drawn in forked worker processes while the caller goes on.

    Matplotlib takes most of a large collect (7 s of 15 on a 10,000-cell sweep, 2 CPUs),
    and each figure is independent: `plots.write_plots` of one table, or of one dataset's
    groups, draws exactly the files the whole call would. With one CPU, or where fork is
    not available, they are drawn in this process when `wait` is called."""

    def __init__(self, groups: Sequence[GroupResult], tables: Sequence[Any], folder: Path) -> None:
        global _PLOT_JOBS
        self.groups, self.tables, self.folder = list(groups), list(tables), folder
        datasets = sorted({g.key.data for g in self.groups})
        jobs = [([], [t]) for t in self.tables] + [([g for g in self.groups if g.key.data == d], []) for d in datasets]
        workers = min(len(jobs), os.cpu_count() or 1, MAX_PLOT_WORKERS)
        self.pool: Any = None
        self.futures: list[Any] = []
        if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return
        from concurrent.futures import ProcessPoolExecutor

        _PLOT_JOBS = (jobs, folder)  # fork copies it into the workers: nothing is pickled
        # A forked worker flushes the stdio buffers it inherited when it exits: empty them
        # first, or text printed before the fork would appear twice.
        sys.stdout.flush()
        sys.stderr.flush()
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        self.futures = [self.pool.submit(_plot_job, i) for i in range(len(jobs))]

    def wait(self) -> list[str]:
        """The names of the PNGs written (a worker's exception is raised here)."""
        global _PLOT_JOBS
        if self.pool is None:
            from orchestrator.results import plots as plt_mod

            return [p.name for p in plt_mod.write_plots(self.groups, self.tables, self.folder)]
        try:
            return [name for f in self.futures for name in f.result()]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            _PLOT_JOBS = None


def write_outputs(
    groups: Sequence[GroupResult],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "",
    plots: bool = True,
    tables: Sequence[Any] | None = None,
    while_plotting: Callable[[], None] | None = None,
) -> list[Path]:
    """Write every table (Markdown, CSV, LaTeX), groups.csv, summary.json and the plots
    into `out_dir`. Files are first written to a temp folder beside it and then moved in
    one `os.replace` each, so a reader (or MLflow upload) never sees half a file; files a
    previous collect wrote and this one does not are removed. Returns the written paths.

    `while_plotting` is called once, after the tables are written and while the figures
    are being drawn (in worker processes where there are several CPUs)."""
    from orchestrator.results import settings_table as stbl
    from orchestrator.results import tables as tbl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_settings = stbl.settings_rows(groups)
    built = list(tables) if tables is not None else tbl.build_tables(groups, tbl.load_paper_tables())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    plotter: _Plotter | None = None
    try:
        plotter = _Plotter(groups, built, tmp) if plots else None
        names: list[str] = []
        for t in built:
            for ext, text in (("md", tbl.to_markdown(t)), ("csv", tbl.to_csv(t)), ("tex", tbl.to_latex(t))):
                _write_text(tmp / f"{t.key}.{ext}", text)
                names.append(f"{t.key}.{ext}")
        _write_text(tmp / "tables.md", tbl.document_markdown(built, groups, title=title) + stbl.to_markdown(by_settings))
        _write_text(tmp / "groups.csv", tbl.groups_csv(groups))
        if by_settings:
            _write_text(tmp / "settings.md", stbl.to_markdown(by_settings, level=1))
            _write_text(tmp / "settings.csv", stbl.to_csv(by_settings))
            names += ["settings.md", "settings.csv"]
        summary = {
            "title": title,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "headline_protocol": HEADLINE_PROTOCOL,
            "units": "F1 in percent; std over seeds with ddof=1 (0 for one seed)",
            "groups": [g.to_json() for g in groups],
        }
        _write_text(tmp / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
        names += ["tables.md", "groups.csv", "summary.json"]
        if while_plotting is not None:
            while_plotting()
        if plotter is not None:
            names += plotter.wait()
            plotter = None
            from orchestrator.results.plots import write_settings_plots

            names += [p.name for p in write_settings_plots(by_settings, tmp)]
        _write_text(tmp / INDEX_FILE, json.dumps({"files": sorted(names)}, indent=2) + "\n")

        previous: list[str] = []
        try:
            previous = list(json.loads((out / INDEX_FILE).read_text()).get("files", []))
        except (OSError, ValueError, AttributeError):
            pass
        for name in names + [INDEX_FILE]:
            os.replace(tmp / name, out / name)
        for stale in set(previous) - set(names):
            if "/" not in stale and not stale.startswith("."):
                (out / stale).unlink(missing_ok=True)
    finally:
        if plotter is not None:  # an error above: let the workers end before removing their folder
            with contextlib.suppress(Exception):
                plotter.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in sorted(names)]


# --------------------------------------------------------------------------- sweep wrapper


@dataclass
class CollectReport:
    sweep_dir: Path
    out_dir: Path
    groups: list[GroupResult]
    files: list[Path]
    tracking: str  # one line: what happened in MLflow
    mlflow_ui: str | None = None  # the command (or URL) that shows these runs


def _resolve_sweep_dir(arg: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Path:
    """SWEEP may be the sweep directory or the sweep file that names it. A sweep file must
    still describe the results in its directory (the settings check of submit): tables of a
    file whose settings changed would be labelled with settings the results were not
    trained under."""
    path = Path(arg)
    if path.is_dir():
        return path
    if path.is_file():
        from orchestrator.ledger import SweepDir, check_settings
        from orchestrator.sweep.cells import expand
        from orchestrator.sweep.spec import load_sweep, validate_paths

        spec = load_sweep(path, overrides)
        check_settings(spec, SweepDir(spec.output_dir), expand(spec, validate_paths(spec)))
        return Path(spec.output_dir)
    raise UserInputError(f"collect: SWEEP {str(path)!r} is neither a sweep directory nor a sweep file")


def _layouts(manifest: Mapping[str, Any]) -> dict[str, str]:
    datasets = (manifest.get("spec") or {}).get("datasets") or manifest.get("datasets") or {}
    out: dict[str, str] = {}
    if isinstance(datasets, Mapping):
        for name, cfg in datasets.items():
            if isinstance(cfg, Mapping) and cfg.get("layout"):
                out[str(name)] = str(cfg["layout"])
    elif isinstance(datasets, list):
        for cfg in datasets:
            if isinstance(cfg, Mapping) and cfg.get("name") and cfg.get("layout"):
                out[str(cfg["name"])] = str(cfg["layout"])
    return out


def training_context(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """collect_groups' `recipe`, `differs_from_script` and `synthetic_datasets`, from the
    manifest: its resolved training settings and its datasets' roots."""
    from aullm.constants import is_synthetic_dataset
    from aullm.recipes import differs_from, recorded

    spec = manifest.get("spec") or {}
    training = recorded(spec.get("training") or {})
    differs = differs_from(training, "script")
    datasets = spec.get("datasets") or {}
    synthetic = {
        str(name)
        for name, cfg in (datasets.items() if isinstance(datasets, Mapping) else ())
        if isinstance(cfg, Mapping) and cfg.get("root") and is_synthetic_dataset(cfg["root"])
    }
    return {"recipe": training["recipe"], "differs_from_script": differs, "synthetic_datasets": synthetic}


def _settings_table(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """hash -> resolved settings; a manifest from before axes: its `training` block, under
    the empty hash its cells carry (so their parent runs get the training params too)."""
    if manifest.get("settings"):
        return dict(manifest["settings"])
    training = (manifest.get("spec") or {}).get("training")
    if not isinstance(training, Mapping):
        return None
    from aullm.recipes import recorded

    return {"": recorded(training)}


# What collecting reads of a result file: the rest (350 epoch losses, timing, a failed
# cell's traceback) is most of its bytes and is never parsed.
RESULT_FIELDS = ("cell_id", "status", "error", "predictions", "mlflow", "settings_hash")


def _read_results(sweep: Any, cell_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The RESULT_FIELDS of the manifest's finished cells (status done or failed); a failed
    cell's file is read too (its error names why the fold is missing), and a file whose
    first bytes say done or failed but whose rest cannot be parsed counts as failed. One
    directory listing, then one read per result file."""
    present = sweep.result_ids()
    results: dict[str, dict[str, Any]] = {}
    for cid in cell_ids:
        if cid not in present:
            continue
        try:
            payload = sweep.read_result_fields(cid, RESULT_FIELDS)
        except (OSError, ValueError, UserInputError) as exc:
            if sweep.result_status(cid) in RESULT_STATUSES:
                results[cid] = {"cell_id": cid, "status": "unreadable", "error": f"unreadable result file: {exc}"}
            continue
        if payload.get("status") in RESULT_STATUSES:
            results[cid] = payload
    return results


def _cell_states(sweep: Any, results: Mapping[str, Mapping[str, Any]], notes: list[str]) -> dict[str, str]:
    """Each cell's state for `reconcile_runs`: the scheduler's view where it can be had
    (one batched sacct call), the ledger's otherwise (a result file is the truth). Only the
    scheduler's own error falls back, and `notes` says so; anything else is a bug and raises."""
    from orchestrator.state.scheduler import SchedulerError
    from orchestrator.state.status import cell_statuses

    states: dict[str, str] = {}
    try:
        for st in cell_statuses(sweep, update_index=True):
            states[st.cell_id] = st.state.upper()
    except SchedulerError as exc:  # no scheduler reachable: the ledger still knows the ends
        notes.append(f"scheduler not reachable, run states from the result files ({' '.join(str(exc).split())[:200]})")
    for cid, res in results.items():
        # Only where the scheduler said nothing: a failed result may have a retry running.
        states.setdefault(cid, "DONE" if res.get("status") == "done" else "FAILED")
    return states


def _tracking(sweep: Any, sweep_dir: Path, groups: Sequence[GroupResult], out_dir: Path,
              results: Mapping[str, Mapping[str, Any]], tables: Sequence[Any], title: str) -> str:  # fmt: skip
    """Best effort: MLflow is for people, the tables on disk are the record."""
    from orchestrator.results.summary_runs import as_tracking_config, log_group_runs
    from orchestrator.tracking.store import reconcile_runs
    from orchestrator.tracking.sync import sync_spool

    try:
        cfg = as_tracking_config(sweep.tracking_config())  # the manifest's {uri, experiment}
    except Exception as exc:  # noqa: BLE001
        return f"MLflow skipped: no usable tracking config ({' '.join(str(exc).split())[:200]})"
    notes = []
    try:
        n = sync_spool(cfg, sweep_dir)
        if n:
            notes.append(f"{n} spooled cell runs synced")
        n = reconcile_runs(cfg, sweep_dir, _cell_states(sweep, results, notes))
        if n:
            notes.append(f"{n} stale runs reconciled")
        summary = log_group_runs(cfg, sweep_dir, groups, out_dir, tables=tables, sweep_name=title, results=results)
        notes.append(summary.describe())
    except Exception as exc:  # noqa: BLE001 - never fail a collect because MLflow is down
        notes.append(f"MLflow not updated: {' '.join(str(exc).split())[:300]}")
    return "; ".join(notes)


def collect_sweep(
    sweep_arg: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    track: bool = True,
    plots: bool = True,
    console: Any = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
) -> CollectReport:
    """Collect a sweep directory: tables and plots into `out` (default
    ``<sweep>/results_tables``), printed to the terminal, and MLflow parent runs."""
    from orchestrator.ledger import SweepDir

    sweep_dir = _resolve_sweep_dir(sweep_arg, overrides)
    sweep = SweepDir(sweep_dir)
    manifest = sweep.read_manifest()  # UserInputError (exit 2) when it is not a sweep directory
    cells = manifest.get("cells") or []
    if not cells:
        raise UserInputError(f"collect: {sweep_dir}/manifest.json lists no cells")
    refs = [CellRef.from_any(c) for c in cells]
    results = _read_results(sweep, [r.cell_id for r in refs])
    groups = collect_groups(refs, results, layouts=_layouts(manifest), settings=_settings_table(manifest),
                            **training_context(manifest))
    out_dir = Path(out) if out is not None else sweep_dir / RESULTS_DIRNAME
    title = str(manifest.get("name") or sweep_dir.name)
    from orchestrator.results import tables as tbl

    built = tbl.build_tables(groups, tbl.load_paper_tables())

    def while_plotting() -> None:
        if not quiet:
            tbl.print_terminal(groups, console=console, title=title, tables=built)
        from orchestrator.results import settings_table as stbl

        rows = stbl.settings_rows(groups)
        if rows and not quiet:  # plain Markdown: the settings table has no paper rows to style
            if console is not None:
                console.print(stbl.to_markdown(rows), markup=False, highlight=False)
            else:
                print(stbl.to_markdown(rows))
        if track:  # the mlflow import overlaps the plot workers instead of following them
            from orchestrator.tracking.store import preload

            preload()

    files = write_outputs(groups, out_dir, title=title, plots=plots, tables=built, while_plotting=while_plotting)
    tracking_note = (
        _tracking(sweep, sweep_dir, groups, out_dir, results, built, title) if track else "MLflow skipped (--no-mlflow)"
    )
    report = CollectReport(sweep_dir, out_dir, groups, files, tracking_note, _ui_command(sweep, sweep_dir) if track else None)
    n_done = sum(g.complete for g in groups)
    line = f"{n_done}/{len(groups)} groups complete; tables and plots in {out_dir}; {tracking_note}"
    if quiet:
        return report
    if console is not None:
        console.print(line, markup=False, highlight=False)
    else:
        print(line)
    return report


def _ui_command(sweep: Any, sweep_dir: Path) -> str | None:
    """`mlflow ui ...` or the server's experiment page for this sweep; None if unknown."""
    from orchestrator.results.summary_runs import as_tracking_config
    from orchestrator.tracking.config import ui_command

    try:
        state = json.loads((sweep_dir / "mlflow" / "tracking.json").read_text(encoding="utf-8"))
        exp_id = next(iter((state.get("experiments") or {}).values()), None)
    except (OSError, ValueError, AttributeError):
        exp_id = None
    try:
        return ui_command(as_tracking_config(sweep.tracking_config()), sweep_dir, exp_id)
    except Exception:  # noqa: BLE001 - a hint only: collect's record is on disk
        return None


def collect_job(sweep_dir: str, out: str | None = None) -> dict[str, Any]:
    """What the dependent Slurm job (submitit) and the local supervisor run once the arrays
    end. Returns a small picklable summary for submitit's result file."""
    report = collect_sweep(sweep_dir, out)
    return {
        "out_dir": str(report.out_dir),
        "groups": len(report.groups),
        "complete": sum(g.complete for g in report.groups),
        "incomplete": {g.key.id: g.missing_text() for g in report.groups if not g.complete},
        "tracking": report.tracking,
    }


def collect_main(args: Any) -> int:
    """`aullm-grid collect SWEEP [--out DIR] [--json]`; also what the dependent Slurm job runs."""
    as_json = bool(getattr(args, "json", False))
    report = collect_sweep(
        args.sweep,
        getattr(args, "out", None),
        track=not getattr(args, "no_mlflow", False),
        plots=not getattr(args, "no_plots", False),
        overrides=getattr(args, "set", None) or (),
        quiet=as_json,
    )
    steps = [f"tables: {report.out_dir / 'tables.md'} (each table also as .csv and .tex, with the figures, in {report.out_dir})"]
    if report.mlflow_ui:
        steps.append(f"runs: {report.mlflow_ui}")
    incomplete = [g.key.id for g in report.groups if not g.complete]
    if incomplete:
        import shlex

        steps.append(f"{len(incomplete)} groups incomplete: aullm-grid status {shlex.quote(str(args.sweep))}")
    if as_json:
        print(json.dumps({
            "command": "collect", "sweep": str(args.sweep), "sweep_dir": str(report.sweep_dir.resolve()),
            "out_dir": str(report.out_dir), "groups": len(report.groups),
            "complete": sum(g.complete for g in report.groups), "incomplete": incomplete,
            "files": [str(f) for f in report.files], "tracking": report.tracking, "mlflow_ui": report.mlflow_ui,
            "next": steps,
        }, indent=2))  # fmt: skip
        return 0
    for step in steps:
        print(f"next: {step}")
    return 0


if __name__ == "__main__":  # `python -m orchestrator.results.collect SWEEP [OUT]` for debugging
    import argparse

    ap = argparse.ArgumentParser(description="collect a sweep into the paper's tables")
    ap.add_argument("sweep")
    ap.add_argument("--out")
    ap.add_argument("--no-mlflow", action="store_true")
    try:
        sys.exit(collect_main(ap.parse_args()))
    except UserInputError as exc:
        print(f"aullm-grid collect: {exc}", file=sys.stderr)
        sys.exit(2)
