"""What an array task runs on a compute node: train a pack of cells that share one LLM.

The task loads the LLM once, then for each of its cells: skips it if a result already
exists (a requeued task must not redo finished work), builds the fold's split, trains
it (resuming from a checkpoint if a preempted attempt left one), and writes the result
file atomically into the sweep directory before telling MLflow. The sweep directory
is the record; MLflow is best effort and never stops training.

Preemption and timeouts: Slurm sends SIGUSR2 `signal_delay_s` before the time limit
(submitit's --signal) and SIGTERM when it preempts or `scontrol requeue`s a task. Both
set a flag; the training loop sees it at the next epoch boundary, saves the cell's
state and stops. On SIGUSR2 the task requeues itself; on SIGTERM Slurm decides.

A task of several processes (`resources.processes_per_task`, see jobs/process_group.py)
runs this same loop in every process: all of them train, rank 0 alone writes results,
checkpoints and MLflow runs, and the choices that must match on every rank (skip or
train a cell, stop at this epoch, how the cell ended) are rank 0's or agreed by all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aullm.constants import CONCURRENT_AUTO as AUTO
from jobs.process_group import RendezvousError, TaskProcesses, join_task_processes
from orchestrator.sweep.cells import Cell, task_setup
from orchestrator.ledger import SweepDir

# A cell that failed this many times (across requeues and retries) is not tried again
# by the same task; `aullm-grid retry` resets the count.
MAX_ATTEMPTS_PER_CELL = 3


# Which signal wins when the processes of a task received different ones: SIGTERM means
# Slurm is already taking the task off the node, so nobody must requeue it on top.
_STOP_PRIORITY = {signal.SIGUSR2: 1, signal.SIGTERM: 2}


class _StopFlag:
    """Set by SIGUSR2/SIGTERM; read by the trainer at each epoch boundary.

    The processes of a task get their signals a moment apart: each read is an agreement
    (the strongest signal any rank has seen), so all ranks stop at the same epoch and none
    is left alone in the next epoch's gradient all-reduce.
    """

    def __init__(self, processes: TaskProcesses) -> None:
        self.processes = processes
        self._received = 0  # the strongest signal this process got, as a _STOP_PRIORITY value
        self.signal: int | None = None  # what the task acts on: the same on every rank

    def __call__(self) -> bool:
        agreed = self.processes.highest(self._received)
        self.signal = next((sig for sig, priority in _STOP_PRIORITY.items() if priority == agreed), None)
        return self.signal is not None

    def install(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self._received = max(self._received, _STOP_PRIORITY[signal.Signals(signum)])
            print(f"aullm-grid: received signal {signum}; checkpointing at the next epoch", file=sys.stderr, flush=True)

        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, handler)


def slurm_ids() -> dict[str, str | None]:
    env = os.environ
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": env.get("SLURM_RESTART_COUNT"),
    }


def _requeue_self() -> None:
    ids = slurm_ids()
    if ids["array_job_id"] and ids["array_task_id"]:
        target = f"{ids['array_job_id']}_{ids['array_task_id']}"
    elif ids["job_id"]:
        target = ids["job_id"]
    else:
        return
    subprocess.run(["scontrol", "requeue", target], check=False, capture_output=True)


class DatasetCache:
    """Reads each dataset sheet and decodes its frames once per task, whatever the cell count."""

    def __init__(self, sweep: SweepDir) -> None:
        self.sweep = sweep
        self._samples: dict[str, list] = {}
        self._stores: dict[str, Any] = {}

    def get(self, name: str) -> tuple[list, Any]:
        if name not in self._samples:
            from aullm.data.clips import ClipStore
            from aullm.data.readers import read_dataset

            ds = self.sweep.dataset_config(name)
            samples = read_dataset(ds["layout"], ds["root"], sheet=ds.get("sheet"), frames_dir=ds.get("frames_dir"))
            self._samples[name] = samples
            self._stores[name] = ClipStore.load(samples, self.sweep.cache_dir)
        return self._samples[name], self._stores[name]


def build_split(cell: Cell, datasets: DatasetCache):
    """The train/test split of one cell, and the clip store holding both sides' frames."""
    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import cross_domain_split, loso_split

    if cell.kind == "cross_domain":
        source, source_store = datasets.get(cell.train_dataset)
        target, target_store = datasets.get(cell.test_dataset)
        return cross_domain_split(source, target), ClipStore.merged([source_store, target_store])
    samples, store = datasets.get(cell.dataset)
    layout = datasets.sweep.dataset_config(cell.dataset)["layout"]
    return loso_split(samples, cell.fold, DATASET_AUS[layout]), store


