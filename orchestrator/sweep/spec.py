"""The sweep file: its schema, how it is read, and how its paths are checked.

A sweep file (YAML) names the datasets, the LLMs, the training settings, the cluster
resources, and a `grid`: a list of blocks whose union is the set of cells to train.
Blocks keep the paper's irregular shape explicit (all variants on CASME II and SAMM,
only `all` cross-domain and on 4DME, and a no-LLM baseline that is not multiplied by
LLMs) instead of one cartesian product with exceptions.

`load_sweep(path)` checks everything that can be checked from the file alone and turns
every problem into a one-line `UserInputError` that names the file, the dotted field,
the value and what is allowed. `validate_paths(spec)` then checks the filesystem
(dataset roots and sheets, model folders, fold subsets) and returns the subjects of
each dataset. Both are cheap: no torch, transformers, mlflow or submitit here.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from aullm.constants import CONCURRENT_AUTO as AUTO
from aullm.constants import DATASETS, MAX_CONCURRENT_CELLS, VARIANTS, VARIANTS_WITHOUT_LLM
from aullm.errors import UserInputError
from orchestrator.sweep import paths, profiles
from orchestrator.sweep import settings as _settings

EXECUTORS: tuple[str, ...] = ("slurm", "local", "debug")
PROTOCOLS: tuple[str, ...] = ("loso", "cross_domain")
# Cell ids use "none" for the LLM of a no-LLM cell, so no LLM may be called that.
RESERVED_LLM_NAMES = frozenset({"none"})
# Shipped DeepSpeed configs, addressable by name (`deepspeed: zero2`).
_JOB_CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

# Names end up in cell ids, file names and MLflow tags: keep them lowercase (no
# collisions on case-insensitive filesystems) and free of the "__" id separator.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")

MAX_CPUS_PER_TASK = 1024
MAX_GPUS_PER_NODE = 64
MAX_TIME_MIN = 366 * 24 * 60
MAX_MEM_MB = 64 * 1024 * 1024  # 64 TiB: anything above is a typo
# A block's settings: (label, hash, resolved training fields), the default setting's label ''.
SettingsList = list[tuple[str, str, dict[str, Any]]]


# ---------------------------------------------------------------- value helpers


class SpecFieldError(Exception):
    """A problem found after field validation (cross references between fields).

    Deliberately not a ValueError: pydantic lets it through unwrapped, so it keeps the
    exact field path instead of being reported at the top of the model.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _unset_error(exc: paths.UnsetVariable) -> PydanticCustomError:
    return PydanticCustomError(
        "env_unset", f"environment variable {exc.var} is not set (export it, or write ${{{exc.var}:-default}})"
    )


def expand_env(text: str) -> str:
    """`paths.expand_env`, with an unset variable reported as a field error."""
    try:
        return paths.expand_env(text)
    except paths.UnsetVariable as exc:
        raise _unset_error(exc) from None


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context or {}
    base = context.get("base_dir")
    return Path(base) if base is not None else None


def _local_path(text: str, info: ValidationInfo) -> str:
    """Env-expand, `~`-expand and anchor a relative path at the sweep file's folder."""
    try:
        return paths.anchored_path(text, _base_dir(info))
    except paths.UnsetVariable as exc:
        raise _unset_error(exc) from None


def parse_minutes(value: Any) -> int:
    """Slurm-style time limit -> whole minutes: 90, '90', '01:30:00', '1-00:00:00'."""
    if isinstance(value, bool):
        raise PydanticCustomError("time", "expected minutes (e.g. 240) or HH:MM:SS (e.g. 04:00:00), got true/false")
    if isinstance(value, int):
        minutes = value
    elif isinstance(value, float) and value.is_integer():
        minutes = int(value)
    elif isinstance(value, str):
        text = value.strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
        if text.isdigit():
            minutes = int(text)
        elif match:
            days, hours, mins, secs = (int(g) if g else 0 for g in match.groups())
            if mins >= 60 or secs >= 60:
                raise PydanticCustomError("time", f"'{value}' has minutes or seconds >= 60")
            minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
        else:
            raise PydanticCustomError(
                "time", f"'{value}' is not a time limit; use minutes (240) or HH:MM:SS (04:00:00) or D-HH:MM:SS"
            )
    else:
        raise PydanticCustomError("time", f"expected minutes or HH:MM:SS, got {_kind(value)}")
    if minutes <= 0:
        raise PydanticCustomError("time", f"{value!r} must be a positive time limit")
    if minutes > MAX_TIME_MIN:
        raise PydanticCustomError("time", f"{value!r} is longer than a year")
    return minutes


_MEM_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_mem_mb(value: Any) -> int | None:
    """Slurm-style memory -> megabytes: 16G, '500M', '64GB', 2048 (MB). 0 = all of the node."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise PydanticCustomError("mem", "expected a memory size such as 64G or 500M, got true/false")
    if isinstance(value, int):
        mb = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt])?(?:i?[Bb])?\s*", value)
        if not match:
            raise PydanticCustomError("mem", f"'{value}' is not a memory size; use e.g. 64G, 500M or 2T")
        mb = float(match.group(1)) * _MEM_UNITS[(match.group(2) or "M").upper()]
    else:
        raise PydanticCustomError("mem", f"expected a memory size such as 64G, got {_kind(value)}")
    if mb < 0 or mb > MAX_MEM_MB:
        raise PydanticCustomError("mem", f"{value!r} is not a possible memory size per node")
    return int(-(-mb // 1))  # round up: asking for less than written would OOM


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value) or "__" in value:
        raise PydanticCustomError(
            "name",
            f"'{value}' is not a valid name; use lowercase letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, no '__')",
        )
    return value


def _unique(values: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise PydanticCustomError("duplicate", f"{value!r} is listed twice")
        seen.add(value)
    return values


Name = Annotated[str, AfterValidator(_check_name)]
Variant = Literal[VARIANTS]  # type: ignore[valid-type]
Layout = Literal[DATASETS]  # type: ignore[valid-type]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = f"'{value}'"
    elif isinstance(value, (dict, list)):
        text = _kind(value)
    else:
        text = repr(value) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- the schema


class _Strict(BaseModel):
    """Unknown keys are errors that say which keys exist (and the closest one)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        f"unknown key; {hint}allowed: {', '.join(allowed)}",
                        {"key": str(key)},
                    )
        return data


