"""The frozen base LLM with LoRA adapters on q_proj / v_proj (DESIGN.md §4).

Loaded with `AutoModel`, i.e. the decoder stack only: there is no LM head, so no
vocabulary logits (batch x tokens x ~152k floats) are ever computed. The classifier
reads the last hidden state.

One `BaseLLM` is loaded per process and shared by every cell that process trains;
`reset_adapters(seed)` puts the LoRA weights back to exactly what a fresh load with
the same seed gives, so packing cells into one job does not change any number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aullm.errors import UserInputError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; defaults are the paper's (r=16, alpha=32, dropout 0.1, q/v)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserInputError(f"lora.r: {self.r} is not allowed; must be an integer >= 1")
        if self.alpha <= 0:
            raise UserInputError(f"lora.alpha: {self.alpha} is not allowed; must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"lora.dropout: {self.dropout} is not allowed; must be in [0, 1)")
        if not self.target_modules:
            raise UserInputError("lora.target_modules: empty; name at least one module, e.g. q_proj")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserInputError(f"llm dtype {dtype!r} is not allowed; allowed: {', '.join(_DTYPES)}")


class BaseLLM(nn.Module):
    """A PEFT-wrapped decoder (no LM head) plus its tokenizer."""

    def __init__(self, peft_model: nn.Module, tokenizer: Any, path: Path, lora: LoraSettings) -> None:
        super().__init__()
        self.model = peft_model
        self.tokenizer = tokenizer
        self.path = path
        self.lora = lora

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_base_model().config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def embed_prompt(self, text: str) -> Tensor:
        """Token embeddings of `text`, shape (1, L, D). No special tokens are added:
        the prompt is the paper's plain text, and the visual token sits beside it."""
        return self.embed_prompt_parts(text, special_tokens=False)[1]

    def embed_prompt_parts(self, text: str, *, special_tokens: bool) -> tuple[Tensor, Tensor]:
        """(leading special tokens (1, P, D), the rest (1, L, D)) of `text` tokenised with
        (`special_tokens`) or without the special tokens the tokenizer adds. P is 0 for
        tokenizers that add no BOS (Qwen2); the rest keeps any trailing special token."""
        ids = self.tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt")["input_ids"][0]
        special = set(self.tokenizer.all_special_ids)
        lead = 0
        while special_tokens and lead < len(ids) and int(ids[lead]) in special:
            lead += 1
        if len(ids) - lead == 0:
            raise UserInputError(f"prompt {text!r} tokenises to nothing; give a non-empty prompt")
        with torch.no_grad():
            emb = self.input_embeddings(ids.unsqueeze(0).to(self.device)).detach()
        return emb[:, :lead], emb[:, lead:]

    def last_hidden(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final-layer hidden state at the last (attended) position: (B, L, D) -> (B, D)."""
        out = self.model(
            inputs_embeds=inputs_embeds.to(self.dtype),
            attention_mask=attention_mask,
            use_cache=False,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if attention_mask is None:
            return hidden[:, -1]
        # Last position whose mask is 1 (works for right padding; left padding ends at -1 anyway).
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.to(hidden.device).long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if "lora_" in name}

    def use_lora(self, lora: LoraSettings) -> None:
        """Give the loaded base model adapters of other LoRA settings (rank, alpha, dropout),
        without reloading its weights: cells of one task may sweep the LoRA rank and still
        share the load (the base stays frozen and untouched; the adapters are new)."""
        if lora == self.lora:
            return
        from peft import get_peft_model

        device = self.device
        base = self.model.unload()  # the base model with the LoRA layers taken out, unmerged
        self.model = get_peft_model(base, _lora_config(lora)).to(device)
        self.lora = lora

    @torch.no_grad()
    def reset_adapters(self, seed: int) -> None:
        """Re-initialise every LoRA weight from `seed`, as PEFT does on creation:
        lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros.

        The numbers are drawn on the CPU from a private generator (then copied to the
        weights' device and dtype), so they depend on the seed only: not on the global
        RNG, not on the device, not on what the process trained before.
        """
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        layers = self.lora_layers()
        if not layers:
            raise RuntimeError(f"{self.path}: no LoRA layers found (targets {self.lora.target_modules})")
        for _, layer in layers:
            for adapter in sorted(layer.lora_A.keys()):
                a = layer.lora_A[adapter].weight
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                a.copy_(fresh)
                a.requires_grad_(True)
                b = layer.lora_B[adapter].weight
                b.zero_()
                b.requires_grad_(True)
                for lin in (layer.lora_A[adapter], layer.lora_B[adapter]):
                    if lin.bias is not None:
                        lin.bias.zero_()
                        lin.bias.requires_grad_(True)


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise UserInputError(f"llm path {path}: does not exist; give a local model directory (config.json + weights)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserInputError(f"llm path {path}: is not a model directory; it must hold config.json and the weights")


def _lora_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )


def load_base_llm(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    lora: LoraSettings | None = None,
    adapter_seed: int = 0,
    device: str | torch.device | None = None,
) -> BaseLLM:
    """Load the decoder (AutoModel: hidden states only) and tokenizer from a local
    directory, freeze it, add LoRA adapters and initialise them from `adapter_seed`."""
    from peft import get_peft_model
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(path).expanduser()
    _check_model_dir(model_dir)
    lora = lora or LoraSettings()
    torch_dtype = resolve_dtype(dtype)
    try:
        base = AutoModel.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"llm path {model_dir}: cannot be loaded as a model: {exc}") from exc
    if hasattr(base, "lm_head") or type(base).__name__.endswith("ForCausalLM"):
        # Would mean AutoModel resolved to a head model: vocabulary logits must never be computed.
        raise RuntimeError(f"{model_dir}: AutoModel returned {type(base).__name__}, which has an LM head")
    base.requires_grad_(False)
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise UserInputError(
            f"lora.target_modules: {missing} not found in {model_dir}; e.g. q_proj, k_proj, v_proj, o_proj"
        )
    peft_model = get_peft_model(base, _lora_config(lora))
    if device is not None:
        peft_model.to(device)
    llm = BaseLLM(peft_model, tokenizer, model_dir, lora)
    llm.reset_adapters(adapter_seed)
    return llm