class _BackgroundLogger:
    """A cell's `CellRunLogger`, started on a thread once the task's first training step
    has begun: opening the MLflow run imports mlflow (1.4 s here, 4-5 s on a busy 2-core
    node) and calls the store, none of which the first step needs. Started any earlier,
    the import holds the GIL against the task's own imports and LLM load and delays that
    step; started then, it runs beside training (torch releases the GIL in its kernels).
    The first use of the logger (an epoch's metrics, `finish`, `run_id`) starts it at
    once if training never began (a cell failing at build) and waits for it. Both sides
    never raise (CellRunLogger's promise), so the thread has nothing to report."""

    def __init__(self, logger: Any, after: threading.Event, **start: Any) -> None:
        self._logger = logger
        self._after, self._now = after, threading.Event()
        self._thread = threading.Thread(target=self._start, kwargs=start, name="mlflow-start", daemon=True)
        self._thread.start()

    def _start(self, **start: Any) -> None:
        while not (self._after.is_set() or self._now.is_set()):
            self._after.wait(0.05)
        self._logger.start(**start)

    def __getattr__(self, name: str) -> Any:
        self._now.set()
        self._thread.join()
        return getattr(self._logger, name)


def _epoch_done(logger: Any, cell_id: str, epoch: int, loss: float, progress: Callable[[int, float], None] | None = None) -> None:
    # One line per epoch in the task log: how far a cell got before a crash or a requeue
    # (a resumed cell's first line shows the epoch it continued from).
    print(f"aullm-grid: cell {cell_id} epoch {epoch} train_loss {loss:.4f}", flush=True)
    logger.log_epoch(epoch, {"train_loss": loss})
    if progress is not None:
        progress(epoch, loss)


# A progress file is rewritten at most this often: `status` polls every few seconds, and a
# cell of a fast GPU finishes hundreds of epochs a minute (one write each would load a
# shared filesystem for nothing).
PROGRESS_EVERY_S = 3.0


