"""Submission: cells -> packed tasks -> arrays under MaxArraySize -> submitit.

`submit_sweep` holds the sweep directory's lock for its whole run, so two concurrent
`submit`s of one sweep submit each cell once: the second sees the first's live jobs.
It returns at once on every executor: Slurm queues the arrays (plus a collector job
depending on them, `afterany`); `local` starts a detached supervisor that feeds the
tasks to submitit's LocalExecutor at most `max_local_workers` at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aullm.constants import CONCURRENT_AUTO as AUTO
from orchestrator.sweep.cells import Cell, pack, split_arrays
from orchestrator.ledger import SweepDir

# Environment every task gets: no code path may reach the Hugging Face hub at run time.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Plan:
    """What a submit would do; `--dry-run --json` prints exactly this."""

    cells: list[Cell]
    todo: list[Cell]
    skipped_done: list[str]
    skipped_live: list[str]
    arrays: list[list[list[Cell]]]  # arrays -> tasks -> cells
    max_array_size: int | None
    # resources.concurrent_cells: cells one training loop trains together, K or `auto`
    concurrent_cells: int | str = 1

    @property
    def planned_k(self) -> int:
        """The K the loops are counted at: `auto` is chosen in each task, on its device, so
        a plan made here (no GPU, no torch) counts what a CPU task does: K = 1."""
        return 1 if self.concurrent_cells == AUTO else int(self.concurrent_cells)

    def concurrent_note(self) -> str:
        if self.concurrent_cells == AUTO:
            return (f"{AUTO} (resolved per task: 1 on CPU, from measured memory on a GPU); loops counted at K=1,"
                    " a GPU may pack more cells a loop")  # fmt: skip
        return f"{self.concurrent_cells} (set in the sweep)"

    def to_json(self) -> dict[str, Any]:
        k = self.planned_k
        return {
            "cells": len(self.cells),
            "to_submit": len(self.todo),
            "skipped_done": len(self.skipped_done),
            "skipped_live": len(self.skipped_live),
            "tasks": sum(len(a) for a in self.arrays),
            "max_array_size": self.max_array_size,
            "concurrent_cells": self.concurrent_cells,
            "concurrent_cells_planned": k,
            "concurrent_cells_note": self.concurrent_note(),
            "loops": sum(len(_loops(t, k)) for a in self.arrays for t in a),
            "arrays": [
                {
                    "task_count": len(a),
                    "cells": sum(len(t) for t in a),
                    "cells_per_task": max((len(t) for t in a), default=0),
                    # what K implies: the training loops a task runs (a loop trains up to K cells
                    # of one variant at once; jobs/run_cells.py) and the most cells any loop holds
                    "loops_per_task": max((len(_loops(t, k)) for t in a), default=0),
                    "cells_per_loop": max((len(g) for t in a for g in _loops(t, k)), default=0),
                    "llms": sorted({c.llm or "none" for t in a for c in t}),
                }
                for a in self.arrays
            ],
            "cell_ids": [c.cell_id for c in self.cells],
        }


def _loops(task: list[Cell], k: int) -> list[list[Cell]]:
    """The training loops of one task: its cells grouped by variant and setting, up to `k`
    a loop (the grouping jobs/run_cells.py applies; cells without an LLM train alone)."""
    loops: list[list[Cell]] = []
    by_key: dict[tuple[str, str], list[Cell]] = {}
    for cell in task:
        if cell.variant == "no_llm" or k == 1:
            loops.append([cell])
        else:
            by_key.setdefault((cell.variant, cell.settings_hash), []).append(cell)
    for members in by_key.values():
        loops += [members[i : i + k] for i in range(0, len(members), k)]
    return loops


def live_cell_ids(sweep: SweepDir) -> set[str]:
    """Cells whose task is pending or running according to the scheduler (one query).

    A task sacct does not list yet (it lags a fresh submission) counts as live: a second
    `submit` right after the first must not queue the same cells again."""
    from orchestrator.state.status import is_fresh, task_states

    live: set[str] = set()
    for record, state in task_states(sweep).items():
        if state.state in ("pending", "running") or (state.state == "unknown" and is_fresh(record)):
            live.update(record.cell_ids)
    return live


def plan_submission(spec: Any, sweep: SweepDir, cells: list[Cell], *, retry_failed: bool = True, only: set[str] | None = None) -> Plan:
    done = sweep.done_cell_ids()
    failed = sweep.failed_cell_ids()
    live = live_cell_ids(sweep) if sweep.submissions() else set()
    todo, skipped_done, skipped_live = [], [], []
    for cell in cells:
        if only is not None and cell.cell_id not in only:
            continue
        if cell.cell_id in done:
            skipped_done.append(cell.cell_id)
        elif cell.cell_id in live:
            skipped_live.append(cell.cell_id)
        elif cell.cell_id in failed and not retry_failed:
            continue
        else:
            todo.append(cell)
    return _plan(spec, cells, todo, skipped_done, skipped_live, ask_cluster=True)


def array_limit(spec: Any, *, ask_cluster: bool) -> int | None:
    """Tasks per array: the cluster's MaxArraySize, or the sweep's own smaller limit."""
    limits = [spec.resources.max_array_size] if spec.resources.max_array_size else []
    if spec.resources.executor == "slurm":
        from orchestrator.state.scheduler import SchedulerError, max_array_size

        try:
            limits.append(max_array_size())
        except SchedulerError:
            if ask_cluster:
                raise
            # planning on a machine without Slurm (a dry run on a laptop): arrays shown unsplit
    return min(limits) if limits else None


def _plan(spec: Any, cells: list[Cell], todo: list[Cell], skipped_done: list[str], skipped_live: list[str],
          *, ask_cluster: bool) -> Plan:
    tasks = pack(todo, spec.resources.cells_per_task)
    limit = array_limit(spec, ask_cluster=ask_cluster)
    arrays = split_arrays(tasks, limit) if limit else ([tasks] if tasks else [])
    return Plan(cells, todo, skipped_done, skipped_live, arrays, limit, spec.resources.concurrent_cells)


def _timeout_min(time_value: Any) -> int:
    if isinstance(time_value, (int, float)):
        return int(time_value)
    parts = [int(p) for p in str(time_value).replace("-", ":").split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    if len(parts) == 4:  # D-HH:MM:SS
        d, h, m, s = parts
        return d * 1440 + h * 60 + m + (1 if s else 0)
    h, m, s = parts
    return h * 60 + m + (1 if s else 0)


def slurm_parameters(resources: Any) -> dict[str, Any]:
    """Map the sweep's resources onto submitit's Slurm parameters."""
    params: dict[str, Any] = {
        "slurm_partition": resources.partition,
        "timeout_min": _timeout_min(resources.time),
        "cpus_per_task": resources.cpus_per_task,
        "slurm_array_parallelism": resources.array_parallelism,
        "slurm_signal_delay_s": resources.signal_delay_s,
        "slurm_setup": [
            *(f"export {k}={v}" for k, v in JOB_ENV.items()),
            # torch sizes its thread pool by the node's cores, not the task's CPUs: without
            # cgroup binding, array tasks sharing a node would oversubscribe it
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
            # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: without
            # this, each process submitit's srun starts could be bound to a single core
            "export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}",
        ],
        "stderr_to_stdout": True,
    }
    extra: dict[str, Any] = {"requeue": True}
    if resources.mem:
        extra["mem"] = resources.mem
    if resources.account:
        params["slurm_account"] = resources.account
    if resources.qos:
        params["slurm_qos"] = resources.qos
    if resources.gres:
        params["slurm_gres"] = resources.gres
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.processes_per_task > 1:
        # srun starts this many copies of the task on one node; jobs.run_cells joins them
        # into one torch process group (one process per GPU)
        params["nodes"] = 1
        params["tasks_per_node"] = resources.processes_per_task
        # A process that dies (an exception, the OOM killer) ends the others at once: on GPUs
        # they would otherwise wait in their next collective for the 30-min timeout
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    extra.update(resources.extra_sbatch or {})
    params["slurm_additional_parameters"] = extra
    return {k: v for k, v in params.items() if v is not None}


def _private_folder(path: Path) -> Path:
    # Job folders hold pickled callables: a pickle is code, so only the owner may read it.
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def submit_slurm(spec: Any, sweep: SweepDir, plan: Plan) -> dict[str, Any]:
    import submitit

    from jobs.run_cells import run_task

    folder = _private_folder(sweep.path / "jobs")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(name=f"aullm-{spec.name}", **slurm_parameters(spec.resources))
    array_ids: list[str] = []
    try:
        for array in plan.arrays:
            with executor.batch():
                jobs = [executor.submit(run_task, str(sweep.path), [c.cell_id for c in task]) for task in array]
            array_id = jobs[0].job_id.split("_")[0]
            array_ids.append(array_id)
            sweep.record_submission(
                {
                    "executor": "slurm",
                    "array_job_id": array_id,
                    "tasks": {str(i): [c.cell_id for c in task] for i, task in enumerate(array)},
                    # submitit sends a batch of one as a plain job ("123", not "123_0"): status
                    # must ask sacct for the id Slurm really gave each task
                    "job_ids": {str(i): job.job_id for i, job in enumerate(jobs)},
                    "submitted_at": time.time(),
                }
            )
    except BaseException:
        # A later sbatch failed (a QOS submit limit, say): the arrays already queued still
        # get their collector, then the error goes to the user.
        if array_ids:
            _, collector_error = _submit_collector_or_say_why(spec, sweep, folder, array_ids)
            if collector_error:
                print(f"aullm-grid: warning: {collector_error}", file=sys.stderr)
        _tighten_job_folders(folder)
        raise
    collector_id, collector_error = (
        _submit_collector_or_say_why(spec, sweep, folder, array_ids) if array_ids else (None, None)
    )
    _tighten_job_folders(folder)
    info: dict[str, Any] = {"array_job_ids": array_ids, "collector_job_id": collector_id}
    if collector_error:
        info["collector_error"] = collector_error
    return info


def _submit_collector_or_say_why(
    spec: Any, sweep: SweepDir, folder: Path, array_ids: list[str]
) -> tuple[str | None, str | None]:
    """(collector job id, None), or (None, why sbatch refused it). The arrays are queued either
    way, so a refused collector is the user's to know about, not a reason to fail the submit."""
    from submitit.core.utils import FailedSubmissionError, UncompletedJobError

    try:
        return _submit_collector(spec, sweep, folder, array_ids), None
    except (UncompletedJobError, FailedSubmissionError, OSError) as exc:
        reason = " ".join(str(exc).split())[:300]
        return None, f"collector job not submitted ({reason}); run `aullm-grid collect` once the arrays end"


