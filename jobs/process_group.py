"""The processes of one array task, and the few things they must agree on.

A sweep with `resources.processes_per_task: N` gets N processes per array task on one
node (srun starts them on Slurm, submitit's LocalExecutor on a laptop), one per GPU.
`join_task_processes` turns what submitit knows about them into a torch process group
(the env:// variables Accelerate reads, a TCPStore on a port rank 0 is given by the OS,
then `init_process_group`).

How the processes share the work: each one trains every cell of the pack on the whole
training split (one full batch, as the paper), with the same seeds, so they compute the
same gradients and DistributedDataParallel's average is that very gradient. A cell's
numbers therefore do not depend on how many processes its task got. Splitting the batch
instead would change the algorithm: BatchNorm would see a shard instead of the batch
(SyncBatchNorm is GPU-only), and dropout masks would differ.

Only rank 0 writes to the sweep directory and MLflow. Every choice that decides which
collective comes next (train or skip a cell, stop for a preemption, how a cell ended) is
made once and shared, so no rank is left waiting in a collective the others never join.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Variables that describe some other distributed job (the shell that ran `submit`, whose
# environment sbatch exports): a task takes its own from Slurm or submitit, never these.
INHERITED_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Collectives wait while rank 0 alone writes results or talks to MLflow (whose file locks
# may wait up to 10 minutes): the group must outlast that, or a slow disk kills a task.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long the processes of a task wait for each other when they start (rank 0 publishing
# its store's port, every rank checking in): a rank that never comes fails the task within
# minutes instead of holding its GPUs for COLLECTIVE_TIMEOUT.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)
# The environment variable that replaces it (seconds), for nodes whose processes take longer
# to start (a slow shared filesystem, a long CUDA init); the tests shorten it.
RENDEZVOUS_TIMEOUT_VAR = "AULLM_RENDEZVOUS_TIMEOUT_S"

# Test-only: the rank named here exits with code 3 before it joins its task's processes (a
# process dead at start: an import error, a CUDA init that failed). tests/test_multiprocess.py
# sets it; never set in a real run.
EXIT_BEFORE_RENDEZVOUS_FOR_TESTS = "AULLM_TEST_EXIT_BEFORE_RENDEZVOUS"


class RendezvousError(TimeoutError):
    """The processes of a task did not all arrive within the rendezvous timeout."""

    def __init__(self, message: str, *, rank: int, world_size: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size


def rendezvous_timeout() -> datetime.timedelta:
    """RENDEZVOUS_TIMEOUT, or the seconds in $AULLM_RENDEZVOUS_TIMEOUT_S (checked at submit too)."""
    from aullm.errors import UserInputError

    value = os.environ.get(RENDEZVOUS_TIMEOUT_VAR, "").strip()
    if not value:
        return RENDEZVOUS_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UserInputError(f"environment variable {RENDEZVOUS_TIMEOUT_VAR}={value!r}: allowed is a number of seconds above 0")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class TaskProcesses:
    """This process's place in its array task. The default is a task of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes results, checkpoints and MLflow runs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, value: T) -> T:
        """Rank 0's `value`, on every rank (what the other ranks pass is ignored)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box: list[Any] = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def highest(self, value: int) -> int:
        """The largest of every rank's `value` (one small all-reduce)."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def leave(self) -> None:
        """Close the process group (a clean exit instead of torch's warning at shutdown)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def join_task_processes() -> TaskProcesses:
    """Join the other processes of this array task; a lone process joins nothing.

    Outside a submitit job (`python -m jobs.run_cells` by hand) it is a task of one.
    """
    import submitit

    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:
        return TaskProcesses()
    for name in INHERITED_DIST_VARS:
        os.environ.pop(name, None)
    if job_env.num_tasks <= 1:
        return TaskProcesses()
    if job_env.num_nodes > 1:
        raise RuntimeError(f"a task's processes must share one node; this job has {job_env.num_nodes} nodes")
    if os.environ.get(EXIT_BEFORE_RENDEZVOUS_FOR_TESTS) == str(job_env.global_rank):
        os._exit(3)
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    # MASTER_ADDR is the job's first node, RANK/WORLD_SIZE/LOCAL_RANK from Slurm; the port is
    # rank 0's store's, found through the job folder (`rendezvous_store`).
    # CUDA_VISIBLE_DEVICES is left as Slurm set it: replacing it by the bare local rank
    # would pick another job's GPU on a node without device cgroups; Accelerate picks
    # device local_rank among the visible ones instead.
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    timeout = rendezvous_timeout()
    store = rendezvous_store(Path(job_env.paths.folder), rendezvous_key(str(job_env.job_id)),
                             rank=env.rank, world_size=env.world_size, host=env.master_addr, timeout=timeout)  # fmt: skip
    meet(store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    os.environ["MASTER_PORT"] = str(store.port)  # the port really used, for whatever reads the variable
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        # NCCL for the gradients on the GPUs, gloo for the small CPU messages of `share`/`gather`
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    store.set_timeout(COLLECTIVE_TIMEOUT)  # from here on, waits are those of the collectives
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=COLLECTIVE_TIMEOUT)  # fmt: skip
    return TaskProcesses(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank)


def rendezvous_key(job_id: str) -> str:
    """The name of this attempt's rendezvous: the job id (array tasks: `<array>_<task>`) and
    Slurm's restart count, so a requeued task never reads its previous attempt's port."""
    return f"{job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}.rendezvous"


def rendezvous_store(folder: Path, key: str, *, rank: int, world_size: int, host: str,
                     timeout: datetime.timedelta = RENDEZVOUS_TIMEOUT) -> Any:  # fmt: skip
    """The task's TCPStore, through which its processes find each other.

    Rank 0 listens on a port the OS hands out (free by construction) and writes it to
    `folder/<key>.port`; the other ranks read that file and connect. Not a port drawn from
    the job id, submitit's default: its range (20000-60000) overlaps Linux's ephemeral ports,
    so on a busy node the port could already be taken. Rank 0 then died of EADDRINUSE and
    the other ranks waited for it until the collective timeout (seen on this project's
    2-core machine under load). The processes of a task share one node, hence the folder.
    """
    import torch.distributed as dist

    path = folder / f"{key}.port"
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(str(store.port))
        os.replace(tmp, path)  # the others never read half a number
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 of this task did not publish its port in {path} "
                               f"within {timeout.total_seconds():.0f} s")  # fmt: skip
        time.sleep(0.1)
    port = int(path.read_text())
    return dist.TCPStore(host, port, world_size, False, timeout=timeout)


def meet(store: Any, *, rank: int, world_size: int, timeout: datetime.timedelta = RENDEZVOUS_TIMEOUT) -> None:
    """Check in on the task's store, then wait until every rank has: a RendezvousError naming
    the ranks that never came, after `timeout`.

    Without it rank 0 waited for a missing rank inside `init_process_group`, under the store's
    collective timeout (30 min, holding the task's GPUs), and torch's error named a store key,
    not the rank. On Slurm a rank that dies at start ends the step at once (srun's
    --kill-on-bad-exit); this is the bound everywhere else (the local executor, a rank that
    hangs instead of dying).
    """
    from torch.distributed import DistStoreError

    store.set(f"arrived/{rank}", str(os.getpid()))
    try:
        store.wait([f"arrived/{r}" for r in range(world_size)], timeout)
    except DistStoreError:
        missing = [r for r in range(world_size) if not store.check([f"arrived/{r}"])]
        raise RendezvousError(f"rank {rank}: rank(s) {', '.join(map(str, missing))} of this task's {world_size} "
                              f"processes did not start within {timeout.total_seconds():.0f} s",
                              rank=rank, world_size=world_size) from None  # fmt: skip