class ProgressReporter:
    """The cell's progress file (<sweep>/progress/<cell>.json): epoch of N, elapsed seconds.

    Called after every epoch; writes the first epoch, the last, and otherwise at most once
    per `min_interval_s` of `clock`. Never raises: progress is a hint for `status`, and a
    full disk must not fail a cell that would otherwise finish.
    """

    def __init__(self, sweep: SweepDir, cell_id: str, epochs: int, *, min_interval_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.sweep, self.cell_id, self.epochs = sweep, cell_id, int(epochs)
        self.min_interval_s, self.clock = min_interval_s, clock
        self.started_at = time.time()
        self._t0 = clock()
        self._last: float | None = None
        self.writes = 0

    def __call__(self, epoch: int, loss: float) -> None:
        try:
            now = self.clock()
            last_epoch = epoch + 1 >= self.epochs
            if self._last is not None and now - self._last < self.min_interval_s and not last_epoch:
                return
            self._last = now
            self.sweep.write_progress(self.cell_id, {
                "cell_id": self.cell_id, "epoch": epoch + 1, "epochs": self.epochs,
                "elapsed_s": round(now - self._t0, 3), "train_loss": float(loss),
                "started_at": self.started_at, "updated_at": time.time(),
            })  # fmt: skip
            self.writes += 1
        except Exception:  # noqa: BLE001 - see the class docstring
            return


CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_deepspeed_config(value: str) -> str:
    """`zero2` names the shipped ZeRO-2 config; anything else is a path."""
    shipped = CONFIGS / f"{value}.json"
    return str(shipped) if shipped.is_file() else value


@dataclass
class _TaskReport:
    """What one task did, for the one summary line it prints at the end."""

    outcomes: dict[str, str] = field(default_factory=dict)
    llm_load_seconds: float | None = None
    processes: TaskProcesses = field(default_factory=TaskProcesses)
    trainer: Any = None  # the task's CellTrainer, once built: it marks its first training step

    def line(self, n_cells: int, seconds: float) -> str:
        counts = Counter(o.split(" ")[0] for o in self.outcomes.values())
        done = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none run"
        load = "not reached" if self.llm_load_seconds is None else f"{self.llm_load_seconds:.1f} s"
        # The DeepSpeed import alone costs ~5 s per task: it must appear only when configured.
        deepspeed = "yes" if "deepspeed" in sys.modules else "no"
        where = f"; process {self.processes.rank} of {self.processes.world_size}" if self.processes.distributed else ""
        return (
            f"aullm-grid task: {n_cells} cells ({done}) in {seconds:.1f} s; model load {load}; "
            f"{self._first_step()}; deepspeed imported: {deepspeed}{where}"
        )

    def _first_step(self) -> str:
        """How long the process took to reach its first training step: what start-up costs
        (interpreter, imports, LLM load, data), read by bench/bench_overhead.py."""
        first = getattr(self.trainer, "first_step_at", None)
        started = process_started_at()
        if first is None or started is None:
            return "first training step not reached"
        return f"first training step {first - started:.1f} s after the process started"


def process_started_at() -> float | None:
    """time.time() when this process started (Linux: /proc, to 10 ms), or None elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the name
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


@dataclass(frozen=True)
class _CellEnd:
    """How one process's run of a cell ended: done, preempted or failed (with the error)."""

    status: str
    error: str = ""
    traceback: str = ""


def _settle(ends: list[_CellEnd]) -> tuple[str, int, _CellEnd]:
    """How the cell ended for the task, from every process's end (rank order).

    Failed if any process failed (the first such rank's error is the cell's), else
    preempted if any was (they stop together, see `_StopFlag`), else done.
    """
    for status in ("failed", "preempted"):
        for rank, end in enumerate(ends):
            if end.status == status:
                return status, rank, end
    return "done", 0, ends[0]


def run_task(sweep_dir: str, cell_ids: list[str]) -> dict[str, str]:
    """Entry point of one array task (every process of it). Returns {cell_id: outcome}
    for submitit's result pickle: the same on every rank."""
    t0 = time.time()
    try:
        processes = join_task_processes()
    except RendezvousError as exc:
        if exc.rank == 0:
            # rank 0 speaks for the task: each cell's result says which rank never came,
            # instead of status's "task ended without writing this cell's result"
            sweep = SweepDir(sweep_dir)
            _record_setup_failure(sweep, [sweep.cell(cid) for cid in cell_ids], exc,
                                  TaskProcesses(rank=0, world_size=exc.world_size))  # fmt: skip
        raise
    report = _TaskReport(processes=processes)
    try:
        return _run_cells(sweep_dir, cell_ids, report)
    finally:
        print(report.line(len(cell_ids), time.time() - t0), flush=True)
        processes.leave()


def _claim(sweep: SweepDir, cell: Cell, processes: TaskProcesses) -> int | str:
    """Rank 0's decision for one cell: the attempt number to train it under (the cell is
    marked running), or why it is skipped."""
    if sweep.result_exists(cell.cell_id, status="done"):
        return "skipped (done)"
    attempts = sweep.bump_attempts(cell.cell_id)
    if attempts > MAX_ATTEMPTS_PER_CELL:
        return "skipped (too many attempts)"
    sweep.mark_running(
        cell.cell_id,
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "attempt": attempts,
            "slurm": slurm_ids(),
            "world_size": processes.world_size,
        },
    )
    return attempts