class DatasetSpec(_Strict):
    """One dataset on disk. Its key in `datasets` is the name the grid refers to."""

    layout: Layout | None = Field(
        None,
        description="on-disk layout (casme2, samm, 4dme); defaults to the dataset's name, "
        "so it is required only for user labels such as 'casme2-cropped'",
    )
    root: Path = Field(
        description="dataset root holding the coding sheet (relative to the sweep file; ${VAR} expanded)"
    )
    sheet: str | None = Field(None, description="coding sheet, relative to root (a glob is allowed); default: the layout's")
    frames_dir: str | None = Field(None, description="frames folder, relative to root; default: the layout's")
    folds: Annotated[list[str], AfterValidator(_unique)] | None = Field(
        None,
        min_length=1,
        description="LOSO folds to run (subject ids as in the sheet); default: every subject",
    )

    @field_validator("root", mode="before")
    @classmethod
    def _root(cls, value: Any, info: ValidationInfo) -> Any:
        return _local_path(value, info) if isinstance(value, str) else value

    @field_validator("sheet", "frames_dir", mode="before")
    @classmethod
    def _relative_to_root(cls, value: Any) -> Any:
        return expand_env(value) if isinstance(value, str) else value

    @field_validator("folds", mode="before")
    @classmethod
    def _fold_ids(cls, value: Any) -> Any:
        # YAML reads `folds: [6, 7]` as integers; subject ids are text in every sheet.
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value


class LLMSpec(_Strict):
    """A base LLM: a local model folder, or a Hugging Face id already in the local cache."""

    path: str = Field(description="model folder (relative to the sweep file; ${VAR} expanded) or a hub id 'org/name'")
    offline: bool = Field(True, description="load with HF_HUB_OFFLINE=1 (compute nodes usually have no network)")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise PydanticCustomError("empty", "must not be empty")
        # A bare 'org/name' that is not a folder beside the sweep file is a hub id; a
        # value built from ${VAR} or starting with '.', '/' or '~' is always a path.
        base = _base_dir(info)
        looks_like_hub = "${" not in value and _HUB_ID_RE.match(value) and not value.startswith(".")
        if looks_like_hub and not (base is not None and (base / value).exists()) and not Path(value).exists():
            return value
        return _local_path(value, info)

    @property
    def is_hub_id(self) -> bool:
        return not Path(self.path).is_absolute() and bool(_HUB_ID_RE.match(self.path))


class TrainingSpec(_Strict):
    """Training settings of every cell; same names and defaults as `aullm.train.TrainConfig`.

    `recipe` fills every recipe field left unset (aullm/recipes.py); the stored snapshot
    holds the resolved values, so the manifest says exactly how each cell was trained."""

    recipe: Literal["paper", "script"] = Field(
        "paper",
        description="paper: what the paper's text says; script: what the released script does. "
        "Fields left unset take their recipe's value; any field set here overrides it",
    )
    epochs: int = Field(350, gt=0, description="full passes over the training split (paper: 350)")
    lr: float = Field(3e-5, gt=0, allow_inf_nan=False, description="Adam learning rate (paper: 3e-5)")
    weight_decay: float = Field(0.005, ge=0, allow_inf_nan=False, description="Adam weight decay (paper: 0.005)")
    batch_size: int = Field(256, gt=0, description="clips per step; 256 = one full batch per epoch (paper)")
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout of backbone and projector (paper: 0.3)")
    token_position: Literal["prepend", "append"] | None = Field(
        None, description="visual token before the prompt (paper) or after it (script); unset: the recipe's"
    )
    prompt: str | None = Field(None, min_length=1, description="task text prompt; unset: the recipe's")
    prompt_special_tokens: Literal["tokenizer", "none"] | None = Field(
        None,
        description="tokenizer: keep the special tokens the tokenizer adds to the prompt (a BOS stays first); "
        "none: plain text; unset: the recipe's (tokenizer for both)",
    )
    train_sampling: Literal["script", "linspace"] = Field(
        "script", description="script: onset to a random end frame; linspace: the test sampling"
    )
    pixel_scale: Literal["raw", "unit"] = Field("raw", description="raw: 0..255 as the released script; unit: 0..1")
    asl_form: Literal["official", "script"] | None = Field(
        None,
        description="official: ASL with its focusing weights (paper Eq. 4); script: the released script's gradient, "
        "the plain clipped BCE; unset: the recipe's",
    )
    loss_reduction: Literal["mean", "sum"] | None = Field(
        None, description="mean over samples (paper Eq. 4) or sum (script); unset: the recipe's"
    )
    gamma_pos: float = Field(0.0, ge=0, allow_inf_nan=False, description="ASL positive focusing (paper: 0)")
    gamma_neg: float = Field(4.0, ge=0, allow_inf_nan=False, description="ASL negative focusing (paper: 4)")
    asl_clip: float = Field(0.05, ge=0, lt=1, description="ASL probability margin (paper: 0.05)")
    lora_r: int = Field(16, gt=0, description="LoRA rank (paper: 16)")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (paper: 32)")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout")
    efp_activation: Literal["none", "tanh", "gelu", "relu", "sigmoid"] | None = Field(
        None, description="activation on the EFP output token (paper Eq. 3's sigma: sigmoid here; script: none); unset: the recipe's"
    )
    prompt_fusion: Literal["early", "late"] = Field(
        "early",
        description="prompt_learning only. early: learnable vectors replace the text prompt, the visual token still "
        "enters the LLM; late: the LLM sees the same input for every clip (a constant), visual features bypass it",
    )
    num_prompt_vectors: int = Field(4, gt=0, description="learnable vectors of the prompt_learning variant")
    batchnorm_stats: Literal["recompute", "running"] | None = Field(
        None,
        description="recompute (paper recipe): BatchNorm statistics recomputed over the training clips before "
        "predicting (calibrated probabilities at the fixed 0.5 threshold); running (script): the training-time "
        "moving averages; unset: the recipe's",
    )
    precision: Literal["auto", "bf16", "fp16_llm", "fp32"] | None = Field(
        None,
        description="auto (paper): bf16 LLM on a GPU, LED and 3D-CNN in fp32, fp32 on the CPU; fp16_llm (script): "
        "fp16 LLM weights, fp32 visual path and head on a GPU; bf16; fp32; unset: the recipe's",
    )
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed config: a shipped name (e.g. zero2 = jobs/configs/zero2.json) or a JSON path; "
        "null = plain PyTorch",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if "/" in value or value.endswith(".json"):
            return _local_path(value, info)
        shipped = _JOB_CONFIGS / f"{value}.json"
        if not shipped.is_file():
            names = sorted(p.stem for p in _JOB_CONFIGS.glob("*.json")) if _JOB_CONFIGS.is_dir() else []
            raise PydanticCustomError(
                "deepspeed", f"'{value}' is not a shipped DeepSpeed config (shipped: {', '.join(names) or 'none'}); "
                "or give a path to a JSON file",
            )
        return str(shipped)

    @model_validator(mode="after")
    def _resolve_recipe(self) -> TrainingSpec:
        from aullm.recipes import resolve

        for key, value in resolve(self.model_dump()).items():
            if getattr(self, key) != value:
                object.__setattr__(self, key, value)
        return self


