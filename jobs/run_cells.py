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
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cells import Cell
from orchestrator.ledger import SweepDir

# A cell that failed this many times (across requeues and retries) is not tried again
# by the same task; `aullm-grid retry` resets the count.
MAX_ATTEMPTS_PER_CELL = 3


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.signal = signum
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


def _epoch_done(logger: Any, cell_id: str, epoch: int, loss: float) -> None:
    # One line per epoch in the task log: how far a cell got before a crash or a requeue
    # (a resumed cell's first line shows the epoch it continued from).
    print(f"aullm-grid: cell {cell_id} epoch {epoch} train_loss {loss:.4f}", flush=True)
    logger.log_epoch(epoch, {"train_loss": loss})


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

    def line(self, n_cells: int, seconds: float) -> str:
        counts = Counter(o.split(" ")[0] for o in self.outcomes.values())
        done = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none run"
        load = "not reached" if self.llm_load_seconds is None else f"{self.llm_load_seconds:.1f} s"
        # The DeepSpeed import alone costs ~5 s per task: it must appear only when configured.
        deepspeed = "yes" if "deepspeed" in sys.modules else "no"
        return f"aullm-grid task: {n_cells} cells ({done}) in {seconds:.1f} s; model load {load}; deepspeed imported: {deepspeed}"


def run_task(sweep_dir: str, cell_ids: list[str]) -> dict[str, str]:
    """Entry point of one array task. Returns {cell_id: outcome} for submitit's result pickle."""
    t0 = time.time()
    report = _TaskReport()
    try:
        return _run_cells(sweep_dir, cell_ids, report)
    finally:
        print(report.line(len(cell_ids), time.time() - t0), flush=True)


def _run_cells(sweep_dir: str, cell_ids: list[str], report: _TaskReport) -> dict[str, str]:
    from aullm.train import CellTrainer, Preempted, TrainConfig
    from orchestrator.tracking import CellRunLogger

    stop = _StopFlag()
    stop.install()
    sweep = SweepDir(sweep_dir)
    manifest = sweep.read_manifest()
    cells = [sweep.cell(cid) for cid in cell_ids]
    config = TrainConfig.from_dict(manifest["spec"].get("training") or {})
    llm_paths = {c.llm_path for c in cells if c.llm_path}
    if len(llm_paths) > 1:
        raise RuntimeError(f"a task must share one LLM; got {sorted(llm_paths)}")
    if config.deepspeed:
        config.deepspeed = resolve_deepspeed_config(config.deepspeed)
    if all(sweep.result_exists(c.cell_id, status="done") for c in cells):
        # a requeued task whose cells all finished: no need to load the LLM at all
        report.outcomes.update((c.cell_id, "skipped (done)") for c in cells)
        return report.outcomes
    tracking = sweep.tracking_config()
    trainer = CellTrainer(next(iter(llm_paths)) if llm_paths else None, config)
    report.llm_load_seconds = trainer.load_seconds
    datasets = DatasetCache(sweep)
    outcomes = report.outcomes
    host = socket.gethostname()

    for cell in cells:
        if sweep.result_exists(cell.cell_id, status="done"):
            outcomes[cell.cell_id] = "skipped (done)"
            continue
        attempts = sweep.bump_attempts(cell.cell_id)
        if attempts > MAX_ATTEMPTS_PER_CELL:
            outcomes[cell.cell_id] = "skipped (too many attempts)"
            continue
        sweep.mark_running(cell.cell_id, {"host": host, "pid": os.getpid(), "attempt": attempts, "slurm": slurm_ids()})
        logger = CellRunLogger(tracking, sweep.path, cell.cell_id)
        logger.start(params={**cell.params(), **config.__dict__}, tags=cell.tags(manifest.get("name", "")))
        t0 = time.time()
        try:
            split, store = build_split(cell, datasets)
            result = trainer.run(
                split,
                store,
                cell.variant,
                cell.seed,
                config,
                on_epoch=lambda epoch, loss, cid=cell.cell_id: _epoch_done(logger, cid, epoch, loss),
                checkpoint_path=sweep.checkpoint_path(cell.cell_id),
                should_stop=stop,
            )
        except Preempted:
            logger.finish("KILLED", None, end_reason="preempted")
            if stop.signal == signal.SIGUSR2:
                _requeue_self()
            outcomes[cell.cell_id] = "preempted"
            return outcomes
        except Exception as exc:  # noqa: BLE001 - a failed cell must not take its pack down
            payload = {
                "cell_id": cell.cell_id,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-4000:],
                "attempt": attempts,
                "host": host,
                "slurm": slurm_ids(),
                "finished_at": time.time(),
            }
            sweep.write_result(cell.cell_id, payload)
            logger.finish("FAILED", None, end_reason=payload["error"][:250])
            outcomes[cell.cell_id] = "failed"
            continue
        payload = {
            "cell_id": cell.cell_id,
            "status": "done",
            **result.to_payload(),
            "attempt": attempts,
            "host": host,
            "slurm": slurm_ids(),
            "started_at": t0,
            "finished_at": time.time(),
        }
        sweep.write_result(cell.cell_id, payload)
        logger.finish("FINISHED", {"final_train_loss": result.epoch_losses[-1] if result.epoch_losses else float("nan")})
        outcomes[cell.cell_id] = "done"
    return outcomes


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