def _run_cells(sweep_dir: str, cell_ids: list[str], report: _TaskReport) -> dict[str, str]:
    from aullm.train import CellTrainer, Preempted
    from orchestrator.tracking.cell_logger import CellRunLogger

    processes = report.processes
    main = processes.is_main
    stop = _StopFlag(processes)
    stop.install()
    sweep = SweepDir(sweep_dir)
    manifest = sweep.read_manifest()
    cells = [sweep.cell(cid) for cid in cell_ids]
    configs = {c.cell_id: _cell_config(manifest, c) for c in cells}
    config = configs[cells[0].cell_id]  # what the task loads once: shared by every cell (pack_key)
    llm_paths = {c.llm_path for c in cells if c.llm_path}
    if len(llm_paths) > 1:
        raise RuntimeError(f"a task must share one LLM; got {sorted(llm_paths)}")
    shared = {task_setup(vars(cfg)) for cfg in configs.values()}
    if len(shared) > 1:
        raise RuntimeError(f"a task must share one dtype and DeepSpeed setup; got {sorted(shared)}")
    # Rank 0 reads the ledger and the other ranks follow its answer, here and per cell:
    # two reads of a directory rank 0 is writing to could disagree.
    if processes.share(all(sweep.result_exists(c.cell_id, status="done") for c in cells) if main else None):
        # a requeued task whose cells all finished: no need to load the LLM at all
        report.outcomes.update((c.cell_id, "skipped (done)") for c in cells)
        return report.outcomes
    tracking = sweep.tracking_config()
    try:
        trainer = CellTrainer(next(iter(llm_paths)) if llm_paths else None, config)
    except Exception as exc:  # noqa: BLE001 - said per cell below, then the task fails as before
        # A trainer that cannot be built (a DeepSpeed config edited since submit, DeepSpeed
        # failing to start) fails every cell of the task: record why in each result, so
        # status shows the reason instead of "task ended without writing this cell's result".
        if main:
            _record_setup_failure(sweep, cells, exc, processes)
        raise
    report.llm_load_seconds = trainer.load_seconds
    report.trainer = trainer
    world_size = trainer.accelerator.num_processes
    if world_size != processes.world_size:
        # each process would train alone: the same numbers at N times the cost, silently
        raise RuntimeError(f"Accelerate sees {world_size} process(es) but this task has {processes.world_size}")
    datasets = DatasetCache(sweep)
    outcomes = report.outcomes
    host = socket.gethostname()

    concurrent = concurrent_setting(manifest)
    # under `auto`, per cell: the K its loop got and why ("1 (CPU)"), for its result file
    chosen: dict[str, str] = {}
    if concurrent == AUTO:
        from aullm.concurrent import auto_without_measuring

        why = auto_without_measuring(trainer.device.type, has_llm=trainer.llm is not None,
                                     processes=processes.world_size, deepspeed=bool(config.deepspeed))  # fmt: skip
        if why is not None:
            print(f"aullm-grid: concurrent_cells auto: 1 ({why})", flush=True)
            chosen = {c.cell_id: f"1 ({why})" for c in cells}
            concurrent = 1
    if concurrent != 1 and trainer.llm is not None and not processes.distributed and not config.deepspeed:
        cells = _run_concurrent(sweep, manifest, cells, configs, trainer, datasets, tracking, stop, outcomes, concurrent,
                                processes, chosen)
        if any(o == "preempted" for o in outcomes.values()):
            return outcomes  # the stopped cells saved their checkpoints; the rest waits for the requeue

    for cell in cells:
        claim = processes.share(_claim(sweep, cell, processes) if main else None)
        if isinstance(claim, str):
            outcomes[cell.cell_id] = claim
            continue
        attempts = claim
        cell_config = configs[cell.cell_id]
        logger = (
            _BackgroundLogger(CellRunLogger(tracking, sweep.path, cell.cell_id), trainer.training_started,
                              params={**cell.params(), **cell_config.__dict__}, tags=cell.tags(manifest.get("name", "")))
            if main else None
        )  # fmt: skip
        t0 = time.time()
        progress = None
        if main:
            sweep.clear_progress(cell.cell_id)  # an earlier attempt's epochs are not this one's
            progress = ProgressReporter(sweep, cell.cell_id, cell_config.epochs)
        try:
            t_data = time.perf_counter()
            split, store = build_split(cell, datasets)
            data_seconds = time.perf_counter() - t_data
            result = trainer.run(
                split,
                store,
                cell.variant,
                cell.seed,
                cell_config,
                on_epoch=(
                    None
                    if logger is None
                    else lambda epoch, loss, cid=cell.cell_id, log=logger, p=progress: _epoch_done(log, cid, epoch, loss, p)
                ),
                checkpoint_path=sweep.checkpoint_path(cell.cell_id),
                should_stop=stop,
            )
            end = _CellEnd("done")
        except Preempted:
            end = _CellEnd("preempted")
        except Exception as exc:  # noqa: BLE001 - a failed cell must not take its pack down
            end = _CellEnd("failed", _one_line(f"{type(exc).__name__}: {exc}"), traceback.format_exc()[-4000:])
        status, rank, end = _settle(processes.gather(end))
        outcomes[cell.cell_id] = status
        if status == "preempted":
            if logger is not None:
                logger.finish("KILLED", None, end_reason="preempted")
                if stop.signal == signal.SIGUSR2:
                    _requeue_self()
            return outcomes
        if logger is None:
            continue  # not rank 0: the ledger and MLflow are rank 0's
        if status == "failed":
            error = end.error if rank == 0 else f"process {rank}: {end.error}"
            payload = {
                "cell_id": cell.cell_id,
                "status": "failed",
                "error": error,
                "traceback": end.traceback,
                "attempt": attempts,
                "host": host,
                "slurm": slurm_ids(),
                "world_size": world_size,
                "finished_at": time.time(),
                **_run_record(logger),
            }
            sweep.write_result(cell.cell_id, payload)
            logger.finish("FAILED", None, end_reason=error[:250])
            continue
        payload = {
            "cell_id": cell.cell_id,
            "status": "done",
            "recipe": cell_config.recipe,  # how it was trained: the tables say which recipe they show
            # which of the manifest's settings it was trained under: collect refuses to pool a
            # result whose settings are not the manifest's for this cell
            "settings_hash": cell.settings_hash,
            **result.to_payload(),
            "attempt": attempts,
            "host": host,
            "slurm": slurm_ids(),
            "world_size": world_size,  # processes that trained the cell together (data parallel)
            **({"concurrent_cells_auto": chosen[cell.cell_id]} if cell.cell_id in chosen else {}),
            "started_at": t0,
            "finished_at": time.time(),
            **_run_record(logger),
        }
        result_path = sweep.write_result(cell.cell_id, payload)
        # the result file holds the cell's test predictions: in the run, beside its loss curve
        logger.log_artifact(result_path, "predictions")
        logger.finish("FINISHED", {
            "final_train_loss": result.epoch_losses[-1] if result.epoch_losses else float("nan"),
            **_timing_metrics(result.timing, data_seconds),
        })  # fmt: skip
    return outcomes


