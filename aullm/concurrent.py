"""Train K cells in one loop: one frozen base-LLM pass per step serves all of them.

A cell is small (about 256 one-token clips and a 350-step schedule): alone, its step
cannot fill a GPU, and packing (train.py) only saves the LLM load. Here the K cells of
a group advance together. Each step

  - runs the K visual backbones, projectors and heads as stacked modules: the K cells'
    convolutions are one grouped convolution (groups=K), their linear layers one batched
    matmul over cells (`torch.baddbmm`), on a padded (K, n_max, ...) layout;
  - concatenates the K cells' token sequences and runs the frozen base LLM once, with
    per-sample LoRA: each q/v projection adds `B_k A_k x` of the sample's own cell,
    computed as one batched matmul over cells (rows padded per cell), never a loop over
    samples;
  - sums the K cells' losses and back-propagates once: a cell's parameters only reach
    its own loss, so each gets exactly its own gradient; each cell keeps its own Adam.

What stays per cell, so that a cell does not depend on the cells beside it:
  - BatchNorm batch statistics and moving averages: computed over the cell's own real
    rows (padding never enters them);
  - every random draw: model initialisation (from the cell's seed, as train.py), frame
    sampling and the order of the clips (the cell's own numpy generator, as train.py), and
    every dropout mask (the cell's own torch generator, which continues the global stream
    train.py's cell would have drawn from: on the CPU, K=1 gives the same masks);
  - epochs and steps: folds have different training-set sizes, so a cell may need more
    steps per epoch than another; a step includes only the cells that have a batch in
    it, and only their optimizers step;
  - the end: a cell that finished its epochs predicts and is reported at once (results,
    checkpoints and MLflow runs stay per cell in jobs/run_cells.py);
  - checkpoints: on a stop request every unfinished cell saves its own checkpoint
    (train.py's format plus its adapters and dropout generator) and a requeued task
    resumes each from its own epoch.

Prediction (after training) goes through the cell's own `AULLM` and the single-cell
code of train.py (`_recompute_batchnorm_stats`, `_predict`), after loading the cell's
adapters into the shared LLM: prediction is one forward pass, not worth batching.

Numerics: with K=1 every stacked op takes the single-cell op (same call, same shapes),
so K=1 is bit-exact against `CellTrainer.run`. With K>1 the batched matmuls and the
concatenated LLM pass sum in other orders: equal within float rounding (tests/
test_concurrent.py measures it), not bit for bit.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aullm.constants import MAX_CONCURRENT_CELLS, NUM_FRAMES, VARIANTS, VARIANTS_WITHOUT_LLM
from aullm.data.clips import ClipStore, test_frame_indices, train_frame_indices
from aullm.data.folds import Split, label_matrix
from aullm.errors import UserInputError
from aullm.loss import AsymmetricLoss
from aullm.model.projector import FeatureProjector
from aullm.train import (
    CellResult,
    CellTrainer,
    Preempted,
    TrainConfig,
    _freeze_what_outlives_cells,
    _rng_state,
    _set_rng_state,
    seed_everything,
)

# Variants that can share a loop: those whose LLM reads a per-sample sequence. no_llm has
# no LLM to share; late-fusion prompt_learning runs its LLM once per batch on a constant.
CONCURRENT_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v not in VARIANTS_WITHOUT_LLM)

# Test-only mutation hook: when True every cell of a group uses the first cell's LoRA
# adapters, i.e. the adapters are shared across cells. The equality tests must fail then.
# AULLM_TEST_SHARE_ADAPTERS=1 sets it in a task process (tests/test_concurrent_grid.py); never in CI's own runs.
SHARE_ADAPTERS_FOR_TESTS = os.environ.get("AULLM_TEST_SHARE_ADAPTERS") == "1"


def can_run_concurrently(variant: str, config: TrainConfig) -> bool:
    """Whether a cell of `variant` under `config` can train in a concurrent group."""
    if variant not in CONCURRENT_VARIANTS:
        return False
    if variant == "prompt_learning" and config.prompt_fusion == "late":
        return False
    return not config.deepspeed  # DeepSpeed's engine owns one model and one optimizer


# `concurrent_cells: auto` packs as many cells as fit in this share of the free memory: the
# rest absorbs what one measured step cannot show (the allocator's fragmentation, ragged
# cells' padding beyond the measured pair, prediction's batches, other processes' growth).
USABLE_FRACTION = 0.9
GIB = 1024**3


def choose_concurrent_cells(free_bytes: int, per_cell_bytes: int, *, cells: int, usable_fraction: float = USABLE_FRACTION,
                            cap: int = MAX_CONCURRENT_CELLS) -> int:  # fmt: skip
    """The largest K with K * per_cell_bytes <= usable_fraction * free_bytes, no more than
    the `cells` a loop could hold nor `cap`, and at least 1 (one cell alone trains as it
    always did: if it does not fit, packing would not have made it fit)."""
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction {usable_fraction} must be in (0, 1]")
    room = int(free_bytes * usable_fraction) // max(int(per_cell_bytes), 1)
    return max(1, min(room, cells, cap))


def auto_without_measuring(device_type: str, *, has_llm: bool, processes: int, deepspeed: bool) -> str | None:
    """Why `concurrent_cells: auto` is 1 without measuring anything, or None when it must
    measure (one process on a GPU, with an LLM and without DeepSpeed)."""
    if deepspeed:
        return "DeepSpeed"  # its engine owns one model and one optimizer
    if processes > 1:
        return f"{processes} processes"  # data parallelism wraps one model in DDP
    if not has_llm:
        return "no LLM"  # nothing shared to batch
    if device_type != "cuda":
        # on a CPU K cells at once are slower than one after another: K times larger
        # activations fall out of the cache (0.65x at K=4 on a 0.1B model, docs/concurrent.md)
        return device_type.upper()
    return None


def describe_auto(k: int, per_cell_bytes: int, free_bytes: int, *, cells: int, usable_fraction: float = USABLE_FRACTION,
                  cap: int = MAX_CONCURRENT_CELLS) -> str:  # fmt: skip
    """K and why, for the task's log line: what was measured and which bound set K."""
    room = int(free_bytes * usable_fraction) // max(int(per_cell_bytes), 1)
    bounds = [f"room for {room}"]
    if cells < room:
        bounds.append(f"{cells} cells to train")
    if cap < min(room, cells):
        bounds.append(f"at most {cap}")
    return (f"{k} (per cell {per_cell_bytes / GIB:.1f} GiB measured, {free_bytes / GIB:.1f} GiB free, "
            f"{usable_fraction:.0%} usable: {', '.join(bounds)})")  # fmt: skip