def parse_concurrent_cells(value: Any) -> int | str:
    """`auto` or a whole number 1..MAX_CONCURRENT_CELLS, nothing else: YAML's `true` and
    `2.5` would pass pydantic's lax int (as 1, or rounded away), hiding the typo."""
    allowed = f"a whole number 1..{MAX_CONCURRENT_CELLS} or {AUTO}"
    if isinstance(value, str) and value.strip() == AUTO:
        return AUTO
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_CONCURRENT_CELLS:
            return value
        raise PydanticCustomError("concurrent_cells", f"{value} is out of range; use {allowed}")
    shown = _kind(value) if value is None else _show(value)
    raise PydanticCustomError("concurrent_cells", f"{shown} is not {allowed}")


def concurrent_above_one(value: int | str) -> bool:
    """An explicit K > 1: what cannot combine with DeepSpeed or several processes. `auto`
    is resolved in the task, to 1 wherever those are set, so it combines with anything."""
    return isinstance(value, int) and value > 1


class ResourcesSpec(_Strict):
    """Where and how array tasks run. Unset Slurm fields are left to the cluster's defaults."""

    executor: Literal["slurm", "local", "debug"] = Field(
        "local", description="slurm: sbatch arrays; local: subprocesses on this machine; debug: in this process"
    )
    profile: str | None = Field(
        None, description="cluster profile name (slurm/profiles/<name>.yaml) or path; this block's fields override it"
    )
    partition: str | None = Field(None, min_length=1, description="Slurm partition")
    account: str | None = Field(None, min_length=1, description="Slurm account")
    qos: str | None = Field(None, min_length=1, description="Slurm QOS")
    gres: str | None = Field(None, description="Slurm generic resources, e.g. gpu:h100:1")
    gpus_per_node: int | None = Field(None, ge=0, le=MAX_GPUS_PER_NODE, description="GPUs per array task")
    processes_per_task: int = Field(
        1,
        ge=1,
        le=MAX_GPUS_PER_NODE,
        description="processes of one array task, on one node (--ntasks-per-node): one per GPU; >1 = data parallel",
    )
    cpus_per_task: int = Field(
        1, ge=1, le=MAX_CPUS_PER_TASK, description="CPU cores of each process of an array task (--cpus-per-task)"
    )
    mem: Annotated[int | None, BeforeValidator(parse_mem_mb)] = Field(
        None, description="memory per task (64G, 500M; stored in MB); null = cluster default"
    )
    time: Annotated[int, BeforeValidator(parse_minutes)] = Field(
        60, description="time limit per task: minutes or HH:MM:SS (stored in minutes)"
    )
    cells_per_task: int = Field(
        1, ge=1, le=100_000, description="cells one array task trains (the LLM is loaded once per task)"
    )
    concurrent_cells: Annotated[int | str, BeforeValidator(parse_concurrent_cells)] = Field(
        AUTO,
        description="cells of a task trained together in one loop, one frozen-LLM pass per step serving all"
        f" (aullm/concurrent.py); 1 = one after another; 1..{MAX_CONCURRENT_CELLS}, or auto: chosen by the"
        " task (1 on a CPU, from one cell's measured memory and the free memory on a GPU). Same variant"
        " only; an explicit K > 1 does not combine with DeepSpeed or processes_per_task > 1 (auto becomes 1)",
    )
    array_parallelism: int | None = Field(
        None, ge=1, description="most array tasks running at once (Slurm's %N throttle); null = no limit"
    )
    max_array_size: int | None = Field(
        None, ge=1, description="largest array to submit; null = the cluster's MaxArraySize (bigger grids are split)"
    )
    max_local_workers: int = Field(1, ge=1, le=1024, description="local executor: tasks run at once")
    signal_delay_s: int | None = Field(
        None, ge=0, description="seconds before the time limit at which tasks are told to checkpoint (submitit: 90)"
    )
    extra_sbatch: dict[str, Any] = Field(
        default_factory=dict, description="more #SBATCH options, e.g. {constraint: h100, exclusive: true}"
    )

    @field_validator("gres")
    @classmethod
    def _gres(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*(,[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*)*", value):
            raise PydanticCustomError("gres", f"'{value}' is not a gres string such as gpu:1 or gpu:h100:4")
        return value

    @field_validator("extra_sbatch", mode="before")
    @classmethod
    def _extra_sbatch(cls, value: Any) -> Any:
        # Accept the sbatch spelling too: ["--constraint=h100", "--exclusive"].
        if isinstance(value, list):
            as_dict: dict[str, Any] = {}
            for item in value:
                if not isinstance(item, str) or not item.startswith("--"):
                    raise PydanticCustomError("sbatch", f"{_show(item)} is not an sbatch option such as '--constraint=h100'")
                key, sep, val = item[2:].partition("=")
                as_dict[key] = val if sep else True
            value = as_dict
        if isinstance(value, dict):
            for key, val in value.items():
                if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
                    raise PydanticCustomError(
                        "sbatch", f"{_show(key)} is not an sbatch option name (lowercase, without the leading '--')"
                    )
                if val is None or isinstance(val, (dict, list)):
                    raise PydanticCustomError("sbatch", f"option '{key}' needs a plain value, got {_kind(val)}")
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ResourcesSpec:
        if self.signal_delay_s is not None and self.signal_delay_s >= self.time * 60:
            raise PydanticCustomError(
                "signal_delay",
                f"signal_delay_s {self.signal_delay_s} must be shorter than the time limit ({self.time} min)",
            )
        # A profile alone may ask for 4 GPUs and leave processes_per_task to the sweep that
        # names it: GPUs and processes are matched once the two are merged.
        if not (info.context or {}).get("profile_only"):
            self._check_processes()
            if concurrent_above_one(self.concurrent_cells) and self.processes_per_task > 1:
                # a concurrent loop owns its K optimizers; data parallelism wraps one model in DDP
                raise PydanticCustomError(
                    "concurrent",
                    f"concurrent_cells {self.concurrent_cells} with processes_per_task {self.processes_per_task}:"
                    " concurrent cells train in one process; set one of them to 1",
                )
        return self

    def _check_processes(self) -> None:
        """One process per GPU: a process trains on one device, and NCCL refuses two ranks on one GPU."""
        processes = self.processes_per_task
        if processes > 1 and self.executor == "debug":
            raise PydanticCustomError(
                "processes",
                f"processes_per_task {processes} needs executor slurm or local (debug runs each task inside this process)",
            )
        gpus = self.gpus_per_task
        if gpus is None or gpus == 0 or gpus == processes:
            return  # no GPU asked for: CPU processes (gloo), as many as wanted
        source = f"gpus_per_node {self.gpus_per_node}" if self.gpus_per_node else f"gres '{self.gres}'"
        if processes == 1:
            raise PydanticCustomError(
                "processes",
                f"{source} with processes_per_task 1 leaves {gpus - 1} GPU(s) idle (a process uses one GPU);"
                f" set processes_per_task: {gpus}",
            )
        raise PydanticCustomError(
            "processes",
            f"processes_per_task {processes} with {source} ({gpus} GPUs): a task runs one process per GPU,"
            f" so both must be equal",
        )

    @property
    def gpus_per_task(self) -> int | None:
        """GPUs one array task asks for (`gpus_per_node`, else the count of a `gpu` gres), or None."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return profiles.gres_gpu_count(self.gres)


class TrackingSpec(_Strict):
    """MLflow: where per-epoch curves and summary runs go (never the only copy of a result)."""

    uri: str | None = Field(
        None, description="tracking URI (http://host:5000, sqlite:///x.db); null = an embedded store in the sweep dir"
    )
    experiment: str | None = Field(None, min_length=1, description="experiment name; default: the sweep's name")
    flush_every: int = Field(25, ge=1, description="send epoch metrics to MLflow every N epochs (batched)")
    flush_seconds: float = Field(30.0, gt=0, description="... or every N seconds, whichever comes first")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = expand_env(value)
        if not re.match(r"^(https?|file|sqlite|postgresql|mysql|mssql|databricks)(\+[a-z0-9]+)?:", value):
            raise PydanticCustomError(
                "uri", f"'{value}' is not a tracking URI; use http(s)://host:port, sqlite:///path, file:/path or null"
            )
        return value


class PairSpec(_Strict):
    """A cross-domain cell: train on all of one dataset, test on all of another."""

    train: str = Field(description="dataset name (a key of `datasets`) to train on")
    test: str = Field(description="dataset name to test on")


class GridBlock(_Strict):
    """One block of the grid: its cells are data x LLMs x variants x seeds.

    Variants without an LLM (no_llm) are not multiplied by LLMs: they give one cell per
    data unit and seed, with llm = none.
    """

    protocol: Literal["loso", "cross_domain"] = Field(
        "loso", description="loso: one cell per subject of each dataset; cross_domain: one cell per pair"
    )
    datasets: Annotated[list[str], AfterValidator(_unique)] | None = Field(
        None, min_length=1, description="loso: dataset names (keys of `datasets`)"
    )
    pairs: list[PairSpec] | None = Field(None, min_length=1, description="cross_domain: [{train: casme2, test: samm}, ...]")
    llms: Annotated[list[str], AfterValidator(_unique)] | None = Field(
        None, description="LLM names (keys of `llms`); default: every LLM of the sweep"
    )
    variants: Annotated[list[Variant], AfterValidator(_unique)] = Field(
        min_length=1, description=f"ablation variants: {', '.join(VARIANTS)}"
    )
    seeds: Annotated[list[Seed], AfterValidator(_unique)] | None = Field(
        None, min_length=1, description="seeds of this block; default: the sweep's seeds"
    )
    training: dict[str, Any] | None = Field(
        None, description="training fields this block sets differently from the sweep's `training` (same names)"
    )
    sweep: dict[str, Any] | None = Field(
        None, description="axes of this block: {field: [values, ...]}, a cartesian product (with the sweep's `sweep`)"
    )


class SweepSpec(_Strict):
    """A whole sweep: what to train (datasets x LLMs x variants x seeds) and where."""

    name: Name = Field(description="sweep name (also the default MLflow experiment)")
    description: str | None = Field(None, description="free text, shown by status")
    output_dir: Path = Field(description="sweep directory: manifest, results, logs (relative to the sweep file)")
    cache_dir: Path | None = Field(None, description="decoded-frame cache; default: <output_dir>/cache")
    datasets: dict[Name, DatasetSpec] = Field(min_length=1, description="datasets by name")
    llms: dict[Name, LLMSpec] = Field(default_factory=dict, description="base LLMs by name")
    seeds: Annotated[list[Seed], AfterValidator(_unique)] = Field(
        default_factory=lambda: [1], min_length=1, description="default seeds of every block (paper: 1)"
    )
    grid: list[GridBlock] = Field(min_length=1, description="blocks whose union is the set of cells")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="training settings of every cell")
    sweep: dict[str, Any] | None = Field(
        None, description="axes of every block: {training field: [values, ...]}, a cartesian product"
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="executor and cluster resources")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking")

    # Where the spec came from, for error messages (not part of the spec's content).
    _source: str = PrivateAttr(default="<sweep>")
    _node: Any = PrivateAttr(default=None)
    # Per block: the settings its cells train under, as (label, hash, resolved fields);
    # label '' is the sweep's own `training` (cells keep the ids they had before axes).
    _block_settings: list[tuple[SettingsList, SettingsList]] = PrivateAttr(default_factory=list)
    _overrides: list[str] = PrivateAttr(default_factory=list)  # the `--set`s applied, as typed

    @field_validator("output_dir", "cache_dir", mode="before")
    @classmethod
    def _paths(cls, value: Any, info: ValidationInfo) -> Any:
        return _local_path(value, info) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> SweepSpec:
        for name, ds in self.datasets.items():
            if ds.layout is None:
                if name not in DATASETS:
                    raise SpecFieldError(
                        ("datasets", name, "layout"),
                        f"required: '{name}' is not a layout name, so say which layout it has ({', '.join(DATASETS)})",
                    )
                ds.layout = name
        for name in self.llms:
            if name in RESERVED_LLM_NAMES:
                raise SpecFieldError(("llms", name), f"'{name}' is reserved for cells without an LLM; pick another name")
        for i, block in enumerate(self.grid):
            self._check_block(i, block)
        self._block_settings = _expand_settings(self, info.context)
        if self.cache_dir is None:
            self.cache_dir = self.output_dir / "cache"
        if self.tracking.experiment is None:
            self.tracking.experiment = self.name
        return self

    def _check_block(self, i: int, block: GridBlock) -> None:
        here: tuple[str | int, ...] = ("grid", i)
        if block.protocol == "loso":
            if block.pairs is not None:
                raise SpecFieldError((*here, "pairs"), "pairs belong to protocol cross_domain; a loso block lists datasets")
            if block.datasets is None:
                raise SpecFieldError((*here, "datasets"), "required for protocol loso (names from `datasets`)")
            for j, name in enumerate(block.datasets):
                self._known_dataset((*here, "datasets", j), name)
        else:
            if block.datasets is not None:
                raise SpecFieldError(
                    (*here, "datasets"), "a cross_domain block lists pairs: [{train: a, test: b}], not datasets"
                )
            if block.pairs is None:
                raise SpecFieldError((*here, "pairs"), "required for protocol cross_domain: [{train: a, test: b}, ...]")
            seen: set[tuple[str, str]] = set()
            for j, pair in enumerate(block.pairs):
                self._known_dataset((*here, "pairs", j, "train"), pair.train)
                self._known_dataset((*here, "pairs", j, "test"), pair.test)
                if pair.train == pair.test:
                    raise SpecFieldError((*here, "pairs", j), f"train and test are both '{pair.train}'")
                if (pair.train, pair.test) in seen:
                    raise SpecFieldError((*here, "pairs", j), f"{pair.train} -> {pair.test} is listed twice")
                seen.add((pair.train, pair.test))
        for j, name in enumerate(block.llms or []):
            if name not in self.llms:
                raise SpecFieldError(
                    (*here, "llms", j), f"'{name}' is not one of the sweep's llms ({', '.join(self.llms) or 'none defined'})"
                )
        needs_llm = [v for v in block.variants if v not in VARIANTS_WITHOUT_LLM]
        if needs_llm and not self.block_llms(block):
            raise SpecFieldError(
                (*here, "llms"), f"variant '{needs_llm[0]}' needs an LLM but the block has none (define `llms`)"
            )

    def _known_dataset(self, loc: tuple[str | int, ...], name: str) -> None:
        if name not in self.datasets:
            raise SpecFieldError(loc, f"'{name}' is not one of the sweep's datasets ({', '.join(self.datasets)})")

    # ------------------------------------------------------------ queries

    def block_llms(self, block: GridBlock) -> list[str]:
        return list(block.llms) if block.llms is not None else list(self.llms)

    def block_seeds(self, block: GridBlock) -> list[int]:
        return list(block.seeds) if block.seeds is not None else list(self.seeds)

    def used_datasets(self) -> list[str]:
        """Dataset names some block refers to, in definition order."""
        used: set[str] = set()
        for block in self.grid:
            used.update(block.datasets or [])
            for pair in block.pairs or []:
                used.update((pair.train, pair.test))
        return [name for name in self.datasets if name in used]

    def used_llms(self) -> list[str]:
        """LLM names some block trains with, in definition order."""
        used: set[str] = set()
        for block in self.grid:
            if any(v not in VARIANTS_WITHOUT_LLM for v in block.variants):
                used.update(self.block_llms(block))
        return [name for name in self.llms if name in used]

    def block_settings(self, index: int, *, llm: bool = True) -> SettingsList:
        """The settings grid[index]'s cells with (or without) an LLM train under:
        (label, hash, resolved fields)."""
        with_llm, without_llm = self._block_settings[index]
        return with_llm if llm else without_llm

    @property
    def base_settings(self) -> dict[str, Any]:
        """The sweep's own `training` block, resolved: the default setting."""
        return self.training.model_dump(mode="json")

    def settings_table(self) -> dict[str, dict[str, Any]]:
        """hash -> resolved fields of every setting of the sweep (the default one first)."""
        table = {_settings.settings_hash(self.base_settings): self.base_settings}
        for both in self._block_settings:
            for block in both:
                table.update((digest, resolved) for _label, digest, resolved in block)
        return table

    def swept_fields(self) -> list[str]:
        """Training fields whose value is not the same in every setting of the sweep."""
        table = list(self.settings_table().values())
        return [k for k in TRAINING_FIELDS if len({json.dumps(s.get(k)) for s in table}) > 1]

    @property
    def source(self) -> str:
        return self._source

    @property
    def overrides(self) -> list[str]:
        return list(self._overrides)

    def field_error(self, loc: Sequence[str | int], message: str) -> UserInputError:
        """A one-line error about a field of this spec, in the same style as load errors."""
        return UserInputError(_field_message(self._source, self._node, tuple(loc), message))

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready content, as stored in the manifest (paths absolute, profile merged)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], *, source: str = "manifest.json") -> SweepSpec:
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise UserInputError(_validation_message(exc, source, None)) from None
        except SpecFieldError as exc:
            raise UserInputError(_field_message(source, None, exc.loc, exc.message)) from None
        spec._source = source
        return spec