def _cell_config(manifest: dict[str, Any], cell: Cell) -> Any:
    """The cell's TrainConfig: its row of the manifest's settings table, checked against its
    hash (a hand-edited manifest must not train a cell under settings its id does not name);
    a manifest from before axes: its `training` block."""
    from aullm.recipes import recorded
    from aullm.train import TrainConfig
    from orchestrator.sweep.settings import settings_hash

    table = manifest.get("settings") or {}
    if cell.settings_hash:
        values = table.get(cell.settings_hash)
        if values is None or settings_hash(values) != cell.settings_hash:
            raise RuntimeError(f"cell {cell.cell_id}: the manifest has no settings with hash {cell.settings_hash}")
    else:
        values = recorded(manifest["spec"].get("training") or {})
    config = TrainConfig.from_dict(dict(values), source=f"cell {cell.cell_id}")
    if config.deepspeed:
        config.deepspeed = resolve_deepspeed_config(config.deepspeed)
    return config


def _timing_metrics(timing: dict[str, float], data_seconds: float) -> dict[str, float]:
    """The cell's wall time split three ways, as MLflow metrics (seconds): load (its data
    split; the LLM is loaded once per task, `time_llm_load_s`), train, predict."""
    cell = float(timing.get("cell_seconds", 0.0))
    predict = float(timing.get("predict_seconds", 0.0))
    out = {"time_load_s": data_seconds, "time_train_s": max(0.0, cell - predict), "time_predict_s": predict}
    if timing.get("llm_load_seconds") is not None:
        out["time_llm_load_s"] = float(timing["llm_load_seconds"])
    return out


def concurrent_setting(manifest: dict[str, Any]) -> int | str:
    """`resources.concurrent_cells` as the sweep set it: K, or `auto`. A manifest written
    before the knob had `auto` (or before it existed) meant 1, its default then."""
    value = manifest["spec"].get("resources", {}).get("concurrent_cells")
    return AUTO if value == AUTO else int(value or 1)