class CudaMemory:
    """What the measurement reads of a CUDA device: allocated bytes, their peak, and the
    device's free bytes. A seam, so that the CPU tests can run the measurement's training
    steps with a stand-in (the CPU has no allocator statistics)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"memory statistics need a CUDA device, not {device}")
        self.device = device

    def settle(self) -> None:
        gc.collect()  # a model left in a reference cycle still holds its tensors
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # cached blocks count as used in mem_get_info

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]


@dataclass
class ConcurrentCell:
    """One cell of a group: what `CellTrainer.run` takes, plus its callbacks."""

    key: str
    split: Split
    store: ClipStore
    variant: str
    seed: int
    on_epoch: Callable[[int, float], None] | None = None
    checkpoint_path: Path | None = None


@dataclass
class _State:
    """A cell while it trains: its model (the parameter holder), adapters, optimizer, RNGs."""

    cell: ConcurrentCell
    model: nn.Module
    lora: list[tuple[nn.Parameter, nn.Parameter]]  # per LoRA layer of the shared LLM: (A, B)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every dropout mask of this cell
    sampling_rng: np.random.Generator
    train_labels: Tensor
    epoch: int
    epoch_losses: list[float]
    t_start: float
    step_seconds: float = 0.0
    steps: int = 0
    start_epoch: int = 0
    # within the current epoch
    order: np.ndarray | None = None
    running: float = 0.0
    seen: int = 0


class ConcurrentTrainer:
    """Trains groups of cells concurrently on the LLM a `CellTrainer` loaded."""

    def __init__(self, trainer: CellTrainer) -> None:
        if trainer.llm is None:
            raise UserInputError("concurrent cells share an LLM; this trainer was built without one")
        if trainer.config.deepspeed:
            raise UserInputError("resources.concurrent_cells > 1 does not combine with training.deepspeed")
        self.trainer = trainer
        self.llm = trainer.llm
        self.device = trainer.device
        self._lora_layers = [m for _, m in self.llm.lora_layers()]

    # -- how many cells fit --------------------------------------------------------------

    def measure_cell_bytes(self, cells: list[ConcurrentCell], config: TrainConfig | None = None,
                           memory: CudaMemory | None = None) -> int:  # fmt: skip
        """Device bytes one more cell of a loop takes: two cells (those with the most training
        clips, so the largest batches) trained together for two steps, through the very code
        of `run`, the peak allocated above what was allocated before (the shared LLM), halved.

        Two cells, not one: K > 1 takes another path than K = 1 (per-sample LoRA pads and
        stacks each layer's rows, and keeps that copy for the backward pass), and halving
        two cells' cost counts the step's one-off buffers as if each cell paid them: an
        overestimate for K > 2, never an under one. Two steps: the peak of the second holds
        the first's Adam state and its gradients (freed only at the next zero_grad, after
        the forward pass) beside its own activations. Nothing of it outlives the call: the
        cells start from their own seeds in `run` (`_start`), as they would without it."""
        cfg = config or self.trainer.config
        cfg.check()
        memory = memory or CudaMemory(self.device)
        biggest = sorted(cells, key=lambda c: len(c.split.train), reverse=True)[:2]
        pair = [dataclasses.replace(c, key=f"measure-{i}", on_epoch=None, checkpoint_path=None) for i, c in enumerate(biggest)]
        pair += [dataclasses.replace(pair[0], key="measure-1")] if len(pair) == 1 else []
        from aullm.model.llm import LoraSettings

        self.llm.use_lora(LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))
        self._lora_layers = [m for _, m in self.llm.lora_layers()]
        loss_fn = AsymmetricLoss(
            gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg, clip=cfg.asl_clip, form=cfg.asl_form,
            reduction=cfg.loss_reduction,
        )  # fmt: skip
        scale = 1.0 / 255.0 if cfg.pixel_scale == "unit" else 1.0
        memory.settle()
        before = memory.allocated()
        memory.reset_peak()
        states = [self._start(c, cfg) for c in pair]
        try:
            for s in states:
                s.model.train()
                s.order = s.sampling_rng.permutation(len(s.cell.split.train))
            del s  # else the last cell's model outlives the measurement and the free memory reads less
            for _ in range(2):
                # the first batch twice (a fold may have one); a measurement, not the task's
                # first training step: MLflow runs and the start-up figure wait for that one
                self._step(states, 0, cfg, scale, loss_fn, first_step=False)
            peak = memory.peak()
        finally:
            self._release(states)
            del states
            memory.settle()
        return max(peak - before, 0) // 2

    def choose_k(self, cells: list[ConcurrentCell], config: TrainConfig | None = None,
                 memory: CudaMemory | None = None) -> tuple[int, str]:  # fmt: skip
        """K for `concurrent_cells: auto` on this trainer's device, for a loop of `cells`,
        and the reason, for the task's log line."""
        if len(cells) < 2:
            return 1, f"1 ({'one cell' if cells else 'no cell'} to train)"
        memory = memory or CudaMemory(self.device)
        per_cell = self.measure_cell_bytes(cells, config, memory)
        free = memory.free()  # after the measurement let go: what the cells may take
        k = choose_concurrent_cells(free, per_cell, cells=len(cells))
        return k, describe_auto(k, per_cell, free, cells=len(cells))

    # -- the loop -----------------------------------------------------------------------

    def run(
        self,
        cells: list[ConcurrentCell],
        config: TrainConfig | None = None,
        *,
        on_done: Callable[[ConcurrentCell, CellResult | BaseException], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, CellResult | BaseException]:
        """Train `cells` together; each ends with a `CellResult` or the exception that
        ended it, reported through `on_done` as soon as it is known. On a stop request
        (checked at epoch boundaries, as train.py) every unfinished cell with a
        checkpoint path saves its checkpoint, and `Preempted` is raised."""
        cfg = config or self.trainer.config
        cfg.check()
        # the cells' LoRA settings, as CellTrainer.run takes them (a task may sweep them): the
        # adapters may be rebuilt, so the layers are looked up again, never kept from before
        from aullm.model.llm import LoraSettings

        self.llm.use_lora(LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))
        self._lora_layers = [m for _, m in self.llm.lora_layers()]
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            raise ValueError(f"concurrent cells must have distinct keys: {keys}")
        for c in cells:
            if not can_run_concurrently(c.variant, cfg):
                raise UserInputError(f"cell {c.key}: variant '{c.variant}' cannot train concurrently")
            if not c.split.train or not c.split.test:
                raise UserInputError(f"fold '{c.split.name}' has no {'training' if not c.split.train else 'test'} samples")
        if len({c.variant for c in cells}) > 1:
            raise UserInputError(f"a concurrent group trains one variant; got {sorted({c.variant for c in cells})}")

        results: dict[str, CellResult | BaseException] = {}

        def finish(state: _State, outcome: CellResult | BaseException) -> None:
            results[state.cell.key] = outcome
            if on_done is not None:
                on_done(state.cell, outcome)

        _freeze_what_outlives_cells()
        states = [self._start(c, cfg) for c in cells]
        loss_fn = AsymmetricLoss(
            gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg, clip=cfg.asl_clip, form=cfg.asl_form,
            reduction=cfg.loss_reduction,
        )  # fmt: skip
        scale = 1.0 / 255.0 if cfg.pixel_scale == "unit" else 1.0
        try:
            active = [s for s in states if not self._maybe_finish(s, cfg, scale, finish)]
            while active:
                if should_stop is not None and should_stop():
                    for s in active:
                        if s.cell.checkpoint_path is not None:
                            self._save_checkpoint(s)
                    raise Preempted(f"stopped {len(active)} concurrent cell(s) at their epoch boundary")
                for s in active:
                    s.model.train()
                    s.order = s.sampling_rng.permutation(len(s.cell.split.train))
                    s.running, s.seen = 0.0, 0
                n_steps = max(_steps_per_epoch(s, cfg) for s in active)
                try:
                    for step in range(n_steps):
                        # a cell with fewer clips has fewer steps: it sits out the rest of the epoch
                        self._step([s for s in active if step < _steps_per_epoch(s, cfg)], step, cfg, scale, loss_fn)
                except Exception as exc:  # noqa: BLE001 - a shared step fails every cell in it
                    for s in active:
                        finish(s, exc)
                    return results
                still = []
                for s in active:
                    loss = s.running / s.seen
                    s.epoch_losses.append(loss)
                    s.epoch += 1
                    try:
                        if s.cell.on_epoch is not None:
                            s.cell.on_epoch(s.epoch - 1, loss)
                        if self._maybe_finish(s, cfg, scale, finish):
                            continue
                    except Exception as exc:  # noqa: BLE001 - this cell's own failure: the others go on
                        finish(s, exc)
                        continue
                    still.append(s)
                active = still
        finally:
            self._release(states)
        return results

    def _step(self, group: list[_State], step: int, cfg: TrainConfig, scale: float, loss_fn: AsymmetricLoss,
              *, first_step: bool = True) -> None:  # fmt: skip
        xs, ys = [], []
        for s in group:
            idx = s.order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            batch = [s.cell.split.train[i] for i in idx]
            if cfg.train_sampling == "script":
                clips = s.cell.store.batch(batch, lambda n, rng=s.sampling_rng: train_frame_indices(n, rng, NUM_FRAMES))
            else:
                clips = s.cell.store.batch(batch, lambda n: test_frame_indices(n, NUM_FRAMES))
            xs.append(torch.from_numpy(clips * scale).to(self.device))
            ys.append(s.train_labels[idx].to(self.device))
        if first_step:
            self.trainer.mark_first_step()
        t0 = time.perf_counter()
        with self.trainer.accelerator.autocast():
            logits = self.forward(group, xs)
            losses = [loss_fn(lg.float(), y) for lg, y in zip(logits, ys, strict=True)]
        for s in group:
            s.optimizer.zero_grad(set_to_none=True)
        # each cell's parameters reach only its own loss: the sum gives each its own gradient
        torch.stack(losses).sum().backward()
        for s in group:
            s.optimizer.step()
        seconds = time.perf_counter() - t0
        for s, loss, y in zip(group, losses, ys, strict=True):
            s.step_seconds += seconds / len(group)  # the step's time, shared among its cells
            s.steps += 1
            s.running += float(loss.detach()) * (len(y) if cfg.loss_reduction == "mean" else 1)
            s.seen += len(y)

    # -- the stacked forward ----------------------------------------------------------

    def forward(self, group: list[_State], xs: list[Tensor]) -> list[Tensor]:
        """Logits of each cell's batch (training mode): the K models as one computation."""
        models = [s.model for s in group]
        gens = [s.generator for s in group]
        sizes = [len(x) for x in xs]
        if VISUAL_MODE == "per_cell":
            visual = [_own_rng(m, g, x) for m, g, x in zip(models, gens, xs, strict=True)]
            tokens = torch.cat(visual)
        else:
            f_mid, f_high = _stacked_backbone([m.backbone for m in models], xs, gens)
            padded = _stacked_projector([m.projector for m in models], f_mid, f_high, gens, sizes)  # (K, n_max, D)
            tokens = _unpad_rows(padded, sizes)
        m0 = models[0]
        llm = self.llm
        tokens = tokens.unsqueeze(1).to(llm.dtype)  # (N, 1, D)
        prefix = m0.prompt_prefix.to(llm.dtype).expand(len(tokens), -1, -1)
        if m0.prompt_vectors is not None:  # early-fusion prompt learning: each cell its own vectors
            context = torch.cat([m.prompt_vectors.unsqueeze(0).expand(n, -1, -1) for m, n in zip(models, sizes)])
            context = context.to(llm.dtype)
        else:
            context = m0.prompt_embeds.expand(len(tokens), -1, -1).to(llm.dtype)
        if m0.settings.token_position == "prepend":
            seq = torch.cat([prefix, tokens, context], dim=1)
        else:
            seq = torch.cat([prefix, context, tokens], dim=1)
        lora = [group[0].lora] * len(group) if SHARE_ADAPTERS_FOR_TESTS else [s.lora for s in group]
        with self._per_sample_lora(lora, sizes, gens):
            h = llm.last_hidden(seq)
        heads = [m.head for m in models]
        h = h.to(heads[0].weight.dtype)
        if VISUAL_MODE == "per_cell":
            bounds = np.cumsum([0, *sizes])
            return [head(h[lo:hi]) for head, lo, hi in zip(heads, bounds[:-1], bounds[1:], strict=True)]
        logits = _stacked_linear(heads, _pad_rows(h, sizes))
        return [logits[k, :n] for k, n in enumerate(sizes)]

    @contextmanager
    def _per_sample_lora(self, lora: list[list[tuple[nn.Parameter, nn.Parameter]]], sizes: list[int],
                         gens: list[torch.Generator]) -> Iterator[None]:  # fmt: skip
        """Replace each LoRA layer's forward by base + per-sample LoRA for the duration."""
        layers = self._lora_layers
        for i, layer in enumerate(layers):
            adapters = [cell[i] for cell in lora]
            layer.forward = _lora_forward(layer, adapters, sizes, gens)  # instance attribute shadows the method
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward

    # -- cells: start, finish, checkpoint --------------------------------------------------

    def _start(self, cell: ConcurrentCell, cfg: TrainConfig) -> _State:
        """The cell's model, adapters, optimizer and RNGs, exactly as `CellTrainer.run` starts it."""
        from aullm.model.au_llm import AULLM, ModelSettings

        t_start = time.perf_counter()
        seed_everything(cell.seed)
        self.llm.reset_adapters(cell.seed)
        settings = ModelSettings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelSettings)})
        model = AULLM.build(cell.variant, len(cell.split.aus), self.llm, settings).to(self.device)
        # what train.py's cell would draw its dropout masks from next: the global stream after init
        generator = torch.Generator(device=self.device)
        generator.set_state((torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.get_rng_state()))
        lora = [
            (nn.Parameter(_adapter(layer, "A").detach().clone()), nn.Parameter(_adapter(layer, "B").detach().clone()))
            for layer in self._lora_layers
        ]
        own = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]
        params = own + [p for pair in lora for p in pair]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        state = _State(
            cell=cell, model=model, lora=lora, optimizer=optimizer, generator=generator,
            sampling_rng=np.random.default_rng(cell.seed),
            train_labels=torch.from_numpy(label_matrix(cell.split.train, cell.split.aus)),
            epoch=0, epoch_losses=[], t_start=t_start,
        )  # fmt: skip
        if cell.checkpoint_path is not None and cell.checkpoint_path.is_file():
            self._load_checkpoint(state)
        state.start_epoch = state.epoch
        return state

    def _maybe_finish(self, s: _State, cfg: TrainConfig, scale: float,
                      finish: Callable[[_State, CellResult | BaseException], None]) -> bool:  # fmt: skip
        if s.epoch < cfg.epochs:
            return False
        try:
            finish(s, self._predict(s, cfg, scale))
        except Exception as exc:  # noqa: BLE001 - this cell's failure only
            finish(s, exc)
        return True

    @torch.no_grad()
    def _predict(self, s: _State, cfg: TrainConfig, scale: float) -> CellResult:
        """Through the single-cell code, with this cell's adapters in the shared LLM."""
        t_pred = time.perf_counter()
        _load_adapters(self._lora_layers, s.lora)
        split, store = s.cell.split, s.cell.store
        if cfg.batchnorm_stats == "recompute":
            self.trainer._recompute_batchnorm_stats(s.model, split, store, scale)
        probs = self.trainer._predict(s.model, split, store, scale)
        t_end = time.perf_counter()
        if s.cell.checkpoint_path is not None:
            s.cell.checkpoint_path.unlink(missing_ok=True)
        return CellResult.of_test_split(split, probs, s.epoch_losses, start_epoch=s.start_epoch, t_start=s.t_start,
                                        t_pred=t_pred, t_end=t_end, step_seconds=s.step_seconds, steps=s.steps,
                                        llm_load_seconds=self.trainer.load_seconds)  # fmt: skip

    def _save_checkpoint(self, s: _State) -> None:
        path = s.cell.checkpoint_path
        assert path is not None
        model = s.model
        state = {
            "epoch": s.epoch,
            "epoch_losses": list(s.epoch_losses),
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")},
            "buffers": {n: b.detach().cpu() for n, b in model.named_buffers() if not n.startswith("llm.")},
            "lora": [(a.detach().cpu(), b.detach().cpu()) for a, b in s.lora],
            "optimizer": s.optimizer.state_dict(),
            "generator": s.generator.get_state(),
            "rng": _rng_state(),
            "sampling_rng": s.sampling_rng.bit_generator.state,
            "concurrent": True,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_checkpoint(self, s: _State) -> None:
        path = s.cell.checkpoint_path
        assert path is not None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not state.get("concurrent"):
            # a checkpoint of the single-cell trainer (the task ran with concurrent_cells 1
            # before): its adapters live in the shared LLM's names, not ours
            raise RuntimeError(f"{path}: a single-cell checkpoint; resume it with concurrent_cells 1")
        named = dict(s.model.named_parameters())
        buffers = dict(s.model.named_buffers())
        with torch.no_grad():
            for n, v in state["trainable"].items():
                named[n].copy_(v)
            for n, v in state["buffers"].items():
                buffers[n].copy_(v)
            for (a, b), (va, vb) in zip(s.lora, state["lora"], strict=True):
                a.copy_(va)
                b.copy_(vb)
        s.optimizer.load_state_dict(state["optimizer"])
        s.generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        s.sampling_rng.bit_generator.state = state["sampling_rng"]
        s.epoch = int(state["epoch"])
        s.epoch_losses = list(state["epoch_losses"])

    def _release(self, states: list[_State]) -> None:
        for s in states:
            s.optimizer.state.clear()
        states.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _steps_per_epoch(s: _State, cfg: TrainConfig) -> int:
    return -(-len(s.cell.split.train) // cfg.batch_size)


# -- LoRA, per sample ---------------------------------------------------------------------


def _adapter(layer: nn.Module, which: str) -> Tensor:
    adapters = layer.lora_A if which == "A" else layer.lora_B
    (name,) = list(adapters.keys())  # one adapter per layer (llm.py creates "default")
    return adapters[name].weight


def _load_adapters(layers: list[nn.Module], lora: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    with torch.no_grad():
        for layer, (a, b) in zip(layers, lora, strict=True):
            _adapter(layer, "A").copy_(a)
            _adapter(layer, "B").copy_(b)


def _lora_forward(layer: nn.Module, adapters: list[tuple[Tensor, Tensor]], sizes: list[int],
                  gens: list[torch.Generator]) -> Callable[..., Tensor]:  # fmt: skip
    """PEFT's `lora.Linear.forward` (base + B(A(dropout(x))) * scaling) with each sample's
    own cell's A and B. K=1 takes PEFT's own calls; K>1 pads the rows per cell and does
    two batched matmuls over cells."""
    (name,) = list(layer.lora_A.keys())
    scaling = layer.scaling[name]
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = x.to(adapters[0][0].dtype)
        if p > 0 and layer.training:
            x = _dropout_rows(x, p, sizes, gens)
        if len(adapters) == 1:
            a, b = adapters[0]
            result = result + F.linear(F.linear(x, a), b) * scaling
        else:
            a = torch.stack([ab[0] for ab in adapters])  # (K, r, d)
            b = torch.stack([ab[1] for ab in adapters])  # (K, out, r)
            xp = _pad_rows(x, sizes)  # (K, n_max, L, d)
            k, n_max, length, d = xp.shape
            delta = torch.bmm(torch.bmm(xp.reshape(k, n_max * length, d), a.transpose(1, 2)), b.transpose(1, 2))
            delta = _unpad_rows(delta.reshape(k, n_max, length, -1), sizes)
            result = result + delta * scaling
        return result.to(dtype)

    return forward


# -- stacked visual modules -----------------------------------------------------------------


def _own_rng(model: nn.Module, generator: torch.Generator, clips: Tensor) -> Tensor:
    """The cell's backbone and projector, called as the cell alone calls them, with the
    global RNG (which their Dropout layers draw from) swapped for the cell's generator."""
    cuda = clips.device.type == "cuda"
    get = (lambda: torch.cuda.get_rng_state(clips.device)) if cuda else torch.get_rng_state
    put = (lambda state: torch.cuda.set_rng_state(state, clips.device)) if cuda else torch.set_rng_state
    saved = get()
    put(generator.get_state())
    try:
        f_mid, f_high = model.backbone(clips)
        return model.projector(f_mid, f_high)
    finally:
        generator.set_state(get())
        put(saved)


def _pad_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """(sum(sizes), ...) rows, cell after cell -> (K, max(sizes), ...), zero rows as padding."""
    n_max = max(sizes)
    parts = []
    lo = 0
    for n in sizes:
        part = x[lo : lo + n]
        if n < n_max:
            part = torch.cat([part, part.new_zeros((n_max - n, *part.shape[1:]))])
        parts.append(part)
        lo += n
    return torch.stack(parts)


def _unpad_rows(x: Tensor, sizes: list[int]) -> Tensor:
    return torch.cat([x[k, :n] for k, n in enumerate(sizes)])


def _dropout_rows(x: Tensor, p: float, sizes: list[int], gens: list[torch.Generator]) -> Tensor:
    """Dropout on rows that are cells' samples one after another, each cell's mask from its
    own generator, drawn as PyTorch's CPU dropout draws it (bernoulli_(1-p), / (1-p))."""
    masks = [torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=g)
             for n, g in zip(sizes, gens, strict=True)]  # fmt: skip
    noise = torch.cat(masks).div_(1 - p)
    return x * noise


def _dropout_padded(x: Tensor, p: float, sizes: list[int], gens: list[torch.Generator], *, feature: bool) -> Tensor:
    """Dropout on (K, n_max, C, ...): each cell draws a mask for its real rows only (so its
    draws do not depend on the other cells' sizes); `feature` drops whole channels (Dropout3d)."""
    if p == 0:
        return x
    k, n_max = x.shape[:2]
    shape = x.shape[2:3] + (1,) * (x.dim() - 3) if feature else x.shape[2:]
    masks = []
    for n, g in zip(sizes, gens, strict=True):
        m = torch.empty((n, *shape), dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=g)
        if n < n_max:
            m = torch.cat([m, m.new_zeros((n_max - n, *shape))])
        masks.append(m)
    return x * torch.stack(masks).div_(1 - p)


def _stacked_linear(linears: list[nn.Linear], x: Tensor) -> Tensor:
    """K linear layers on (K, n, ..., in): one batched matmul over cells (K=1: the layer's call)."""
    if len(linears) == 1:
        return linears[0](x[0]).unsqueeze(0)
    if VISUAL_MODE == "per_cell":
        return torch.stack([lin(x[i]) for i, lin in enumerate(linears)])
    k = x.shape[0]
    w = torch.stack([lin.weight for lin in linears])  # (K, out, in)
    flat = x.reshape(k, -1, x.shape[-1])
    if linears[0].bias is not None:
        b = torch.stack([lin.bias for lin in linears]).unsqueeze(1)
        out = torch.baddbmm(b, flat, w.transpose(1, 2))
    else:
        out = torch.bmm(flat, w.transpose(1, 2))
    return out.reshape(*x.shape[:-1], w.shape[1])


def _stacked_sequence(modules: list[nn.Module], x: Tensor, gens: list[torch.Generator], sizes: list[int]) -> Tensor:
    """K copies of one Sequential (Linear, activations, Dropout) on (K, n_max, ...)."""
    first = modules[0]
    children = list(first.children()) if isinstance(first, nn.Sequential) else [first]
    per_cell = [list(m.children()) if isinstance(m, nn.Sequential) else [m] for m in modules]
    for i, child in enumerate(children):
        if isinstance(child, nn.Sequential):
            x = _stacked_sequence([c[i] for c in per_cell], x, gens, sizes)
        elif isinstance(child, nn.Linear):
            x = _stacked_linear([c[i] for c in per_cell], x)
        elif isinstance(child, nn.Dropout):
            x = _dropout_padded(x, child.p, sizes, gens, feature=False) if child.training else x
        elif isinstance(child, (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity)):
            x = child(x)  # parameter-free and elementwise: one call serves every cell
        else:
            raise TypeError(f"no stacked form for {type(child).__name__}")
    return x


def _grouped(x: Tensor) -> Tensor:
    """(K, n, C, ...) -> (n, K*C, ...): the layout of a grouped convolution."""
    k, n, c = x.shape[:3]
    return x.transpose(0, 1).reshape(n, k * c, *x.shape[3:])


def _ungrouped(x: Tensor, k: int) -> Tensor:
    n, kc = x.shape[:2]
    return x.reshape(n, k, kc // k, *x.shape[2:]).transpose(0, 1)


# How the K cells' visual layers (Conv3d, Linear) run. "per_cell": one call per cell on
# its own rows or channels, each the very op of the cell alone: exact, and no weight is
# copied. "batched": one grouped convolution (groups=K) and one `baddbmm` over weights
# stacked at every step: fewer kernel launches (a GPU's choice), but measured on the CPU
# (tests/test_concurrent.py's setting, 3 epochs at lr 1e-3) the grouped convolution
# (oneDNN) rounds differently from the single-group one and, through ReLU, MaxPool and
# Adam, that reaches ~1e-4 in the probabilities, over the 1e-5 the equality asks; and
# stacking the EFP's weights (10624 x 5344 per cell) every step costs more memory traffic
# than the matmul it batches on a CPU. The LLM, the share of the FLOPs that grows with
# the model, is shared either way.
VISUAL_MODES: tuple[str, ...] = ("per_cell", "batched")
VISUAL_MODE = "per_cell"


def _stacked_conv3d(convs: list[nn.Conv3d], x: Tensor) -> Tensor:
    """K Conv3d on (n, K*C_in, ...) (K=1: the layer's call)."""
    if len(convs) == 1:
        return convs[0](x)
    if VISUAL_MODE == "per_cell":
        c = x.shape[1] // len(convs)
        return torch.cat([conv(x[:, i * c : (i + 1) * c]) for i, conv in enumerate(convs)], dim=1)
    c0 = convs[0]
    w = torch.cat([c.weight for c in convs])
    b = torch.cat([c.bias for c in convs]) if c0.bias is not None else None
    return F.conv3d(x, w, b, c0.stride, c0.padding, c0.dilation, groups=len(convs))


def _stacked_batchnorm(norms: list[nn.BatchNorm3d], x: Tensor, sizes: list[int]) -> Tensor:
    """Each cell's BatchNorm over its own real rows of (n_max, K*C, ...): its batch
    statistics and moving averages never see padding or another cell."""
    if len(norms) == 1:
        return norms[0](x)
    c = norms[0].num_features
    n_max = x.shape[0]
    outs = []
    for k, (bn, n) in enumerate(zip(norms, sizes, strict=True)):
        # contiguous: on a strided slice the CPU kernel sums in another order (measured:
        # 15x the gradient difference of everything else in the step)
        out = bn(x[:n, k * c : (k + 1) * c].contiguous())
        if n < n_max:
            out = torch.cat([out, out.new_zeros((n_max - n, *out.shape[1:]))])
        outs.append(out)
    return torch.cat(outs, dim=1)


def _stacked_backbone(backbones: list[nn.Module], xs: list[Tensor], gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """The K backbones (aullm/model/backbone.py's forward, op for op) on the cells' clips:
    (F_mid (K, n_max, mid), F_high (K, n_max, 256))."""
    k = len(backbones)
    sizes = [len(x) for x in xs]
    b0 = backbones[0]
    with torch.autocast(device_type=xs[0].device.type, enabled=False):  # fp32, as backbone.py says why
        # the LED filter per cell: a TxT matrix on each pixel's frames, a negligible share of
        # the FLOPs; as one batched einsum it rounds differently from the cell alone
        led = _pad_rows(torch.cat([b.led(x.float()) for b, x in zip(backbones, xs, strict=True)]), sizes)
        x = _grouped(led.unsqueeze(2))  # (n_max, K*1, T-1, H, W)
        blocks = [list(b.block1.children()) for b in backbones]  # conv, relu, pool, bn, dropout3d
        x = _stacked_conv3d([bl[0] for bl in blocks], x)
        x = blocks[0][2](blocks[0][1](x))  # ReLU, MaxPool: per channel, one call serves all cells
        x = _stacked_batchnorm([bl[3] for bl in blocks], x, sizes)
        x = _grouped(_dropout_padded(_ungrouped(x, k), blocks[0][4].p, sizes, gens, feature=True)) if b0.training else x
        conv2 = [list(b.conv2.children()) for b in backbones]  # conv, relu, bn
        x = conv2[0][1](_stacked_conv3d([c[0] for c in conv2], x))
        x = _stacked_batchnorm([c[2] for c in conv2], x, sizes)
        # per-frame squeeze-and-excitation (backbone.FrameSE)
        squeezed = _ungrouped(x.mean(dim=(3, 4)), k).transpose(2, 3)  # (K, n, T, C)
        weights = _stacked_sequence([b.se.excite for b in backbones], squeezed, gens, sizes).transpose(2, 3)
        x = x * _grouped(weights)[..., None, None]
        pool = list(b0.pool2.children())
        x = _ungrouped(pool[0](x), k)  # (K, n, C, t, s, s)
        if b0.training:
            x = _dropout_padded(x, pool[1].p, sizes, gens, feature=True)
        f_mid = x.reshape(k, x.shape[1], -1)
        f_high = _stacked_sequence([b.high for b in backbones], f_mid, gens, sizes)
    return f_mid, f_high


def _stacked_projector(projectors: list[FeatureProjector], f_mid: Tensor, f_high: Tensor, gens: list[torch.Generator],
                       sizes: list[int]) -> Tensor:  # fmt: skip
    x = projectors[0].features(f_mid, f_high)  # (K, n, D): every cell of a group reads the same features
    return _stacked_sequence([p.net for p in projectors], x, gens, sizes)


# -- a group's cells from a task's cells ---------------------------------------------------


def groups_of(items: list[Any], k: int, key: Callable[[Any], Any]) -> list[list[Any]]:
    """`items` cut into groups of at most `k` that share `key` (the variant), in first-seen
    order: the cells a task trains together."""
    by_key: dict[Any, list[Any]] = {}
    for item in items:
        by_key.setdefault(key(item), []).append(item)
    return [members[i : i + k] for members in by_key.values() for i in range(0, len(members), k)]


def clear_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".deepspeed"), ignore_errors=True)