# ---------------------------------------------------------------- settings axes

TRAINING_FIELDS: tuple[str, ...] = tuple(TrainingSpec.model_fields)
# Fields a cell without an LLM (no_llm) never uses: its settings keep the default values of
# these, so a LoRA axis neither labels nor multiplies the baseline's cells.
LLM_ONLY_FIELDS: tuple[str, ...] = ("lora_r", "lora_alpha", "lora_dropout")


def _nearest_field(key: str) -> str:
    close = difflib.get_close_matches(str(key), TRAINING_FIELDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"'{key}' is not a training field; {hint}allowed: {', '.join(TRAINING_FIELDS)}"


class _Settings:
    """Validates training values the way `training:` is validated, once per distinct input."""

    def __init__(self, base: dict[str, Any], context: Any) -> None:
        self.base = base
        self.context = context
        self._cache: dict[str, dict[str, Any]] = {}

    def resolve(self, values: dict[str, Any], loc: tuple[str | int, ...], field: str | None = None) -> dict[str, Any]:
        """Resolved fields of base + `values`; a bad value is reported at `loc`."""
        raw = {**self.base, **values}
        key = json.dumps(raw, sort_keys=True, default=str)
        if key not in self._cache:
            try:
                spec = TrainingSpec.model_validate(raw, context=self.context)
            except ValidationError as exc:
                error = exc.errors(include_url=False)[0]
                where = tuple(error["loc"])
                if error["type"] == "unknown_key":
                    raise SpecFieldError((*loc, (error.get("ctx") or {}).get("key", "?")), str(error["msg"])) from None
                if field is None and where:  # a block's `training`: the field at fault is the error's
                    loc = (*loc, *where)
                raise SpecFieldError(loc, _problem(error)) from None
            self._cache[key] = spec.model_dump(mode="json")
        return self._cache[key]


def _axes(raw: Any, loc: tuple[str | int, ...]) -> dict[str, list[Any]]:
    """`sweep:` as {field: [values]}: a scalar is a one-value list; names must be fields."""
    if raw is None:
        return {}
    out: dict[str, list[Any]] = {}
    for key, values in raw.items():
        if key not in TRAINING_FIELDS:
            raise SpecFieldError((*loc, key), _nearest_field(str(key)))
        if isinstance(values, dict):
            raise SpecFieldError((*loc, key), "expected a value or a list of values, got a mapping")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecFieldError((*loc, key), "an axis must list at least one value")
        out[key] = values
    return out


def _without_llm(settings: SettingsList, base: dict[str, Any], named: list[str]) -> SettingsList:
    """The settings of the block's cells without an LLM: LLM-only fields at their default."""
    out: dict[str, tuple[str, str, dict[str, Any]]] = {}
    shown = [k for k in named if k not in LLM_ONLY_FIELDS]
    for _label, _digest, resolved in settings:
        plain = {**resolved, **{k: base[k] for k in LLM_ONLY_FIELDS}}
        digest = _settings.settings_hash(plain)
        out.setdefault(digest, (_settings.label(plain, base, shown), digest, plain))
    return list(out.values())


def _expand_settings(spec: SweepSpec, context: Any) -> list[tuple[SettingsList, SettingsList]]:
    """Each block's settings: its `training` over the sweep's, times every axis value.

    Values are checked one by one (so an error names the exact list item and its line),
    then combined; the label names the fields the block sets or sweeps that differ from
    the sweep's own `training`. Per block: (settings of cells with an LLM, without one)."""
    base = spec.base_settings
    given = {k: getattr(spec.training, k) for k in spec.training.model_fields_set}
    resolver = _Settings(given, context)
    top_axes = _axes(spec.sweep, ("sweep",))
    out: list[tuple[SettingsList, SettingsList]] = []
    for i, block in enumerate(spec.grid):
        here: tuple[str | int, ...] = ("grid", i)
        overrides = dict(block.training or {})
        if overrides:
            resolver.resolve(overrides, (*here, "training"))
        block_axes = _axes(block.sweep, (*here, "sweep"))
        for key in block_axes:
            if key in top_axes:
                raise SpecFieldError(
                    (*here, "sweep", key), f"'{key}' is swept at the top level too (sweep.{key}); sweep it in one place"
                )
        axes = {**top_axes, **block_axes}
        for key in overrides:
            if key in axes:
                where = f"grid[{i}].sweep.{key}" if key in block_axes else f"sweep.{key}"
                raise SpecFieldError(
                    (*here, "training", key), f"conflicts with the axis {where}; give '{key}' in one place"
                )
        normalized: dict[str, list[Any]] = {}
        for key, values in axes.items():
            at = (*here, "sweep", key) if key in block_axes else ("sweep", key)
            seen: dict[str, int] = {}
            kept = []
            for j, value in enumerate(values):
                got = resolver.resolve({**overrides, key: value}, (*at, j), key)[key]
                token = json.dumps(got)
                if token in seen:
                    raise SpecFieldError((*at, j), f"{_show(value)} is listed twice (same value as item {seen[token]})")
                seen[token] = j
                kept.append(value)
            normalized[key] = kept
        named = [k for k in TRAINING_FIELDS if k in overrides or k in normalized]
        settings: list[tuple[str, str, dict[str, Any]]] = []
        keys = list(normalized)
        for combo in itertools.product(*(normalized[k] for k in keys)):
            resolved = resolver.resolve({**overrides, **dict(zip(keys, combo))}, here)
            settings.append((_settings.label(resolved, base, named), _settings.settings_hash(resolved), resolved))
        out.append((settings, _without_llm(settings, base, named)))
    return out


# ---------------------------------------------------------------- reading YAML


def _compose(text: str, shown: str) -> tuple[Any, Any]:
    """(node tree, data). Node tree gives line numbers and catches duplicate keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = ": ".join(filter(None, [exc.context, exc.problem]))
        raise UserInputError(f"{shown}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"{shown}: invalid YAML: {exc}") from None
    if node is not None:
        _reject_duplicate_keys(node, (), shown)
    return node, data


def _reject_duplicate_keys(node: Any, loc: tuple[str | int, ...], shown: str) -> None:
    # PyYAML silently keeps the last of two equal keys; a sweep with `llms:` twice
    # would lose half its grid without a word.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen and key.value != "<<":
                    raise UserInputError(
                        f"{shown}: field '{_render_loc((*loc, key.value))}': the key appears twice "
                        f"(lines {seen[key.value]} and {line}); YAML would silently keep only the last"
                    )
                seen[key.value] = line
                _reject_duplicate_keys(value, (*loc, key.value), shown)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*loc, i), shown)


def _line_of(node: Any, loc: Sequence[str | int]) -> int | None:
    """Line (1-based) of the deepest node along `loc` that exists in the file."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    current = node
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    current, line = value, key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            current = current.value[part]
            line = current.start_mark.line + 1
        else:
            return line
    return line


def _read_text(path: Path, shown: str, what: str) -> str:
    if not path.exists():
        raise UserInputError(f"{shown}: no such {what}")
    if path.is_dir():
        raise UserInputError(f"{shown}: is a folder, not a {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{shown}: not a UTF-8 text file (expected a YAML {what})") from None
    except OSError as exc:
        raise UserInputError(f"{shown}: cannot read the {what}: {exc.strerror}") from None


# ---------------------------------------------------------------- error messages

_SCHEMA_TAG = re.compile(r"^[a-z-]+\[.*\]$")


def _render_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]" or _SCHEMA_TAG.match(part):
            continue
        else:
            out += ("." if out else "") + part
    return out