def _run_concurrent(sweep: SweepDir, manifest: dict, cells: list[Cell], configs: dict[str, Any], trainer: Any,
                    datasets: DatasetCache, tracking: Any, stop: _StopFlag, outcomes: dict[str, str],
                    k: int | str, processes: TaskProcesses, chosen: dict[str, str]) -> list[Cell]:  # fmt: skip
    """Train the task's cells in concurrent loops of up to `k` cells of one variant
    (aullm/concurrent.py); `k` `auto`: as many as the device's free memory holds, measured
    per loop (`_auto_k`), recorded in `chosen`. Each cell keeps its own claim, MLflow run,
    checkpoint and result, written the moment it ends. Returns the cells left for the
    one-by-one loop: those that cannot share a loop (no LLM, late-fusion prompt learning)
    and groups of one."""
    from aullm.concurrent import ConcurrentCell, ConcurrentTrainer, can_run_concurrently, groups_of
    from aullm.train import Preempted
    from orchestrator.tracking.cell_logger import CellRunLogger

    able = [c for c in cells if can_run_concurrently(c.variant, configs[c.cell_id])]
    if k == AUTO:
        alone = {c.cell_id for c in cells} - {c.cell_id for c in able}
        chosen.update((cid, "1 (its variant trains alone)") for cid in alone)
    # a requeued task's finished cells would only leave holes in its loops (their claim skips
    # them), and `auto` must not measure room for them: the one-by-one loop skips them
    able = [c for c in able if not sweep.result_exists(c.cell_id, status="done")]
    conc = ConcurrentTrainer(trainer)
    # one loop trains one variant under one setting (axes): the loop has one TrainConfig
    groups: list[list[Cell]] = []
    k_of: dict[str, int] = {}
    for members in groups_of(able, len(able) or 1, key=lambda c: (c.variant, c.settings_hash)):
        loop_k = _auto_k(conc, members, configs, datasets, chosen) if k == AUTO else int(k)
        k_of.update((c.cell_id, loop_k) for c in members)
        groups += [g for g in groups_of(members, loop_k, key=lambda c: c.variant) if len(g) > 1]
    grouped = {c.cell_id for g in groups for c in g}
    rest = [c for c in cells if c.cell_id not in grouped]
    if not groups:
        return rest
    host = socket.gethostname()
    for group in groups:
        config = configs[group[0].cell_id]
        members: list[ConcurrentCell] = []
        started: dict[str, tuple[Cell, int, Any, float]] = {}
        for cell in group:
            claim = _claim(sweep, cell, processes)
            if isinstance(claim, str):
                outcomes[cell.cell_id] = claim
                continue
            logger = _BackgroundLogger(CellRunLogger(tracking, sweep.path, cell.cell_id), trainer.training_started,
                                       params={**cell.params(), **config.__dict__, "concurrent_cells": k_of[cell.cell_id]},
                                       tags=cell.tags(manifest.get("name", "")))  # fmt: skip
            t0 = time.time()
            try:
                split, store = build_split(cell, datasets)
            except Exception as exc:  # noqa: BLE001 - this cell's failure only
                _write_failed(sweep, cell, claim, host, logger, exc, traceback.format_exc())
                outcomes[cell.cell_id] = "failed"
                continue
            started[cell.cell_id] = (cell, claim, logger, t0)
            sweep.clear_progress(cell.cell_id)  # an earlier attempt's epochs are not this one's
            progress = ProgressReporter(sweep, cell.cell_id, config.epochs)
            members.append(ConcurrentCell(
                key=cell.cell_id, split=split, store=store, variant=cell.variant, seed=cell.seed,
                on_epoch=lambda epoch, loss, cid=cell.cell_id, log=logger, p=progress: _epoch_done(log, cid, epoch, loss, p),
                checkpoint_path=sweep.checkpoint_path(cell.cell_id),
            ))  # fmt: skip

        def on_done(member: ConcurrentCell, outcome: Any) -> None:
            cell, attempts, logger, t0 = started[member.key]
            if isinstance(outcome, BaseException):
                tb = "".join(traceback.format_exception(outcome))[-4000:]
                _write_failed(sweep, cell, attempts, host, logger, outcome, tb)
                outcomes[cell.cell_id] = "failed"
                return
            payload = {
                "cell_id": cell.cell_id, "status": "done", "recipe": config.recipe,
                "settings_hash": cell.settings_hash, **outcome.to_payload(),
                "attempt": attempts, "host": host, "slurm": slurm_ids(), "world_size": 1,
                "concurrent_cells": len(started),
                **({"concurrent_cells_auto": chosen[cell.cell_id]} if cell.cell_id in chosen else {}),
                "started_at": t0, "finished_at": time.time(), **_run_record(logger),
            }  # fmt: skip
            logger.log_artifact(sweep.write_result(cell.cell_id, payload), "predictions")
            final = outcome.epoch_losses[-1] if outcome.epoch_losses else float("nan")
            logger.finish("FINISHED", {"final_train_loss": final})
            outcomes[cell.cell_id] = "done"

        if not members:
            continue
        try:
            conc.run(members, config, on_done=on_done, should_stop=stop)
        except Preempted:
            for cid, (_cell, _attempts, logger, _t0) in started.items():
                if cid not in outcomes:
                    outcomes[cid] = "preempted"
                    logger.finish("KILLED", None, end_reason="preempted")
            if stop.signal == signal.SIGUSR2:
                _requeue_self()
            return []
    return rest


