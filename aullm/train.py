"""Train and evaluate one cell: (dataset or cross-domain pair, fold, LLM, variant, seed).

Read top to bottom: `TrainConfig` (every knob, defaulting to the paper), `CellTrainer`
(loads the base LLM once per process), `CellTrainer.run` (the one training loop), and
`CellResult` (per-sample probabilities and labels; F1 is computed later, on pooled folds,
by `aullm.metrics`).

Packing several cells into one process is only honest if it changes nothing: every
cell starts by re-seeding every RNG, resetting the LoRA adapters from its seed and
building a fresh backbone, projector, head and optimizer, so a cell trained after
another gives the same predictions as one trained in a fresh process.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aullm.constants import NUM_FRAMES, TOKEN_POSITIONS, VARIANTS, VARIANTS_WITHOUT_LLM
from aullm.data.clips import ClipStore, test_frame_indices, train_frame_indices
from aullm.data.folds import Split, label_matrix
from aullm.data.samples import Sample
from aullm.errors import UserInputError
from aullm.loss import AsymmetricLoss
from aullm.recipes import RECIPES


# Closed choices of TrainConfig, checked with one-line errors (the Literal types are not enforced).
_CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": RECIPES,
    "token_position": TOKEN_POSITIONS,
    "prompt_special_tokens": ("tokenizer", "none"),
    "train_sampling": ("script", "linspace"),
    "pixel_scale": ("raw", "unit"),
    "asl_form": ("official", "script"),
    "loss_reduction": ("mean", "sum"),
    "efp_activation": ("none", "tanh", "gelu", "relu", "sigmoid"),
    "prompt_fusion": ("early", "late"),
    "batchnorm_stats": ("recompute", "running"),
    "precision": ("auto", "bf16", "fp16_llm", "fp32"),
}


@dataclass
class TrainConfig:
    """Training settings of one cell. Defaults are the paper's (DESIGN.md §4); `recipe`
    fills every unset field from the paper's text or from the released script."""

    epochs: int = field(default=350, metadata={"help": "full passes over the training split"})
    lr: float = field(default=3e-5, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.005, metadata={"help": "Adam weight decay (L2, as torch.optim.Adam)"})
    batch_size: int = field(default=256, metadata={"help": "clips per step; 256 = one full batch per epoch"})
    dropout: float = field(default=0.3, metadata={"help": "dropout of backbone and projector"})
    recipe: Literal["paper", "script"] = field(
        default="paper",
        metadata={
            "help": "paper: what the paper's text says; script: what the released script does "
            "(aullm/recipes.py). Every field below left unset takes its recipe's value"
        },
    )
    token_position: Literal["prepend", "append"] | None = field(
        default=None, metadata={"help": "visual token before the prompt (paper) or after it (script)"}
    )
    prompt: str | None = field(default=None, metadata={"help": "task text prompt (paper's English, script's Chinese)"})
    prompt_special_tokens: Literal["tokenizer", "none"] | None = field(
        default=None,
        metadata={
            "help": "tokenizer: the prompt keeps the special tokens its tokenizer adds (a BOS stays first, "
            "before the visual token too), as the script's tokenizer(prompt); none: plain text only"
        },
    )
    train_sampling: Literal["script", "linspace"] = field(
        default="script",
        metadata={"help": "script: onset to a random end frame; linspace: the test sampling"},
    )
    pixel_scale: Literal["raw", "unit"] = field(
        default="raw", metadata={"help": "raw: 0..255 as the released script; unit: 0..1"}
    )
    asl_form: Literal["official", "script"] | None = field(
        default=None,
        metadata={
            "help": "official: ASL with its focusing weights (paper Eq. 4); script: the released script's "
            "gradient, the plain clipped BCE (its weights only change the printed value; aullm/loss.py)"
        },
    )
    loss_reduction: Literal["mean", "sum"] | None = field(
        default=None, metadata={"help": "mean over samples (paper Eq. 4) or sum (script)"}
    )
    gamma_pos: float = 0.0
    gamma_neg: float = 4.0
    asl_clip: float = 0.05
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    efp_activation: Literal["none", "tanh", "gelu", "relu", "sigmoid"] | None = field(
        default=None,
        metadata={"help": "activation on the EFP's output token (paper Eq. 3's sigma; the script has none)"},
    )
    prompt_fusion: Literal["early", "late"] = field(
        default="early",
        metadata={
            "help": "prompt_learning only. early: learnable vectors replace the text prompt and the visual "
            "token still enters the LLM; late: the LLM reads only the vectors (one constant vector for every "
            "clip) and the visual features bypass it to the head (docs/results.md)"
        },
    )
    num_prompt_vectors: int = field(default=4, metadata={"help": "learnable vectors of prompt_learning"})
    batchnorm_stats: Literal["recompute", "running"] | None = field(
        default=None,
        metadata={
            "help": "recompute: after training, BatchNorm statistics are recomputed over the training clips "
            "(test sampling, dropout off) before predicting; running: the moving averages kept during "
            "training, as the released script. Those averages follow a model whose conv weights move "
            "every step and whose inputs pass through Dropout3d, so at eval time they no longer match "
            "what the layer saw: on synthetic data they push every AU's probability up, even on the "
            "training clips, and F1 at the fixed 0.5 threshold collapses to the all-positive level"
        },
    )
    precision: Literal["auto", "bf16", "fp16_llm", "fp32"] | None = field(
        default=None,
        metadata={
            "help": "auto (paper): bf16 LLM on a GPU with the LED and 3D-CNN in fp32, fp32 on the CPU; "
            "fp16_llm (script): fp16 LLM weights, fp32 visual path and head, on a GPU (fp32 on the CPU); "
            "bf16: bf16 autocast on any device; fp32"
        },
    )
    deepspeed: str | None = field(default=None, metadata={"help": "path of a DeepSpeed config (ZeRO-2 shipped)"})

    def __post_init__(self) -> None:
        from aullm.recipes import check_recipe, resolve

        try:
            check_recipe(self.recipe)
        except ValueError as exc:
            raise UserInputError(f"training: field 'recipe': {exc}") from None
        for key, value in resolve(dataclasses.asdict(self)).items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "training") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"{source}: unknown training field '{unknown[0]}'; allowed: {', '.join(sorted(known))}")
        cfg = cls(**{k: v for k, v in values.items() if v is not None})
        cfg.check(source=source)
        return cfg

    def check(self, *, source: str = "training") -> None:
        if self.epochs < 1:
            raise UserInputError(f"{source}: field 'epochs': {self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise UserInputError(f"{source}: field 'batch_size': {self.batch_size} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserInputError(f"{source}: field 'lr': {self.lr} must be a positive number")
        if not 0 <= self.dropout < 1:
            raise UserInputError(f"{source}: field 'dropout': {self.dropout} must be in [0, 1)")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserInputError(f"{source}: field '{name}': '{value}' is not one of {', '.join(allowed)}")
        if not self.prompt or not self.prompt.strip():
            raise UserInputError(f"{source}: field 'prompt': empty; give the task text prompt")


@dataclass
class CellResult:
    """What one cell produced: enough to score it under every protocol, later, pooled."""

    sample_keys: list[str]
    subjects: list[str]
    aus: list[int]
    probs: np.ndarray  # (N, A) sigmoid probabilities on the test split
    labels: np.ndarray  # (N, A) 0/1
    epoch_losses: list[float]
    timing: dict[str, float]
    start_epoch: int = 0  # > 0 when the cell resumed from a checkpoint
    # CPU threads it ran with: on a CPU the last digits of a cell's numbers depend on it
    torch_threads: int = 0

    @classmethod
    def of_test_split(cls, split: Split, probs: np.ndarray, epoch_losses: list[float], *, start_epoch: int,
                      t_start: float, t_pred: float, t_end: float, step_seconds: float, steps: int,
                      llm_load_seconds: float | None) -> "CellResult":  # fmt: skip
        """The result of a cell trained on `split` (one cell alone or in a concurrent loop):
        labels and keys of its test clips, and its timings from perf_counter marks."""
        return cls(
            sample_keys=[s.key for s in split.test],
            subjects=[s.subject for s in split.test],
            aus=list(split.aus),
            probs=probs,
            labels=label_matrix(split.test, split.aus),
            epoch_losses=list(epoch_losses),
            timing={
                "cell_seconds": t_end - t_start,
                "train_step_seconds": step_seconds,
                "steps": steps,
                "predict_seconds": t_end - t_pred,
                "llm_load_seconds": llm_load_seconds,
            },
            start_epoch=start_epoch,
            torch_threads=torch.get_num_threads(),
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "predictions": {
                "sample_keys": self.sample_keys,
                "subjects": self.subjects,
                "aus": self.aus,
                "probs": np.round(self.probs.astype(np.float64), 7).tolist(),
                "labels": self.labels.astype(int).tolist(),
            },
            "epoch_losses": [float(x) for x in self.epoch_losses],
            "timing": self.timing,
            "start_epoch": self.start_epoch,
            "torch_threads": self.torch_threads,
        }


class Preempted(Exception):
    """Raised by `CellTrainer.run` after it saved a checkpoint because the job was told to stop."""


def seed_everything(seed: int) -> None:
    """Every RNG a cell draws from, as the script seeds them (random, numpy, torch, CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device's generator
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# cuBLAS picks reduction orders by workspace unless told a fixed one; this is the value
# PyTorch's reproducibility notes give. It must be set before the first cuBLAS call.
CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(device_type: str) -> None:
    """On CUDA: deterministic cuDNN kernels without autotuning (as the script sets), and
    deterministic algorithms everywhere PyTorch has them, so two runs of a cell give the
    same bits. The CPU kernels used here are deterministic already, and
    `use_deterministic_algorithms` would only make some CPU ops raise."""
    if device_type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # dropout masks on a GPU are drawn from the device generators, not the CPU one
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def llm_dtype(precision: str, *, on_gpu: bool) -> torch.dtype:
    """The dtype the base LLM's weights are loaded in under `precision`."""
    if precision == "bf16" or (precision == "auto" and on_gpu):
        return torch.bfloat16
    if precision == "fp16_llm" and on_gpu:
        return torch.float16
    return torch.float32


def _deepspeed_plugin(config: TrainConfig, *, bf16: bool):
    """DeepSpeed from a JSON config, checked against the sweep and its "auto" values filled
    (aullm/deepspeed_config.py: the same rules `validate` applied at submit)."""
    from accelerate.utils import DeepSpeedPlugin

    from aullm.deepspeed_compat import patch_scalar_parameter_broadcast
    from aullm.deepspeed_config import check_config, fill_auto, read_config

    patch_scalar_parameter_broadcast()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    ds = read_config(config.deepspeed)
    check_config(ds, path=config.deepspeed, batch_size=config.batch_size, precision=config.precision, processes=processes)
    return DeepSpeedPlugin(hf_ds_config=fill_auto(ds, batch_size=config.batch_size, processes=processes, bf16=bf16))


def _join_process_group(on_gpu: bool) -> None:
    """Join a process group unless this process is already in one.

    DeepSpeed needs a process group; finding none (and no RANK/WORLD_SIZE), it asks MPI
    through mpi4py. A task of several processes joined theirs in jobs/process_group.py;
    a lone process (local executor, one GPU per Slurm task, debug) gets the same shape
    here: env:// variables for rank 0 of 1, and an in-memory store, so no port is taken.
    A launcher's env:// variables for several processes (torchrun) are used as they are."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if on_gpu else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend=backend)
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def _freeze_what_outlives_cells() -> None:
    """Collect what earlier cells left in reference cycles, then exempt every surviving
    object (the base LLM, the imported modules, the data stores) from later collections.

    Accelerate's `free_memory`, which each cell calls once done, runs a full `gc.collect`;
    over the heap of torch, transformers and mlflow that cost 0.4 s a cell on the CPU, a
    tenth of a packed 3-epoch cell. After a freeze it scans only the cell's own objects.
    Called when no cell is running (a frozen object in a cycle is never collected, so the
    cell's model must not be frozen); freezing twice only adds the new survivors."""
    gc.collect()
    gc.freeze()


class CellTrainer:
    """Owns what a process keeps across cells: the accelerator and the loaded base LLM."""

    def __init__(self, llm_path: str | os.PathLike[str] | None, config: TrainConfig | None = None) -> None:
        from accelerate import Accelerator

        self.config = config or TrainConfig()
        self.llm_path = str(llm_path) if llm_path is not None else None
        self.accelerator = Accelerator(**self._accelerator_kwargs(self.config))
        self.device = self.accelerator.device
        configure_determinism(self.device.type)
        # time.time() when this trainer's first training step began (the task's first step:
        # the trainer lives as long as the task); what start-up costs is measured up to it.
        # The event lets work the first step does not need (the MLflow start) wait for it.
        self.first_step_at: float | None = None
        self.training_started = threading.Event()
        t0 = time.perf_counter()
        self.llm = None
        if self.llm_path is not None:
            from aullm.model.llm import LoraSettings, load_base_llm

            dtype = llm_dtype(self.config.precision, on_gpu=self.device.type == "cuda")
            self.llm = load_base_llm(
                self.llm_path,
                dtype=dtype,
                lora=LoraSettings(r=self.config.lora_r, alpha=self.config.lora_alpha, dropout=self.config.lora_dropout),
            )
            self.llm.to(self.device)
        self.load_seconds = time.perf_counter() - t0

    def mark_first_step(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
            self.training_started.set()

    @staticmethod
    def _accelerator_kwargs(config: TrainConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        on_gpu = torch.cuda.is_available()
        # fp16_llm casts by hand (the script's .half() / .float()), so it takes no autocast
        if llm_dtype(config.precision, on_gpu=on_gpu) == torch.bfloat16:
            kwargs["mixed_precision"] = "bf16"
        else:
            kwargs["mixed_precision"] = "no"
        if config.deepspeed:
            _join_process_group(on_gpu)
            kwargs["deepspeed_plugin"] = _deepspeed_plugin(config, bf16=kwargs["mixed_precision"] == "bf16")
            if not on_gpu:
                from accelerate.utils import InitProcessGroupKwargs

                # Accelerate drops DeepSpeed under cpu=True, and without a backend it counts
                # one process whatever the group: name gloo, the group's backend on the CPU.
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            return kwargs  # DeepSpeed's engine averages the gradients: no DDP settings
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # Without cpu=True, Accelerate ignores a multi-process environment on a machine without GPU.
            kwargs["cpu"] = not on_gpu
            # Every process trains the whole batch (jobs/process_group.py); some variants leave
            # parameters without a gradient (f_mid never uses F_high's layer), which DDP must expect.
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
        return kwargs

    def run(
        self,
        split: Split,
        store: ClipStore,
        variant: str,
        seed: int,
        config: TrainConfig | None = None,
        *,
        on_epoch: Callable[[int, float], None] | None = None,
        checkpoint_path: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CellResult:
        """Train on `split.train`, predict `split.test`.

        With `checkpoint_path`, a cell resumes from a checkpoint found there, and when
        `should_stop()` turns true (a preemption signal) it saves one and raises
        `Preempted`, so a requeued task continues at the same epoch.
        """
        from aullm.model.au_llm import AULLM, ModelSettings

        cfg = config or self.config
        cfg.check()
        if variant not in VARIANTS:
            raise UserInputError(f"unknown variant '{variant}'; allowed: {', '.join(VARIANTS)}")
        needs_llm = variant not in VARIANTS_WITHOUT_LLM
        if needs_llm and self.llm is None:
            raise UserInputError(f"variant '{variant}' needs an LLM but this trainer was built without one")
        if not split.train or not split.test:
            raise UserInputError(f"fold '{split.name}' has no {'training' if not split.train else 'test'} samples")

        t_start = time.perf_counter()
        if needs_llm:
            from aullm.model.llm import LoraSettings

            # A task packs cells that may sweep the LoRA settings: the adapters follow the cell.
            # Before the seed: new adapters draw their init from the global RNG, and a draw
            # after it would give this cell another model init whenever the cell before it in
            # the pack had other LoRA settings (a fresh process builds the trainer's own).
            self.llm.use_lora(LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))
        _freeze_what_outlives_cells()
        seed_everything(seed)
        if needs_llm:
            self.llm.reset_adapters(seed)
        # every ModelSettings field has its namesake in TrainConfig
        settings = ModelSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelSettings)})
        model = AULLM.build(variant, len(split.aus), self.llm if needs_llm else None, settings).to(self.device)
        params = [p for p in model.trainable_parameters()]
        # fused Adam: one kernel over all tensors; 4.5x faster than the loop on a 2-core CPU
        # for the 60M-parameter EFP, and available on CUDA too.
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        loss_fn = AsymmetricLoss(
            gamma_pos=cfg.gamma_pos,
            gamma_neg=cfg.gamma_neg,
            clip=cfg.asl_clip,
            form=cfg.asl_form,
            reduction=cfg.loss_reduction,
        )
        model, optimizer = self.accelerator.prepare(model, optimizer)
        # Whatever happens to this cell (done, preempted, failed), the accelerator lets go of
        # its model and optimizer: a failed cell must not stay reachable, and so be frozen
        # by `_freeze_what_outlives_cells`, while the next cells of the pack train.
        try:
            train_labels = torch.from_numpy(label_matrix(split.train, split.aus))
            sampling_rng = np.random.default_rng(seed)
            scale = 1.0 / 255.0 if cfg.pixel_scale == "unit" else 1.0
            n_train = len(split.train)

            start_epoch, epoch_losses = 0, []
            if checkpoint_path is not None and checkpoint_path.is_file():
                start_epoch, epoch_losses, sampling_rng = self._load_checkpoint(checkpoint_path, model, optimizer)

            step_seconds = 0.0
            steps = 0
            for epoch in range(start_epoch, cfg.epochs):
                if should_stop is not None and checkpoint_path is not None and should_stop():
                    if self.config.deepspeed:  # each rank holds its own shard of the optimizer state
                        self._save_engine(checkpoint_path, model)
                    if self.accelerator.is_main_process:  # the rest is the same on every rank: one writer
                        self._save_checkpoint(checkpoint_path, model, optimizer, epoch, epoch_losses, sampling_rng)
                    self.accelerator.wait_for_everyone()
                    raise Preempted(f"stopped before epoch {epoch}; checkpoint at {checkpoint_path}")
                model.train()
                order = sampling_rng.permutation(n_train)
                running, seen = 0.0, 0
                for lo in range(0, n_train, cfg.batch_size):
                    idx = order[lo : lo + cfg.batch_size]
                    batch_samples = [split.train[i] for i in idx]
                    if cfg.train_sampling == "script":
                        clips = store.batch(batch_samples, lambda n: train_frame_indices(n, sampling_rng, NUM_FRAMES))
                    else:
                        clips = store.batch(batch_samples, lambda n: test_frame_indices(n, NUM_FRAMES))
                    x = torch.from_numpy(clips * scale).to(self.device)
                    y = train_labels[idx].to(self.device)
                    self.mark_first_step()
                    t0 = time.perf_counter()
                    with self.accelerator.autocast():
                        logits = model(x)
                        loss = loss_fn(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    self.accelerator.backward(loss)
                    optimizer.step()
                    step_seconds += time.perf_counter() - t0
                    steps += 1
                    # per-sample loss, whatever the reduction, so epochs compare across recipes
                    running += float(loss.detach()) * (len(idx) if cfg.loss_reduction == "mean" else 1)
                    seen += len(idx)
                epoch_loss = running / seen
                epoch_losses.append(epoch_loss)
                if on_epoch is not None:
                    on_epoch(epoch, epoch_loss)

            t_pred = time.perf_counter()
            if cfg.batchnorm_stats == "recompute":
                self._recompute_batchnorm_stats(model, split, store, scale)
            probs = self._predict(model, split, store, scale)
            t_end = time.perf_counter()
            if checkpoint_path is not None and self.accelerator.is_main_process:
                checkpoint_path.unlink(missing_ok=True)
                shutil.rmtree(_engine_dir(checkpoint_path), ignore_errors=True)
        finally:
            self.accelerator.free_memory()

        return CellResult.of_test_split(split, probs, epoch_losses, start_epoch=start_epoch, t_start=t_start,
                                        t_pred=t_pred, t_end=t_end, step_seconds=step_seconds, steps=steps,
                                        llm_load_seconds=self.load_seconds)  # fmt: skip

    @torch.no_grad()
    def _recompute_batchnorm_stats(self, model: torch.nn.Module, split: Split, store: ClipStore, scale: float) -> None:
        """Replace BatchNorm's moving averages by the exact statistics of the training clips.

        Only training clips are used (nothing of the held-out subject), sampled as at test
        time, with dropout off: the statistics are then those of the inputs the layers see
        when predicting. Only the visual backbone holds BatchNorm, so only it runs.
        """
        backbone = self._unwrap(model).backbone
        norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        backbone.eval()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below, not a moving one
            m.train()
        for x in self._test_sampled_batches(split.train, store, scale):
            with self.accelerator.autocast():
                backbone(x)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        backbone.eval()

    @torch.no_grad()
    def _predict(self, model: torch.nn.Module, split: Split, store: ClipStore, scale: float) -> np.ndarray:
        model.eval()
        out = []
        for x in self._test_sampled_batches(split.test, store, scale):
            with self.accelerator.autocast():
                logits = model(x)
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out, axis=0)

    def _test_sampled_batches(self, samples: list[Sample], store: ClipStore, scale: float) -> Iterator[torch.Tensor]:
        """`samples` as input tensors on the device, 256 clips at a time, frames sampled as at test time."""
        for lo in range(0, len(samples), 256):
            clips = store.batch(samples[lo : lo + 256], lambda n: test_frame_indices(n, NUM_FRAMES))
            yield torch.from_numpy(clips * scale).to(self.device)

    # -- checkpoints: everything that decides the rest of the run ---------------------------

    def _unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Accelerate's unwrap_model imports DeepSpeed (5 s) even when it is not in use
        return self.accelerator.unwrap_model(model) if self.config.deepspeed else getattr(model, "module", model)

    def _save_checkpoint(self, path, model, optimizer, epoch, epoch_losses, sampling_rng) -> None:
        unwrapped = self._unwrap(model)
        trainable = {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
        buffers = {n: b.detach().cpu() for n, b in unwrapped.named_buffers()}
        state = {
            "epoch": epoch,
            "epoch_losses": list(epoch_losses),
            "trainable": trainable,
            "buffers": buffers,
            # under DeepSpeed the engine saved the (partitioned) optimizer state beside this file
            "optimizer": None if self.config.deepspeed else optimizer.state_dict(),
            "rng": _rng_state(),
            "sampling_rng": sampling_rng.bit_generator.state,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_checkpoint(self, path, model, optimizer) -> tuple[int, list[float], np.random.Generator]:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("concurrent"):
            # a concurrent loop keeps the cell's LoRA weights beside the model's, not in it:
            # resumed here the cell would go on without its adapters, silently
            raise UserInputError(f"checkpoint {path} was written by a concurrent loop (resources.concurrent_cells > 1); "
                                 "resume with the same concurrent_cells, or delete it to train the cell from the start")
        unwrapped = self._unwrap(model)
        named = dict(unwrapped.named_parameters())
        named_buffers = dict(unwrapped.named_buffers())
        with torch.no_grad():
            for n, value in state["trainable"].items():
                named[n].copy_(value)
            for n, value in state["buffers"].items():
                named_buffers[n].copy_(value)
        if self.config.deepspeed:
            self._load_engine(path, model)
        else:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["sampling_rng"]
        return int(state["epoch"]), list(state["epoch_losses"]), rng

    # DeepSpeed: the engine saves and restores what ZeRO partitioned (each rank its shard of
    # the optimizer state, with the fp32 master weights); the base LLM's frozen weights are
    # left out, they are reloaded with the task. Every rank calls these (collectives).

    def _save_engine(self, path: Path, model) -> None:
        model.save_checkpoint(str(_engine_dir(path)), tag=_ENGINE_TAG, exclude_frozen_parameters=True)
        # rank 0's state file, written next, marks the checkpoint complete: every shard first
        self.accelerator.wait_for_everyone()

    def _load_engine(self, path: Path, model) -> None:
        loaded, _ = model.load_checkpoint(
            str(_engine_dir(path)), tag=_ENGINE_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )  # fmt: skip
        if loaded is None:
            raise RuntimeError(f"no DeepSpeed engine checkpoint in {_engine_dir(path)} beside {path}")


_ENGINE_TAG = "cell"


def _engine_dir(path: Path) -> Path:
    """Where the DeepSpeed engine of the cell checkpointed at `path` saves its shards."""
    return path.with_name(path.name + ".deepspeed")
