"""Helpers shared by test files: demo-shaped sweeps for the end-to-end grid tests (local executor
and the dev Slurm cluster), what a finished sweep directory must hold, and hand-made sweep
directories for the collector tests.

    assets = build_assets(tmp_path_factory.mktemp("grid"))       # synthetic data + tiny LLM, once
    sweep_file = write_sweep(tmp / "sweep.yaml", assets, output_dir=tmp / "out", executor="slurm")
    result = run_cli("submit", sweep_file, "--json")              # the real `aullm-grid`, a subprocess
    summary = status_json(sweep_file)

Everything here is real: the synthetic datasets are written in the official on-disk
layouts and read by the real readers, the tiny Qwen2 is loaded by `from_pretrained`,
and the CLI runs as a user would run it (`python -m orchestrator.cli`, the same
interpreter as the test, so the job's python is the venv's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = 3  # per dataset: 3 LOSO folds each
# Environment of every CLI call: no hub access, and the checkout importable even when
# the package is not installed (the editable install makes this a no-op).
CLI_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
}


@dataclass(frozen=True)
class GridAssets:
    """Inputs of a demo-shaped sweep: dataset roots and the tiny LLM folder."""

    casme2: Path
    samm: Path
    llm: Path


def build_assets(root: Path, *, subjects: int = SUBJECTS) -> GridAssets:
    """Synthetic CASME II and SAMM (`subjects` each) and a tiny Qwen2, under `root`."""
    from aullm.data.synth import write_synthetic
    from aullm.model.tiny import build_tiny_llm

    root = Path(root)
    casme2 = write_synthetic("casme2", root / "data" / "casme2", subjects=subjects, seed=0)
    samm = write_synthetic("samm", root / "data" / "samm", subjects=subjects, seed=1)
    llm = build_tiny_llm(root / "models" / "tiny-qwen2", seed=0)
    return GridAssets(casme2=Path(casme2), samm=Path(samm), llm=Path(llm))


def sweep_dict(
    assets: GridAssets,
    *,
    output_dir: Path,
    name: str = "grid-e2e",
    executor: str = "slurm",
    cells_per_task: int = 3,
    array_parallelism: int | None = 2,
    max_local_workers: int = 2,
    epochs: int = 2,
    mem: str | None = "3000M",
    time_min: int = 20,
    partition: str | None = "debug",
    cross_domain_variants: tuple[str, ...] = ("all", "no_llm"),
    loso_variants: tuple[str, ...] = ("all", "no_llm"),
    max_array_size: int | None = None,
    processes_per_task: int = 1,
) -> dict[str, Any]:
    """The demo sweep's shape (sweeps/demo.yaml), small enough for a 2-core test machine.

    Cells: LOSO on both datasets x `loso_variants` (no_llm gives one cell per fold),
    plus casme2 -> samm x `cross_domain_variants`: 3*2 + 3*2 + 2 = 14 by default.
    """
    resources: dict[str, Any] = {
        "executor": executor,
        "cells_per_task": cells_per_task,
        "max_local_workers": max_local_workers,
        "time": time_min,
        "cpus_per_task": 1,
    }
    if processes_per_task != 1:
        resources["processes_per_task"] = processes_per_task
    if executor == "slurm":
        resources.update({"partition": partition, "mem": mem, "array_parallelism": array_parallelism})
        if max_array_size is not None:
            resources["max_array_size"] = max_array_size
    grid: list[dict[str, Any]] = [{"protocol": "loso", "datasets": ["casme2", "samm"], "variants": list(loso_variants)}]
    if cross_domain_variants:
        grid.append(
            {"protocol": "cross_domain", "pairs": [{"train": "casme2", "test": "samm"}], "variants": list(cross_domain_variants)}
        )
    return {
        "name": name,
        "description": "end-to-end grid test (synthetic data, tiny Qwen2)",
        "output_dir": str(output_dir),
        "datasets": {"casme2": {"root": str(assets.casme2)}, "samm": {"root": str(assets.samm)}},
        "llms": {"tiny-qwen2": {"path": str(assets.llm)}},
        "seeds": [1],
        "grid": grid,
        # lr raised as in demo.yaml; fp32 so a CPU run is bit-for-bit the same on both executors
        "training": {"epochs": epochs, "lr": 1.0e-3, "batch_size": 256, "precision": "fp32"},
        "resources": {k: v for k, v in resources.items() if v is not None},
        "tracking": {"uri": None},
    }


def write_sweep(path: Path, assets: GridAssets, **kwargs: Any) -> Path:
    """Write `sweep_dict(assets, **kwargs)` as YAML to `path`; return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep_dict(assets, **kwargs), sort_keys=False))
    return path


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.stdout)

    def check(self) -> CliResult:
        if self.returncode != 0:
            raise AssertionError(f"aullm-grid exited {self.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")
        return self


