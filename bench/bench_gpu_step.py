"""One AU-LLM training step at the paper's scale: a Qwen2-1.5B-shaped LLM, batch 256.

The LLM is built from a Qwen2-1.5B config with random weights (nothing is downloaded),
saved like a hub checkpoint and loaded through `load_base_llm`, the path a real 1.5B
checkpoint takes; LoRA r=16 on q_proj/v_proj, base frozen. The rest is the `all`
variant (LED, 3D-CNN + SE, EFP, head) on random 6x64x64 clips, trained with fused Adam
and the paper's ASL, exactly the operations of `aullm/train.py`'s inner loop.

Modes, measured side by side in one process:
  bf16          autocast bf16, base weights bf16 (what a cell does on a GPU)
  fp16          autocast fp16, base weights fp16, GradScaler
  bf16+compile  bf16 with torch.compile on the model
  bf16+logits   bf16, and the forward also computes vocabulary logits at every position
                (what an LM-head model does when only its hidden states are wanted)

For each: seconds per step, seconds per 350-step cell (the paper's epochs, one full
batch each), samples/s, peak GPU memory, and model FLOPs utilisation (FLOPs counted by
torch.utils.flop_counter over one real step, divided by step time and the GPU's dense
peak). Targets from issue 6: a cell <= 20 s of training on an H100, MFU >= 35%.
Then it trains one short cell twice, with fresh trainers, through `CellTrainer.run`
(deterministic cuDNN/cuBLAS settings, seeded) and exits non-zero unless the two runs
predict bit-identical probabilities.

    python bench/bench_gpu_step.py --device cuda                # the real thing
    python bench/bench_gpu_step.py --device cpu --shape tiny    # smoke test of the script
    python bench/bench_gpu_step.py --device cuda --modes bf16 --concurrent 1 2 4 8   # K cells a step
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER_EPOCHS = 350
# Dense tensor-core peaks (no sparsity), TFLOP/s, by data type.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0},
    "H100": {"bf16": 989.4, "fp16": 989.4},  # SXM / HBM3
    "H200": {"bf16": 989.4, "fp16": 989.4},
}
SHAPES = {
    # Qwen2-1.5B / Qwen2.5-1.5B / DeepSeek-R1-Distill-Qwen-1.5B share this decoder shape.
    "qwen2-1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}
MODES = ("bf16", "fp16", "bf16+compile", "bf16+logits")


@dataclass
class ModeResult:
    mode: str
    step_seconds: float
    cell_train_seconds: float
    samples_per_second: float
    peak_memory_gib: float | None
    tflops_per_step: float
    achieved_tflops: float
    mfu: float | None
    error: str | None = None


def time_steps(step: Any, device: Any, warmup: int, steps: int) -> tuple[float, float | None]:
    """Seconds per step after `warmup` steps (the device synchronised before the clock
    stops), and the peak GPU memory in GiB over the timed steps (None on the CPU)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def write_checkpoint(shape: str, out: Path, device: str) -> Path:
    """A random-weight checkpoint of `shape` with the tiny tokenizer (its ids are < every vocab)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aullm.model.tiny import build_tiny_llm

    tiny = build_tiny_llm(out / "tokenizer-source")
    model_dir = out / shape
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5B parameters on the GPU takes seconds, on the CPU minutes
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape]))
    model.to(torch.bfloat16).save_pretrained(model_dir)
    del model
    for f in tiny.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, model_dir / f.name)
    return model_dir


def peak_tflops(device: str, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    import torch

    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key in ("H100 PCIe", "H100", "H200"):
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return PEAK_TFLOPS[key][dtype]
    return None


def run_mode(mode: str, model_dir: Path, args: argparse.Namespace) -> ModeResult:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from aullm.loss import AsymmetricLoss
    from aullm.model.au_llm import AULLM
    from aullm.model.llm import LoraSettings, load_base_llm

    device = torch.device(args.device)
    half = torch.float16 if mode.startswith("fp16") else torch.bfloat16
    use_autocast = args.device == "cuda" or mode.startswith("bf16")
    llm = load_base_llm(model_dir, dtype=half, lora=LoraSettings(), device=device)
    model = AULLM("all", 8, llm, dropout=0.3, token_position="prepend").to(device)
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=3e-5, weight_decay=0.005, fused=True)
    scaler = torch.amp.GradScaler(args.device) if mode.startswith("fp16") else None
    loss_fn = AsymmetricLoss()
    forward = torch.compile(model) if "compile" in mode else model

    generator = torch.Generator().manual_seed(0)
    clips = (torch.rand(args.batch, 6, 64, 64, generator=generator) * 255).to(device)
    labels = (torch.rand(args.batch, 8, generator=generator) < 0.2).float().to(device)

    kept_logits: list[torch.Tensor] = []
    if "logits" in mode:
        # What an LM-head model (AutoModelForCausalLM) adds to the same forward: the tied
        # lm_head at every position, kept alive for the step as a ModelOutput would be.
        def last_hidden_with_logits(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None):
            hidden = llm.model(inputs_embeds=inputs_embeds.to(llm.dtype), use_cache=False).last_hidden_state
            kept_logits.append(torch.nn.functional.linear(hidden, llm.input_embeddings.weight))
            return hidden[:, -1]

        llm.last_hidden = last_hidden_with_logits  # type: ignore[method-assign]

    def step() -> None:
        model.train()
        with torch.autocast(device.type, dtype=half, enabled=use_autocast):
            logits = forward(clips)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        kept_logits.clear()

    seconds, peak = time_steps(step, device, args.warmup, args.steps)

    counter = FlopCounterMode(display=False)
    with counter:
        if "compile" in mode:  # the counter sees through eager ops only: count the same step uncompiled
            forward, saved = model, forward
            step()
            forward = saved
        else:
            step()
    flops = counter.get_total_flops()
    achieved = flops / seconds / 1e12
    peak_tf = peak_tflops(args.device, "fp16" if mode.startswith("fp16") else "bf16", args.peak_tflops)
    del model, llm, optimizer, forward
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModeResult(
        mode=mode,
        step_seconds=seconds,
        cell_train_seconds=seconds * PAPER_EPOCHS,
        samples_per_second=args.batch / seconds,
        peak_memory_gib=peak,
        tflops_per_step=flops / 1e12,
        achieved_tflops=achieved,
        mfu=achieved / peak_tf if peak_tf else None,
    )


def run_concurrent(k: int, model_dir: Path, args: argparse.Namespace) -> ModeResult:
    """K cells in one step (aullm/concurrent.py): K batches of `args.batch` clips, the frozen
    LLM once over all K x batch sequences with per-sample LoRA, K visual paths, K Adams;
    bf16 autocast, base weights bf16. The FLOPs, tokens and samples are the K cells' total."""
    import types

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from aullm.concurrent import ConcurrentTrainer, _adapter
    from aullm.loss import AsymmetricLoss
    from aullm.model.au_llm import AULLM
    from aullm.model.llm import LoraSettings, load_base_llm

    device = torch.device(args.device)
    llm = load_base_llm(model_dir, dtype=torch.bfloat16, lora=LoraSettings(), device=device)
    conc = ConcurrentTrainer.__new__(ConcurrentTrainer)  # the forward only: no CellTrainer around it
    conc.llm, conc.device = llm, device
    conc.trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=lambda: torch.autocast(
        device.type, dtype=torch.bfloat16)))  # fmt: skip
    conc._lora_layers = [m for _, m in llm.lora_layers()]
    states, optimizers = [], []
    for i in range(k):
        llm.reset_adapters(i)
        model = AULLM("all", 8, llm, dropout=0.3, token_position="prepend").to(device)
        lora = [(torch.nn.Parameter(_adapter(m, "A").detach().clone()), torch.nn.Parameter(_adapter(m, "B").detach().clone()))
                for m in conc._lora_layers]  # fmt: skip
        own = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]
        optimizers.append(torch.optim.Adam(own + [p for ab in lora for p in ab], lr=3e-5, weight_decay=0.005, fused=True))
        generator = torch.Generator(device=device).manual_seed(i)
        states.append(types.SimpleNamespace(model=model, generator=generator, lora=lora))
    generator = torch.Generator().manual_seed(0)
    xs = [(torch.rand(args.batch, 6, 64, 64, generator=generator) * 255).to(device) for _ in range(k)]
    ys = [(torch.rand(args.batch, 8, generator=generator) < 0.2).float().to(device) for _ in range(k)]
    loss_fn = AsymmetricLoss()

    def step() -> None:
        for s in states:
            s.model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = conc.forward(states, xs)
            loss = torch.stack([loss_fn(lg.float(), y) for lg, y in zip(logits, ys)]).sum()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    seconds, peak = time_steps(step, device, args.warmup, args.steps)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    achieved = flops / seconds / 1e12
    peak_tf = peak_tflops(args.device, "bf16", args.peak_tflops)
    tokens = k * args.batch * (1 + states[0].model.prompt_embeds.shape[1] + states[0].model.prompt_prefix.shape[1])
    print(f"  bf16 x{k} concurrent: {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s, "
          f"{seconds * PAPER_EPOCHS / k:.1f} s of training per cell", flush=True)
    del states, optimizers, llm, conc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModeResult(
        mode=f"bf16 x{k} cells", step_seconds=seconds, cell_train_seconds=seconds * PAPER_EPOCHS / k,
        samples_per_second=k * args.batch / seconds, peak_memory_gib=peak, tflops_per_step=flops / 1e12,
        achieved_tflops=achieved, mfu=achieved / peak_tf if peak_tf else None,
    )  # fmt: skip