class _Overridden:
    """A YAML node tree plus the `--set` overrides applied on top of it: an error about a
    value that came from the command line names the `--set`, not a line of the file."""

    def __init__(self, node: Any, overrides: dict[tuple[str | int, ...], str]) -> None:
        self.node = node
        self.overrides = overrides

    def origin(self, loc: tuple[str | int, ...]) -> str | None:
        for at, text in self.overrides.items():
            if loc[: len(at)] == at:
                return text
        return None


def _field_message(shown: str, node: Any, loc: tuple[str | int, ...], problem: str) -> str:
    path = _render_loc(loc) or "top level"
    if isinstance(node, _Overridden):
        origin = node.origin(loc)
        if origin is not None:
            return f"{shown}: field '{path}': {problem} (from --set {origin})"
        node = node.node
    line = _line_of(node, loc)
    where = f" (line {line})" if line is not None and loc else ""
    return f"{shown}: field '{path}': {problem}{where}"


def _parse_override(text: str, shown: str) -> tuple[tuple[str | int, ...], Any]:
    """'training.epochs=5' -> (('training', 'epochs'), 5); the value is read as YAML."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".") if key.strip() else []
    if not sep or not parts or any(not p.strip() for p in parts):
        raise UserInputError(
            f"{shown}: --set {text!r}: expected FIELD=VALUE with a dotted field, e.g. training.epochs=5 "
            "or 'sweep.lr=[1e-4,3e-4]'"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserInputError(f"{shown}: --set {text!r}: the value is not valid YAML ({problem})") from None
    return tuple(int(p) if p.isdigit() else p.strip() for p in parts), parsed


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str], shown: str) -> dict[tuple[str | int, ...], str]:
    """Set each `--set` value into the file's data, before any validation (so they are
    checked exactly as the file is). Two overrides of one field, or of a field and a field
    inside it, conflict: which should win is the user's to say."""
    placed: dict[tuple[str | int, ...], str] = {}
    for text in overrides:
        loc, value = _parse_override(text, shown)
        for other, other_text in placed.items():
            n = min(len(loc), len(other))
            if loc[:n] == other[:n]:
                raise UserInputError(
                    f"{shown}: --set {text!r} conflicts with --set {other_text!r} (both set '{_render_loc(loc[:n])}'); "
                    "give each field once"
                )
        node: Any = data
        for depth, part in enumerate(loc[:-1]):
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise UserInputError(
                        f"{shown}: --set {text!r}: '{_render_loc(loc[:depth])}' has no item {part} "
                        f"(it lists {len(node)}, numbered from 0)"
                    )
                child = node[part]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise UserInputError(
                    f"{shown}: --set {text!r}: '{_render_loc(loc[: depth + 1])}' is {_kind(child)}, "
                    f"so it has no field '{loc[depth + 1]}'"
                )
            node = child
        last = loc[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise UserInputError(f"{shown}: --set {text!r}: '{_render_loc(loc[:-1])}' has no item {last}")
            node[last] = value
        else:
            node[last] = value
        placed[loc] = text
    return placed


def _allowed_literals(expected: str) -> str:
    # pydantic writes "'slurm', 'local' or 'debug'"; say it as a plain list.
    return ", ".join(part.strip().strip("'") for part in re.split(r",| or ", expected) if part.strip())


def _problem(error: Any) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"{_show(value)} is not one of {_allowed_literals(str(ctx.get('expected', '')))}"
    if kind == "missing":
        return "required but missing"
    if kind in ("int_parsing", "int_type"):
        return f"{_show(value)} is not a whole number"
    if kind == "int_from_float":
        return f"{_show(value)} is not a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"{_show(value)} is not a (finite) number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{_show(value)} is not true or false"
    if kind in ("string_type", "path_type"):
        return f"expected text, got {_kind(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value, ...), got {_kind(value)}"
    if kind == "list_type":
        return f"expected a list, got {_kind(value)}"
    if kind == "greater_than":
        return f"{_show(value)} must be > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"{_show(value)} must be >= {ctx.get('ge')}"
    if kind == "less_than":
        return f"{_show(value)} must be < {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"{_show(value)} must be <= {ctx.get('le')}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    return str(error["msg"])


def _validation_message(exc: ValidationError, shown: str, node: Any) -> str:
    error = exc.errors(include_url=False)[0]
    loc: tuple[str | int, ...] = tuple(error["loc"])
    if error["type"] == "unknown_key":
        key = (error.get("ctx") or {}).get("key", "?")
        return _field_message(shown, node, (*loc, key), str(error["msg"]))
    if loc and loc[-1] == "[key]":
        # a bad mapping key (e.g. a dataset name): the key itself is the value at fault
        return _field_message(shown, node, loc[:-1], f"bad name: {_problem(error)}")
    if error["type"] == "extra_forbidden":
        return _field_message(shown, node, loc, "unknown key")
    return _field_message(shown, node, loc, _problem(error))


# ---------------------------------------------------------------- loading


def _merge_profile(data: dict[str, Any], node: Any, sweep_file: Path, shown: str) -> None:
    """Fill `resources` from its profile; the sweep's own fields win, field by field."""
    resources = data.get("resources")
    if not isinstance(resources, dict) or resources.get("profile") is None:
        return
    name = resources["profile"]
    loc = ("resources", "profile")
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(_field_message(shown, node, loc, f"expected a profile name, got {_show(name)}"))
    path = profiles.find_profile(name, sweep_file)
    if path is None:
        if profiles.is_profile_path(name):
            problem = f"profile file '{name}' not found (relative to the sweep file)"
        else:
            known = profiles.available_profiles(sweep_file)
            where = ", ".join(str(d) for d in profiles.profile_dirs(sweep_file))
            problem = f"'{name}' is not a known profile (known: {', '.join(known) or 'none'}; searched {where})"
        raise UserInputError(_field_message(shown, node, loc, problem))
    values = load_profile(path)
    data["resources"] = {**values, **resources}


def load_profile(path: Path) -> dict[str, Any]:
    """A profile file's fields, checked with the same rules as a sweep's `resources`."""
    shown = str(path)
    prof_node, values = _compose(_read_text(path, shown, "profile file"), shown)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserInputError(f"{shown}: expected a mapping of resource fields, got {_kind(values)}")
    values = {k: v for k, v in values.items() if k != "description"}  # documentation only
    for key in values:
        if key in ("executor", "profile"):
            raise UserInputError(
                _field_message(shown, prof_node, (key,), "a profile sets cluster resources; set this in the sweep file")
            )
    try:
        ResourcesSpec.model_validate(values, context={"profile_only": True})
    except ValidationError as exc:
        raise UserInputError(_validation_message(exc, shown, prof_node)) from None
    return values


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and check a sweep file, with `--set FIELD=VALUE` overrides applied on top.
    Every problem is one UserInputError line."""
    shown = str(path)
    sweep_file = Path(path)
    text = _read_text(sweep_file, shown, "sweep file")
    node, data = _compose(text, shown)
    if overrides and isinstance(data, dict):
        node = _Overridden(node, _apply_overrides(data, overrides, shown))
    if data is None:
        raise UserInputError(
            f"{shown}: the file is empty; a sweep needs at least name, output_dir, datasets and grid"
        )
    if not isinstance(data, dict):
        raise UserInputError(
            f"{shown}: expected a mapping of sweep fields (name, output_dir, datasets, llms, grid, ...), got {_kind(data)}"
        )
    _merge_profile(data, node, sweep_file, shown)
    context = {"base_dir": sweep_file.resolve().parent}
    try:
        spec = SweepSpec.model_validate(data, context=context)
    except ValidationError as exc:
        raise UserInputError(_validation_message(exc, shown, node)) from None
    except SpecFieldError as exc:
        raise UserInputError(_field_message(shown, node, exc.loc, exc.message)) from None
    spec._source = shown
    spec._node = node
    spec._overrides = list(overrides)
    return spec


# ---------------------------------------------------------------- the filesystem


def _list(values: Iterable[str], limit: int = 12) -> str:
    items = list(values)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def read_subjects(spec: SweepSpec, name: str) -> list[str]:
    """The subjects (LOSO folds) of one dataset, read from its coding sheet."""
    from aullm.data.folds import loso_subjects
    from aullm.data.readers import read_dataset  # lazy: only validate/submit read sheets

    ds = spec.datasets[name]
    assert ds.layout is not None
    try:
        samples = read_dataset(ds.layout, ds.root, sheet=ds.sheet, frames_dir=ds.frames_dir)
    except UserInputError as exc:
        raise spec.field_error(("datasets", name), str(exc)) from None
    return loso_subjects(samples)


def _check_llm(spec: SweepSpec, name: str) -> None:
    llm = spec.llms[name]
    loc = ("llms", name, "path")
    if llm.is_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - transformers always brings it
            raise spec.field_error(loc, f"'{llm.path}' is a hub id but huggingface_hub is not installed") from None
        cached = try_to_load_from_cache(llm.path, "config.json")
        if not isinstance(cached, str):
            raise spec.field_error(
                loc,
                f"'{llm.path}' is not a folder and not in the local Hugging Face cache "
                f"(download it first, e.g. `hf download {llm.path}`, or give a folder)",
            )
        return
    path = Path(llm.path)
    if not path.is_dir():
        raise spec.field_error(loc, f"{path} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise spec.field_error(loc, f"{path} has no config.json (not a Hugging Face model folder)")


def validate_paths(spec: SweepSpec) -> dict[str, list[str]]:
    """Check every path the grid uses; return the subjects of each used dataset.

    Dataset roots must exist and hold a readable coding sheet and frames folder (the
    real readers parse them), fold subsets must name subjects of the sheet, and every
    LLM the grid trains with must be a model folder with a config.json.
    """
    for loc, path in (("output_dir", spec.output_dir), ("cache_dir", spec.cache_dir)):
        if path is not None and path.exists() and not path.is_dir():
            raise spec.field_error((loc,), f"{path} exists and is not a folder")
    for deepspeed in sorted({str(s["deepspeed"]) for s in spec.settings_table().values() if s.get("deepspeed")}):
        if not Path(deepspeed).is_file():
            loc = ("training", "deepspeed") if deepspeed == spec.training.deepspeed else ("sweep", "deepspeed")
            raise spec.field_error(loc, f"{deepspeed} is not a file")
    subjects: dict[str, list[str]] = {}
    for name in spec.used_datasets():
        ds = spec.datasets[name]
        if not ds.root.is_dir():
            what = "is not a folder" if ds.root.exists() else "does not exist"
            raise spec.field_error(("datasets", name, "root"), f"{ds.root} {what}")
        subjects[name] = read_subjects(spec, name)
        if ds.folds is not None:
            present = set(subjects[name])
            for i, fold in enumerate(ds.folds):
                if fold not in present:
                    raise spec.field_error(
                        ("datasets", name, "folds", i),
                        f"subject '{fold}' is not in {name} (subjects: {_list(subjects[name])})",
                    )
    for name in spec.used_llms():
        _check_llm(spec, name)
    return subjects


def check_deepspeed(spec: SweepSpec) -> str | None:
    """When the sweep names DeepSpeed: its config parses and fits the sweep (batch size,
    precision, ZeRO stage, processes per task), and DeepSpeed imports and accepts it.
    Returns DeepSpeed's version (None without DeepSpeed); one-line UserInputError otherwise.

    The same rules run again on the node (aullm.train), so what passes here trains there;
    finding a bad config now costs seconds instead of a whole run of failed cells."""
    # every distinct (config, batch size, precision) the settings use: an axis may vary any of them
    combos = sorted({(str(s["deepspeed"]), int(s["batch_size"]), str(s["precision"]))
                     for s in spec.settings_table().values() if s.get("deepspeed")})  # fmt: skip
    if not combos:
        return None
    if concurrent_above_one(spec.resources.concurrent_cells):
        raise UserInputError(
            f"{spec.source}: resources.concurrent_cells {spec.resources.concurrent_cells} does not combine with"
            " training.deepspeed (the engine owns one model and one optimizer); set concurrent_cells: 1"
        )
    from aullm.deepspeed_config import check_config, probe, read_config

    version = None
    for deepspeed, batch_size, precision in combos:
        path = Path(deepspeed)
        try:
            ds = read_config(path)
            check_config(ds, path=path, batch_size=batch_size, precision=precision,
                         processes=spec.resources.processes_per_task)
            version = probe(ds, path=path, batch_size=batch_size)
        except UserInputError as exc:
            # name the sweep file too: the config's own path alone does not say which sweep used it
            raise UserInputError(f"{spec.source}: training.deepspeed: {exc}") from None
    return version