def run_cli(*args: str | os.PathLike[str], timeout_s: float = 600, cwd: Path | None = None) -> CliResult:
    """Run `aullm-grid ARGS...` as a user would: a fresh process, its wall time measured."""
    env = {**os.environ, **CLI_ENV}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=str(cwd or REPO),
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def status_json(sweep_file: Path) -> dict[str, Any]:
    """`aullm-grid status SWEEP --json`, parsed."""
    return run_cli("status", sweep_file, "--json", timeout_s=120).check().json()


def wait_all_finished(sweep_dir: Path, *, timeout_s: float = 600, poll_s: float = 3.0) -> dict[str, Any]:
    """Poll the sweep's status until no cell is pending or running; return the last summary.

    Polls in this process (the same `cell_statuses` as `status --json`, one sacct each):
    a CLI process per poll would cost the 2-core machine more CPU than the jobs it waits for.
    """
    from orchestrator.ledger import SweepDir
    from orchestrator.state.status import cell_statuses, summarize

    sweep = SweepDir(sweep_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        summary = summarize(cell_statuses(sweep))
        counts = summary["counts"]
        if counts["pending"] == 0 and counts["running"] == 0:
            return summary
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout_s:.0f} s the sweep in {sweep_dir} is still not finished: {counts}")
        time.sleep(poll_s)


def fail_unless_the_node_fits(cluster_cpus: int, processes: int) -> None:
    """A task of `processes` one-CPU processes must fit the dev node, or the test says why it cannot run."""
    import pytest

    if cluster_cpus < processes:
        pytest.fail(f"the dev node has {cluster_cpus} CPUs; a task of {processes} one-CPU processes must fit")


def submit_and_wait(sweep_file: Path, *, timeout_s: float = 600) -> dict[str, Any]:
    """`aullm-grid submit SWEEP --json`, then wait for every cell; the sweep's jobs are cancelled
    afterwards however it went, so the shared cluster is left quiet. Returns the submit result."""
    out_dir = load_output_dir(sweep_file)
    try:
        submitted = run_cli("submit", sweep_file, "--json").check().json()
        wait_all_finished(out_dir, timeout_s=timeout_s)
    finally:
        run_cli("cancel", sweep_file, timeout_s=60)
    return submitted


def array_submission_script(out_dir: Path, submitted: dict[str, Any]) -> str:
    """The sbatch script of a sweep submitted as one array (what Slurm was asked for)."""
    (array_id,) = submitted["array_job_ids"]
    return (Path(out_dir) / "jobs" / array_id / f"{array_id}_submission.sh").read_text()


def load_output_dir(sweep_file: Path) -> Path:
    from orchestrator.sweep.spec import load_sweep

    return Path(load_sweep(str(sweep_file)).output_dir)


def result_files(sweep_dir: Path) -> list[Path]:
    """Every committed result file (temp files of an atomic write start with a dot)."""
    return sorted(p for p in (Path(sweep_dir) / "results").glob("*.json") if not p.name.startswith("."))