def _submit_collector(spec: Any, sweep: SweepDir, folder: Path, array_ids: list[str]) -> str:
    """One job that collects the tables once every array has ended, however it ended."""
    import submitit

    from orchestrator.results.collect import collect_job

    collect_ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    params = slurm_parameters(spec.resources)
    params.pop("gpus_per_node", None)  # scoring and tables need no GPU, and one process
    params.pop("slurm_gres", None)
    params.pop("tasks_per_node", None)
    params["slurm_additional_parameters"] = {
        **params["slurm_additional_parameters"],
        "dependency": "afterany:" + ":".join(array_ids),
    }
    collect_ex.update_parameters(name=f"aullm-{spec.name}-collect", **params)
    collector = collect_ex.submit(collect_job, str(sweep.path))
    sweep.record_submission(
        {"executor": "slurm", "collector_job_id": collector.job_id, "after": array_ids, "submitted_at": time.time()}
    )
    return str(collector.job_id)


def _tighten_job_folders(folder: Path) -> None:
    """submitit creates each job's folder (pickle, sbatch script, logs) with the umask's mode;
    `jobs/` itself is 0700 already, so this is defence in depth for a copied or moved folder."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            os.chmod(entry, 0o700)


def submit_local(spec: Any, sweep: SweepDir, plan: Plan) -> dict[str, Any]:
    """Write the task list, then start a detached supervisor that runs it."""
    folder = _private_folder(sweep.path / "jobs")
    batch_id = f"local-{int(time.time() * 1000)}"
    tasks = [[c.cell_id for c in task] for array in plan.arrays for task in array]
    batch_file = folder / f"{batch_id}.json"
    processes = spec.resources.processes_per_task
    batch_file.write_text(
        json.dumps({"tasks": tasks, "workers": spec.resources.max_local_workers, "processes_per_task": processes})
    )
    log = open(sweep.path / "logs" / f"{batch_id}.supervisor.log", "ab")
    env = {**os.environ, **JOB_ENV, "OMP_NUM_THREADS": local_task_threads(spec.resources)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.local_supervisor", str(sweep.path), str(batch_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # survives the CLI; Ctrl-C in the terminal does not kill the sweep
    )
    sweep.record_submission(
        {"executor": "local", "batch_id": batch_id, "supervisor_pid": proc.pid, "host": os.uname().nodename,
         "tasks": {str(i): t for i, t in enumerate(tasks)}, "submitted_at": time.time()}
    )
    return {"batch_id": batch_id, "supervisor_pid": proc.pid}


def submit_debug(spec: Any, sweep: SweepDir, plan: Plan) -> dict[str, Any]:
    """Run every task in this process (submitit's DebugExecutor): for pdb, not for speed."""
    import submitit

    from jobs.run_cells import run_task

    executor = submitit.AutoExecutor(folder=_private_folder(sweep.path / "jobs") / "%j", cluster="debug")
    outcomes: dict[str, str] = {}
    for array in plan.arrays:
        for task in array:
            outcomes.update(executor.submit(run_task, str(sweep.path), [c.cell_id for c in task]).result())
    return {"outcomes": outcomes}


def preflight_datasets(spec: Any, cells: list[Cell], *, write_cache: bool = True) -> dict[str, int]:
    """Decode every frame of every dataset the cells use, once, BEFORE anything is written.

    A corrupt or empty frame, a sheet the readers reject, or a LOSO fold with no training
    or test clips is a UserInputError (one line naming the dataset field and the file)
    here, not a failed array task an hour later. Frames are decoded into a staging folder
    outside the sweep directory and moved into the frame cache only once every dataset is
    valid, so a bad dataset leaves the sweep directory untouched; the tasks then only read
    the warm cache (no two tasks decode the same dataset at once). `write_cache=False`
    (for `validate`) checks the same and writes nothing. Returns {dataset: clips}.
    """
    import shutil
    import tempfile

    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore, _cache_path
    from aullm.data.folds import loso_split
    from aullm.data.readers import read_dataset
    from aullm.errors import UserInputError

    needed = sorted({n for c in cells for n in (c.train_dataset, c.test_dataset) if n})
    loso_folds: dict[str, set[str]] = {}
    for c in cells:
        if c.kind == "loso":
            loso_folds.setdefault(c.dataset, set()).add(c.fold)
    cache_dir = Path(spec.cache_dir).expanduser()
    staging = Path(tempfile.mkdtemp(prefix="aullm-preflight-"))
    counts: dict[str, int] = {}
    try:
        for name in needed:
            ds = spec.datasets[name]
            try:
                samples = read_dataset(ds.layout, ds.root, sheet=ds.sheet, frames_dir=ds.frames_dir)
                if not samples:
                    raise UserInputError(f"no labelled clips in {ds.root}")
                for fold in sorted(loso_folds.get(name, ())):
                    split = loso_split(samples, fold, DATASET_AUS[ds.layout])
                    if not split.train or not split.test:
                        side = "training" if not split.train else "test"
                        raise UserInputError(f"LOSO fold '{fold}' has no {side} samples")
                # already cached by an earlier submit: the task-side read re-checks it
                if not _cache_path(cache_dir, name, sorted(samples, key=lambda s: s.key)).is_file():
                    ClipStore.load(samples, staging)
            except UserInputError as exc:
                raise spec.field_error(("datasets", name), " ".join(str(exc).split())) from None
            counts[name] = len(samples)
        staged = list(staging.iterdir())
        if staged and write_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for path in staged:
                # staging may be on another filesystem: copy beside the target, then an
                # atomic rename, so a task reading the cache never sees half a file
                tmp = cache_dir / f".{path.name}.{os.getpid()}.tmp"
                shutil.copyfile(path, tmp)
                os.replace(tmp, cache_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a cgroup or taskset may give it
    fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS
        return os.cpu_count() or 1


def local_task_threads(resources: Any) -> str:
    """OMP_NUM_THREADS of each local task process: the user's own value if set, else
    cpus_per_task, as a Slurm task gets. A CPU cell's floating-point sums depend on the
    thread count (oneDNN splits its reductions by thread), so a cell trained here matches
    the same cell trained on Slurm only with the same count."""
    return os.environ.get("OMP_NUM_THREADS", str(resources.cpus_per_task))


def local_oversubscription(resources: Any, tasks: int, cores: int) -> str | None:
    """Why a local sweep would run more threads at once than `cores`, or None. Each local
    task process runs `local_task_threads` threads, so the count is workers x processes x
    threads. Said, not refused: the sweep still runs, each task slower, and a laptop user
    may want exactly that."""
    if resources.executor != "local" or tasks == 0:
        return None
    try:
        threads = int(local_task_threads(resources)) or resources.cpus_per_task
    except ValueError:  # not a count: reckoned as cpus_per_task
        threads = resources.cpus_per_task
    workers, processes = min(resources.max_local_workers, tasks), resources.processes_per_task
    busy = workers * processes * threads
    if busy <= cores:
        return None
    return (f"the local executor will run {busy} threads at once ({workers} task(s) x {processes} process(es) x "
            f"{threads} thread(s)) on {cores} cores: they share the cores and each task runs slower; lower "
            "resources.max_local_workers or resources.cpus_per_task to fit")  # fmt: skip


def _warnings(spec: Any, plan: Plan) -> dict[str, Any]:
    tasks = sum(len(array) for array in plan.arrays)
    warning = local_oversubscription(spec.resources, tasks, usable_cores())
    return {"warnings": [warning]} if warning else {}


def result_warnings(result: dict[str, Any]) -> list[str]:
    """What a submit or retry says on stderr, one line each: a collector that could not be
    queued, a local sweep that oversubscribes the cores."""
    return ([result["collector_error"]] if result.get("collector_error") else []) + list(result.get("warnings", []))


def submit_sweep(spec: Any, sweep: SweepDir, cells: list[Cell], *, dry_run: bool = False,
                 retry_failed: bool = True, only: set[str] | None = None) -> dict[str, Any]:
    if spec.resources.processes_per_task > 1:
        from jobs.process_group import rendezvous_timeout

        rendezvous_timeout()  # the tasks read it from the environment they inherit: a bad value fails here, not in each task
    if dry_run:
        plan = plan_submission(spec, sweep, cells, retry_failed=retry_failed, only=only) if sweep.exists() else _fresh_plan(spec, cells)
        return {"dry_run": True, **plan.to_json(), **_warnings(spec, plan)}
    preflight_datasets(spec, cells)
    with sweep.lock():
        # the sweep file, so that commands given the sweep directory can re-read it
        source = Path(spec.source)
        sweep.write_manifest(spec, cells, sweep_file=str(source.resolve()) if source.is_file() else None)
        plan = plan_submission(spec, sweep, cells, retry_failed=retry_failed, only=only)
        if not plan.todo:
            return {"dry_run": False, "submitted": 0, **plan.to_json()}
        from orchestrator.tracking.store import ensure_group_runs, prepare_store

        # Create the MLflow store, the experiment and each group's parent run once, before
        # tasks race to do it: every cell run is then created under its group's parent.
        tracking = sweep.tracking_config()
        prepare_store(tracking, sweep.path)
        ensure_group_runs(tracking, sweep.path, {c.group_id: c.group_tags(spec.name) for c in cells})
        sweep.reset_attempts([c.cell_id for c in plan.todo])
        executor = spec.resources.executor
        if executor == "slurm":
            info = submit_slurm(spec, sweep, plan)
        elif executor == "local":
            info = submit_local(spec, sweep, plan)
        else:
            info = submit_debug(spec, sweep, plan)
    return {"dry_run": False, "submitted": len(plan.todo), **plan.to_json(), **info, **_warnings(spec, plan)}


def _fresh_plan(spec: Any, cells: list[Cell]) -> Plan:
    """Dry run of a sweep never submitted: nothing is done, nothing live, and nothing is written."""
    return _plan(spec, cells, list(cells), [], [], ask_cluster=False)


# -- retry and cancel ------------------------------------------------------------------


def retry_main(args: Any) -> int:
    """Re-submit failed or missing cells (or the named ones). Done cells are redone only with
    `--force`, into a new attempt: their result is moved aside, never overwritten."""
    from orchestrator.launch.prepare import check_compatible, check_same_cells, prepare
    from orchestrator.state.status import NEEDS_RETRY, cell_statuses, sweep_file_of

    from aullm.errors import UserInputError

    sweep_file = sweep_file_of(args.sweep)
    spec, _subjects, cells = prepare(sweep_file, getattr(args, "set", None) or ())
    sweep = SweepDir(spec.output_dir)
    if not sweep.exists():
        raise UserInputError(f"{args.sweep}: not submitted yet (no manifest in {sweep.path}); use `aullm-grid submit`")
    check_compatible(spec, sweep, cells)
    check_same_cells(spec, sweep, cells)
    known = {c.cell_id for c in cells}
    if args.cells:
        unknown = [c for c in args.cells if c not in known]
        if unknown:
            raise UserInputError(f"{args.sweep}: --cells: no cell '{unknown[0]}' in this sweep")
        only = set(args.cells)
    else:
        states = {s.cell_id: s.state for s in cell_statuses(sweep)}
        wanted = NEEDS_RETRY if args.failed else NEEDS_RETRY | {"not_submitted"}
        only = {cid for cid, st in states.items() if st in wanted}
    done = sweep.done_cell_ids()
    already_done = sorted(only & done)
    force = bool(getattr(args, "force", False))
    dry_run = bool(getattr(args, "dry_run", False))
    if not force:
        only -= done
    elif already_done and not dry_run:
        with sweep.lock():
            for cid in already_done:
                sweep.supersede_result(cid)
    result = submit_sweep(spec, sweep, cells, dry_run=dry_run, only=only) if only else {
        "dry_run": dry_run, "submitted": 0}  # fmt: skip
    for warning in result_warnings(result):
        print(f"aullm-grid: warning: {warning}", file=sys.stderr)
    payload = {"command": "retry", "sweep": args.sweep, "sweep_dir": str(sweep.path.resolve()),
               **{k: v for k, v in result.items() if k != "cell_ids"},
               "retried": sorted(only), "already_done": already_done, "forced": force and bool(already_done)}  # fmt: skip
    import shlex

    arg = shlex.quote(args.sweep)
    payload["next"] = [f"aullm-grid status {arg} --watch"] if payload.get("submitted") else []
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
        return 0
    verb = "would resubmit" if dry_run else "resubmitted"
    print(f"aullm-grid: {verb} {len(only)} cell{'s' if len(only) != 1 else ''} of {sweep.path}"
          + (f" in {result.get('tasks', '?')} tasks" if only else ""))  # fmt: skip
    if already_done and not force:
        shown = ", ".join(already_done[:5]) + (" ..." if len(already_done) > 5 else "")
        print(f"  already done, not resubmitted: {shown}; add --force to run them again as a new attempt "
              "(the present result is kept aside, not overwritten)")  # fmt: skip
    elif already_done:
        what = "would be moved" if dry_run else "moved"
        print(f"  {len(already_done)} done cells run again; their results {what} to {sweep.superseded_dir}")
    if not only:
        print("  nothing to resubmit")
    for step in payload["next"]:
        print(f"next: {step}")
    return 0


def cancel_main(args: Any) -> int:
    """Cancel every live job of the sweep: scancel its arrays and collector, stop local
    supervisors. On a terminal it asks first (`--yes` does not); `--dry-run` only lists."""
    import signal

    from orchestrator.state.status import pid_alive, resolve_sweep

    sweep = resolve_sweep(args.sweep)
    slurm_ids: list[str] = []
    local_pids: list[int] = []
    for sub in sweep.submissions():
        if sub.get("executor") == "slurm":
            slurm_ids += [str(x) for x in (sub.get("array_job_id"), sub.get("collector_job_id")) if x]
        elif sub.get("executor") == "local" and pid_alive(int(sub["supervisor_pid"])):
            local_pids.append(int(sub["supervisor_pid"]))
    payload: dict[str, Any] = {"command": "cancel", "sweep": args.sweep, "sweep_dir": str(sweep.path.resolve()),
                               "slurm_jobs": slurm_ids, "local_supervisors": local_pids,
                               "dry_run": bool(args.dry_run), "cancelled": False}  # fmt: skip
    what = f"{len(slurm_ids)} Slurm jobs ({', '.join(slurm_ids) or 'none'}) and {len(local_pids)} local supervisors"
    if args.dry_run or not (slurm_ids or local_pids):
        if args.json:
            print(json.dumps(payload, indent=2))
        else:
            print(f"{'would cancel' if args.dry_run else 'nothing to cancel:'} {what} of {sweep.path}")
        return 0
    if not args.yes and sys.stdin.isatty():
        answer = input(f"cancel {what} of {sweep.path}? Finished results stay. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not cancelled")
            return 1
    stopped = 0
    for pid in local_pids:
        try:  # the supervisor leads its own session: its tasks go with it
            os.killpg(pid, signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            pass
    if slurm_ids:
        from orchestrator.state.scheduler import cancel

        cancel(slurm_ids)
    payload["cancelled"] = True
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    import shlex

    print(f"cancelled {len(slurm_ids)} Slurm jobs and {stopped} local supervisors of {sweep.path}")
    print(f"next: aullm-grid retry {shlex.quote(args.sweep)}   (runs the cells that did not finish)")
    return 0


def sweep_settled(sweep: SweepDir, summary: dict[str, Any]) -> bool:
    """No cell pending or running, and no local supervisor still at work (it runs the
    collector after its last task): what `submit --wait` waits for."""
    from orchestrator.state.status import pid_alive

    counts = summary["counts"]
    if counts["pending"] or counts["running"]:
        return False
    return not any(
        sub.get("executor") == "local" and pid_alive(int(sub["supervisor_pid"])) for sub in sweep.submissions()
    )


def wait_for_sweep(sweep: SweepDir, *, poll_s: float = 3.0, timeout_s: float | None = None) -> dict[str, Any]:
    """Block until no cell is pending or running and the local supervisors are gone."""
    from orchestrator.state.status import cell_statuses, summarize

    t0 = time.time()
    while True:
        summary = summarize(cell_statuses(sweep))
        if sweep_settled(sweep, summary):
            return summary
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return summary
        time.sleep(poll_s)
