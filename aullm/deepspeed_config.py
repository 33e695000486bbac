"""A DeepSpeed JSON config, read and checked against the sweep that uses it.

One module for both sides: `validate`/`submit` call `check_config` (and `probe` it
through DeepSpeed itself, in a child process) so a config that cannot work is refused in
seconds, and the trainer calls `fill_auto` on the node with the very same rules.

What "fits the sweep" means here follows how a task trains (jobs/process_group.py):
every process trains the whole batch of `batch_size` clips, so DeepSpeed's micro-batch
per process is `batch_size` and its global batch is `batch_size x processes`; the trainer
builds its own Adam and steps once per batch; precision comes from `training.precision`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from aullm.errors import UserInputError

# ZeRO-3 partitions the parameters themselves: the trainer reads, copies and resets them
# in place between cells (LoRA reset, checkpoints, BatchNorm statistics), which ZeRO-3's
# gathered views would not allow without rewriting those paths.
SUPPORTED_ZERO_STAGES = (0, 1, 2)
# Sections that would make DeepSpeed build its own optimizer or schedule: the trainer
# passes its torch Adam (the paper's), and Accelerate refuses both at once.
_OWNED_BY_TRAINER = ("optimizer", "scheduler")
# A child process imports DeepSpeed (5 s, plus torch) so the CLI stays light and
# DeepSpeed's log lines never reach the user's terminal.
PROBE_TIMEOUT_S = 180


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; a one-line UserInputError when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"training: field 'deepspeed': config file '{path}' does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(ds, dict):
        raise UserInputError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    return ds


def _bad(path: Path | str, field: str, value: Any, allowed: str) -> UserInputError:
    return UserInputError(f"{path}: field '{field}': {json.dumps(value)} {allowed}")


def check_config(ds: dict[str, Any], *, path: Path | str, batch_size: int, precision: str, processes: int) -> None:
    """Refuse, in one line naming the file and field, what this trainer cannot run."""
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise _bad(path, "zero_optimization", zero, "must be an object")
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise _bad(path, "zero_optimization.stage", stage, "is not supported here; allowed: 0, 1, 2 (zero2 is shipped)")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), dict) else zero.get(key)
        if device not in (None, "none"):
            raise _bad(path, f"zero_optimization.{key}", zero.get(key), "is not supported here (it needs DeepSpeed's own CPU Adam); remove it")
    for key in _OWNED_BY_TRAINER:
        if key in ds:
            raise _bad(path, key, ds[key], "is not allowed: the trainer builds its own Adam and constant lr; remove the section")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and micro != batch_size:
        raise _bad(path, "train_micro_batch_size_per_gpu", micro,
                   f"must be \"auto\" or {batch_size} (training.batch_size: every process trains the whole batch)")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if accumulation not in ("auto", 1):
        raise _bad(path, "gradient_accumulation_steps", accumulation, "must be \"auto\" or 1 (one optimizer step per batch)")
    total = ds.get("train_batch_size", "auto")
    if total != "auto" and total != batch_size * processes:
        raise _bad(path, "train_batch_size", total,
                   f"must be \"auto\" or {batch_size * processes} (batch_size {batch_size} x processes_per_task {processes})")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping != "auto" and not (isinstance(clipping, (int, float)) and not isinstance(clipping, bool) and clipping >= 0):
        raise _bad(path, "gradient_clipping", clipping, "must be \"auto\" (no clipping, as the paper) or a number >= 0")
    _check_precision(ds, path=path, precision=precision)


def _check_precision(ds: dict[str, Any], *, path: Path | str, precision: str) -> None:
    fp16 = ds.get("fp16") or {}
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise _bad(path, "fp16.enabled", fp16.get("enabled"), "is not supported here (bf16 or fp32, set by training.precision)")
    bf16 = ds.get("bf16") or {}
    enabled = bf16.get("enabled", "auto") if isinstance(bf16, dict) else bf16
    if enabled not in ("auto", True, False):
        raise _bad(path, "bf16.enabled", enabled, "must be \"auto\", true or false")
    if enabled is True and precision == "fp32":
        raise _bad(path, "bf16.enabled", enabled, "contradicts training.precision fp32; use \"auto\"")
    if enabled is False and precision == "bf16":
        raise _bad(path, "bf16.enabled", enabled, "contradicts training.precision bf16; use \"auto\"")


def fill_auto(ds: dict[str, Any], *, batch_size: int, processes: int, bf16: bool) -> dict[str, Any]:
    """A copy of `ds` with every "auto" this trainer knows replaced by its value: without
    a dataloader to inspect, Accelerate cannot infer the batch sizes itself."""
    ds = json.loads(json.dumps(ds))
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = batch_size * processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 0.0  # the paper does not clip
    if not isinstance(ds.get("bf16"), dict):
        ds["bf16"] = {"enabled": ds.get("bf16", "auto")}
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    return ds


_PROBE = """
import json, sys
try:
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
except Exception as exc:
    print(json.dumps({"stage": "import", "error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
try:
    DeepSpeedConfig(json.loads(sys.argv[1]))
except BaseException as exc:
    print(json.dumps({"stage": "parse", "error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
print(json.dumps({"stage": "ok", "version": deepspeed.__version__}))
"""


def probe(ds: dict[str, Any], *, path: Path | str, batch_size: int) -> str:
    """Import DeepSpeed and parse the filled config with DeepSpeed's own parser, in a child
    process; return DeepSpeed's version or raise a one-line UserInputError."""
    # The child has no process group, so DeepSpeed counts one process: give it that shape.
    filled = fill_auto(ds, batch_size=batch_size, processes=1, bf16=False)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(filled)], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserInputError(f"importing DeepSpeed took over {PROBE_TIMEOUT_S} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    answer = json.loads(lines[-1]) if lines else {"stage": "import", "error": _last_line(proc.stderr) or f"exit {proc.returncode}"}
    if answer["stage"] == "import":
        raise UserInputError(f"DeepSpeed does not import here ({_one_line(answer['error'])})")
    if answer["stage"] == "parse":
        raise UserInputError(f"{path}: DeepSpeed rejects the config: {_one_line(answer['error'])}")
    return str(answer["version"])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _one_line(text: str) -> str:
    """Pydantic's and DeepSpeed's messages span lines: keep them readable on one."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip() and "errors.pydantic.dev" not in part)