def cell_predictions(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """cell_id -> {sample_keys, probs (ndarray), labels (ndarray)} from the result files."""
    out: dict[str, dict[str, Any]] = {}
    for path in result_files(sweep_dir):
        payload = json.loads(path.read_text())
        preds = payload["predictions"]
        out[payload["cell_id"]] = {
            "sample_keys": list(preds["sample_keys"]),
            "probs": np.asarray(preds["probs"], dtype=np.float64),
            "labels": np.asarray(preds["labels"]),
            "status": payload["status"],
        }
    return out


def manifest_cell_ids(sweep_dir: Path) -> list[str]:
    return [c["cell_id"] for c in json.loads((Path(sweep_dir) / "manifest.json").read_text())["cells"]]


def assert_every_cell_done_once(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every manifest cell has exactly one result file, done; no temp file or checkpoint is
    left behind. Returns cell_id -> result payload for the caller's own checks."""
    cell_ids = manifest_cell_ids(out_dir)
    payloads = {p.stem: json.loads(p.read_text()) for p in result_files(out_dir)}
    assert sorted(payloads) == sorted(cell_ids)
    assert {p["status"] for p in payloads.values()} == {"done"}, {c: p.get("error") for c, p in payloads.items()}
    assert not [p for p in (out_dir / "results").iterdir() if p.name.startswith(".")]
    checkpoints = out_dir / "checkpoints"
    assert not (checkpoints.is_dir() and list(checkpoints.iterdir())), list(checkpoints.iterdir())
    return payloads


# The line a training cell prints each epoch (jobs/run_cells.py); fault tests wait for it.
EPOCH_LINE = re.compile(r"aullm-grid: cell (\S+) epoch (\d+) ")


def epochs_reported(task_logs: list[Path]) -> dict[str, int]:
    """cell_id -> highest epoch the given task logs report (a log being written may be torn)."""
    seen: dict[str, int] = {}
    for log in task_logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        for cid, epoch in EPOCH_LINE.findall(text):
            seen[cid] = max(seen.get(cid, -1), int(epoch))
    return seen


def write_hand_sweep(root: Path, cells: list[Any], results: dict[str, dict[str, Any]], *,
                     uri: str | None = None, experiment: str = "hand") -> Any:
    """A sweep directory written by hand (manifest + result files) for the collector tests:
    the samm and casme2 datasets, MLflow at `uri` (None: the embedded store)."""
    from orchestrator.ledger import SweepDir

    sweep = SweepDir(root)
    spec = {"name": "hand", "datasets": {"samm": {"layout": "samm", "root": "/data/samm"},
                                         "casme2": {"layout": "casme2", "root": "/data/casme2"}},
            "tracking": {"uri": uri, "experiment": experiment}}  # fmt: skip
    sweep.write_manifest(spec, cells)
    for cid, payload in results.items():
        sweep.write_result(cid, payload)
    return sweep


# ---------------------------------------------------------------- shared across test modules
#
# The local run of the demo-shaped sweep is both a test of its own (test_grid_local.py)
# and the reference the Slurm run must reproduce (test_grid_slurm.py). Pytest fixtures
# are per module, so the run is memoised here: one per test process, whichever module
# asks first.

_SHARED: dict[str, Any] = {}


def shared_assets(tmp_root_factory: Any) -> GridAssets:
    """`build_assets` once per test process (`tmp_root_factory`: pytest's tmp_path_factory)."""
    if "assets" not in _SHARED:
        _SHARED["assets"] = build_assets(tmp_root_factory.mktemp("grid-assets"))
    return _SHARED["assets"]


@dataclass(frozen=True)
class LocalRun:
    """The demo-shaped sweep, run by the local executor with `submit --wait`."""

    sweep_file: Path
    out_dir: Path
    submit: CliResult


def shared_local_run(tmp_root_factory: Any) -> LocalRun:
    """Run the default `sweep_dict` with executor local once per test process."""
    if "local" not in _SHARED:
        assets = shared_assets(tmp_root_factory)
        root = tmp_root_factory.mktemp("grid-local")
        out_dir = root / "out"
        sweep_file = write_sweep(root / "sweep.yaml", assets, output_dir=out_dir, name="grid-e2e-local", executor="local")
        submit = run_cli("submit", sweep_file, "--wait", timeout_s=900)
        _SHARED["local"] = LocalRun(sweep_file, out_dir, submit)
    return _SHARED["local"]


TWO_FOLDS = ["sub01", "sub02"]  # of the 3-subject synthetic CASME II
TWO_VARIANTS = ["all", "f_mid"]  # LoRA (through DDP or ZeRO-2 in those tests); f_mid leaves F_high's layer without a gradient


def two_fold_sweep(assets: GridAssets, root: Path, *, executor: str, processes: int = 1, epochs: int = 2,
                   folds: list[str] = TWO_FOLDS, variants: list[str] = TWO_VARIANTS, cells_per_task: int = 2,
                   name: str = "two-fold", mem: str = "3500M", training: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """CASME II LOSO over `folds` x `variants` (by default TWO_FOLDS x TWO_VARIANTS: 4 cells,
    2 per task, one task at a time), written to root/sweep.yaml: the sweep of the multi-process
    and DeepSpeed end-to-end tests; `training` is merged into its training section."""
    spec = sweep_dict(assets, output_dir=root / "out", name=name, executor=executor, cells_per_task=cells_per_task,
                      array_parallelism=1, max_local_workers=1, epochs=epochs, mem=mem, time_min=20,
                      cross_domain_variants=(), processes_per_task=processes)  # fmt: skip
    spec["datasets"]["casme2"]["folds"] = list(folds)
    spec["grid"] = [{"protocol": "loso", "datasets": ["casme2"], "variants": list(variants)}]
    spec["training"].update(training or {})
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def shared_two_fold_reference(tmp_root_factory: Any) -> Path:
    """The output folder of `two_fold_sweep` trained in one process (the debug executor, inside
    the CLI), once per test process: the reference the multi-process and DeepSpeed tasks must
    equal. Its callers run with OMP_NUM_THREADS=1 (thread counts change float sums)."""
    if os.environ.get("OMP_NUM_THREADS") != "1":
        raise RuntimeError("shared_two_fold_reference: set OMP_NUM_THREADS=1 first (one thread, as the tasks compared to it)")
    if "two-fold" not in _SHARED:
        sweep = two_fold_sweep(shared_assets(tmp_root_factory), tmp_root_factory.mktemp("two-fold-reference"),
                               executor="debug", name="two-fold-reference")  # fmt: skip
        run_cli("submit", sweep, "--json", timeout_s=900).check()
        out = sweep.parent / "out"
        payloads = assert_every_cell_done_once(out)
        assert len(payloads) == len(TWO_FOLDS) * len(TWO_VARIANTS)
        assert {p["world_size"] for p in payloads.values()} == {1}
        _SHARED["two-fold"] = out
    return _SHARED["two-fold"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block, so every run in it sums in one reduction order;
    the count before it is restored after, or each test module after it trains on one core."""
    import torch  # not at the top: most users of this module never train in-process

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