def check_determinism(model_dir: Path, work: Path, epochs: int) -> tuple[bool, float]:
    """Two fresh trainers run the same short cell (`all`, the paper recipe: bf16 on a GPU,
    deterministic kernels) through `CellTrainer.run`; (bit-identical?, largest |diff|)."""
    import numpy as np

    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split, loso_subjects
    from aullm.data.readers import read_dataset
    from aullm.data.synth import write_synthetic
    from aullm.train import CellTrainer, TrainConfig

    root = write_synthetic("casme2", work / "casme2", subjects=3, seed=0, clips_per_subject=4)
    samples = read_dataset("casme2", root)
    store = ClipStore.load(samples, work / "cache")
    split = loso_split(samples, loso_subjects(samples)[0], DATASET_AUS["casme2"])
    config = TrainConfig(epochs=epochs)
    probs = [CellTrainer(model_dir, config).run(split, store, "all", 1, config).probs for _ in range(2)]
    return bool(np.array_equal(probs[0], probs[1])), float(np.abs(probs[0] - probs[1]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="qwen2-1.5b", choices=tuple(SHAPES))
    parser.add_argument("--batch", type=int, default=256, help="clips per step (paper: 256, one full batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, if not an H100/H200")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--determinism-epochs", type=int, default=5,
                        help="epochs of the short cell trained twice to check bit-identical predictions (0: skip)")
    parser.add_argument("--concurrent", type=int, nargs="*", default=[],
                        help="also K concurrent cells per step (aullm/concurrent.py), e.g. --concurrent 1 2 4 8")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --shape tiny for a smoke test")
    work = Path(tempfile.mkdtemp(prefix="aullm-gpu-bench-"))
    try:
        t0 = time.perf_counter()
        model_dir = write_checkpoint(args.shape, work, args.device)
        print(f"checkpoint {args.shape} written in {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for mode in args.modes:
            try:
                results.append(run_mode(mode, model_dir, args))
            except Exception as exc:  # noqa: BLE001 - one failing mode (e.g. compile) must not hide the others
                results.append(ModeResult(mode, *([float("nan")] * 3), None, *([float("nan")] * 2), None,
                                          error=f"{type(exc).__name__}: {exc}"[:300]))
            r = results[-1]
            print(f"  {mode:14s} done" + (f" ({r.error})" if r.error else ""), flush=True)
        for k in args.concurrent:
            try:
                results.append(run_concurrent(k, model_dir, args))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large K: show the rest
                results.append(ModeResult(f"bf16 x{k} cells", *([float("nan")] * 3), None, *([float("nan")] * 2),
                                          None, error=f"{type(exc).__name__}: {exc}"[:300]))  # fmt: skip
        deterministic = None
        if args.determinism_epochs > 0:
            deterministic = check_determinism(model_dir, work, args.determinism_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{device_name}, torch {torch.__version__}, shape {args.shape}, batch {args.batch}, "
          f"{args.steps} timed steps per mode\n")
    base = next((r for r in results if r.mode == "bf16" and not r.error), None)
    header = f"{'mode':14s} {'s/step':>8s} {'s/cell(350)':>11s} {'samples/s':>10s} {'peak GiB':>9s} " \
             f"{'TFLOP/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs bf16':>8s}"
    print(header)
    for r in results:
        if r.error:
            print(f"{r.mode:14s} failed: {r.error}")
            continue
        mem = f"{r.peak_memory_gib:9.1f}" if r.peak_memory_gib is not None else f"{'-':>9s}"
        mfu = f"{r.mfu:6.1%}" if r.mfu is not None else f"{'-':>6s}"
        ratio = f"{r.step_seconds / base.step_seconds:7.2f}x" if base else f"{'-':>8s}"
        print(f"{r.mode:14s} {r.step_seconds:8.4f} {r.cell_train_seconds:11.1f} {r.samples_per_second:10.0f} "
              f"{mem} {r.tflops_per_step:10.2f} {r.achieved_tflops:8.1f} {mfu} {ratio}")
    if deterministic is not None:
        same, diff = deterministic
        print(f"\ndeterminism: two fresh {args.determinism_epochs}-epoch cells give "
              f"{'bit-identical' if same else 'DIFFERENT'} predictions (largest difference {diff:.3g})")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "shape": args.shape, "batch": args.batch,
                                         "results": [asdict(r) for r in results],
                                         "deterministic": deterministic}, indent=2))
    if deterministic is not None and not deterministic[0]:
        raise SystemExit("determinism check failed: two fresh runs of one cell differ")


if __name__ == "__main__":
    main()