def _auto_k(conc: Any, members: list[Cell], configs: dict[str, Any], datasets: DatasetCache,
            chosen: dict[str, str]) -> int:  # fmt: skip
    """K for one loop's cells still to train (one variant, one setting) under `auto` on a
    GPU: measured (aullm/concurrent.py, `ConcurrentTrainer.choose_k`), logged in one line.
    A measurement that fails (a cell that does not fit even alone, bad data) gives 1: the
    one-by-one loop then trains, or fails, each cell with its own error."""
    from aullm.concurrent import ConcurrentCell

    what = f"{members[0].variant}, {len(members)} cells to train"
    cells = []
    for c in members:
        try:
            split, store = build_split(c, datasets)
        except Exception:  # noqa: BLE001 - the cell's own failure, written when its loop claims it
            continue
        cells.append(ConcurrentCell(key=c.cell_id, split=split, store=store, variant=c.variant, seed=c.seed))
    try:
        k, why = conc.choose_k(cells, configs[members[0].cell_id])
    except Exception as exc:  # noqa: BLE001 - a choice of K must not fail the task
        k, why = 1, f"1 (measurement failed: {_one_line(f'{type(exc).__name__}: {exc}', 200)})"
    print(f"aullm-grid: concurrent_cells auto: {why} [{what}]", flush=True)
    chosen.update((c.cell_id, why) for c in members)
    return k


def _write_failed(sweep: SweepDir, cell: Cell, attempts: int, host: str, logger: Any, exc: BaseException,
                  tb: str) -> None:  # fmt: skip
    error = _one_line(f"{type(exc).__name__}: {exc}")
    sweep.write_result(cell.cell_id, {
        "cell_id": cell.cell_id, "status": "failed", "error": error, "traceback": tb[-4000:], "attempt": attempts,
        "host": host, "slurm": slurm_ids(), "world_size": 1, "finished_at": time.time(), **_run_record(logger),
    })  # fmt: skip
    logger.finish("FAILED", None, end_reason=error[:250])


def _record_setup_failure(sweep: SweepDir, cells: list[Cell], exc: Exception, processes: TaskProcesses) -> None:
    """A failed result for each unfinished cell of a task that could not start training (its
    processes did not all come, its trainer could not be built)."""
    error = _one_line(f"{type(exc).__name__}: {exc}")
    for cell in cells:
        if sweep.result_exists(cell.cell_id, status="done"):
            continue
        sweep.write_result(cell.cell_id, {
            "cell_id": cell.cell_id, "status": "failed", "error": error,
            "traceback": traceback.format_exc()[-4000:], "attempt": sweep.bump_attempts(cell.cell_id),
            "host": socket.gethostname(), "slurm": slurm_ids(), "world_size": processes.world_size,
            "finished_at": time.time(),
        })  # fmt: skip


def _one_line(error: str, limit: int = 500) -> str:
    """A cell's error as `status` shows it: one line (DeepSpeed's and pydantic's messages
    span several), cut to `limit` characters; the full traceback stays in the result."""
    line = " ".join(error.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _run_record(logger: Any) -> dict[str, Any]:
    """The cell's MLflow run and the group run it was created under, for the result file:
    the collector attaches the run to its group without looking it up. Nothing when the
    run could not be opened (MLflow down: the run is spooled and found at collect)."""
    if logger.run_id is None:
        return {}
    return {"mlflow": {"run_id": logger.run_id, "parent_run_id": logger.parent_run_id}}


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.run_cells SWEEP_DIR CELL_ID...`: run a pack by hand (debugging)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("cell_ids", nargs="+")
    args = parser.parse_args(argv)
    outcomes = run_task(str(args.sweep_dir), args.cell_ids)
    for cid, outcome in outcomes.items():
        print(f"{cid}: {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
