"""AU-LLM: visual backbone -> projector -> (LoRA LLM) -> linear AU head (DESIGN.md §4).

One `AULLM` is one cell's model. The backbone, projector, head and prompt vectors are
created per cell; the `BaseLLM` is shared by reference between the cells of a job
(its base weights are frozen; `build(seed=...)` resets its LoRA adapters).

Variant `prompt_learning` (Table 3, "Ablation on Prompting Strategy"). The paper:
the variant "replaces our EFP module with ... Learnable Text Prompts [CoOp] ... a set
of static, learnable embedding vectors ... instead of generating a dynamic visual
token for each sample", and contrasts AU-LLM's "early fusion" (visual information
integrated before reaching the LLM) with this "late fusion" approach. Two readings:

  - `early` (the default): K learnable prompt vectors (CoOp context vectors) replace
    the text prompt, and the per-sample visual information still enters the LLM as one
    token, a single linear projection of F_high (no EFP), placed by `token_position`;
    the usual Linear(D -> num_AUs) head reads the last position. What is ablated is
    the EFP and the text prompt, as the paper's first sentence says.
  - `late`: the LLM reads only the K vectors, so its last hidden state h is the same
    for every clip: the LLM contributes one constant vector, a bias. The visual
    features bypass it (v = Linear(F_high)) and the head is Linear(2D -> num_AUs) on
    concat(h, v). That is backbone + a linear head with a learnt bias, whatever the LLM:
    it cannot measure what the LLM adds, so it is not the default (docs/results.md).

Special tokens (`prompt_special_tokens`). With `tokenizer`, the prompt is tokenised
with the special tokens its tokenizer adds, as the script's `tokenizer(prompt)` does
(Qwen2 tokenizers add none; DeepSeek-R1-Distill's adds a BOS). Leading special tokens
stay at the very start of the sequence: the script's appended token follows
[BOS, prompt]; a prepended token goes after the BOS, [BOS, token, prompt], since a
model trained with a BOS expects it first. With `none`, the plain text only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from aullm.constants import PAPER_PROMPT, TOKEN_POSITIONS, VARIANTS, VARIANTS_WITHOUT_LLM
from aullm.errors import UserInputError
from aullm.model.backbone import VisualBackbone
from aullm.model.llm import BaseLLM
from aullm.model.projector import make_projector

PROMPT_FUSIONS: tuple[str, ...] = ("early", "late")
PROMPT_SPECIAL_TOKENS: tuple[str, ...] = ("tokenizer", "none")


@dataclass(frozen=True)
class ModelSettings:
    """Per-cell model options; defaults follow the paper (DESIGN.md §4)."""

    dropout: float = 0.3
    token_position: Literal["prepend", "append"] = "prepend"  # paper prepends; the script appends
    prompt: str = PAPER_PROMPT
    num_prompt_vectors: int = 4  # K, variant prompt_learning only
    prompt_fusion: Literal["early", "late"] = "early"  # variant prompt_learning only
    prompt_special_tokens: Literal["tokenizer", "none"] = "tokenizer"
    efp_activation: str = "none"  # paper Eq. 3's sigma; see aullm.model.projector

    def __post_init__(self) -> None:
        validate_choice("token_position", self.token_position, TOKEN_POSITIONS)
        validate_choice("prompt_fusion", self.prompt_fusion, PROMPT_FUSIONS)
        validate_choice("prompt_special_tokens", self.prompt_special_tokens, PROMPT_SPECIAL_TOKENS)
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"dropout: {self.dropout} is not allowed; must be in [0, 1)")
        if self.num_prompt_vectors < 1:
            raise UserInputError(f"num_prompt_vectors: {self.num_prompt_vectors} is not allowed; must be >= 1")
        if not self.prompt.strip():
            raise UserInputError("prompt: empty; give the text prompt, e.g. the paper's")


def validate_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserInputError(f"{field}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


class AULLM(nn.Module):
    """forward(clips float (B, T, 64, 64)) -> logits (B, num_aus)."""

    def __init__(
        self,
        variant: str,
        num_aus: int,
        llm: BaseLLM | None,
        *,
        dropout: float = 0.3,
        token_position: str = "prepend",
        prompt: str = PAPER_PROMPT,
        num_prompt_vectors: int = 4,
        prompt_fusion: str = "early",
        prompt_special_tokens: str = "tokenizer",
        efp_activation: str = "none",
    ) -> None:
        super().__init__()
        validate_choice("variant", variant, VARIANTS)
        settings = ModelSettings(
            dropout=dropout,
            token_position=token_position,  # type: ignore[arg-type]
            prompt=prompt,
            num_prompt_vectors=num_prompt_vectors,
            prompt_fusion=prompt_fusion,  # type: ignore[arg-type]
            prompt_special_tokens=prompt_special_tokens,  # type: ignore[arg-type]
            efp_activation=efp_activation,
        )
        if num_aus < 1:
            raise ValueError(f"AULLM: num_aus must be >= 1, got {num_aus}")
        uses_llm = variant not in VARIANTS_WITHOUT_LLM
        if uses_llm and llm is None:
            raise ValueError(f"AULLM: variant {variant!r} needs an LLM, got llm=None")
        self.variant = variant
        self.num_aus = num_aus
        self.settings = settings
        self.backbone = VisualBackbone(dropout=dropout)
        # Registered as a submodule so .to()/.train()/.eval() reach the LoRA layers (LoRA
        # dropout must be off at evaluation); `cell_state_dict` leaves its frozen weights out.
        self.llm: BaseLLM | None = llm if uses_llm else None
        self.prompt_vectors: nn.Parameter | None = None
        self.late_fusion = False

        if self.llm is None:
            self.projector = make_projector(variant, out_dim=num_aus, dropout=dropout)
            self.head: nn.Module = nn.Identity()
            return

        d = self.llm.hidden_size
        self.projector = make_projector(variant, out_dim=d, dropout=dropout, activation=efp_activation)
        # Frozen embeddings, computed once; buffers so that they follow .to(device).
        prefix, text = self.llm.embed_prompt_parts(prompt, special_tokens=prompt_special_tokens == "tokenizer")
        self.register_buffer("prompt_prefix", prefix, persistent=False)
        if variant == "prompt_learning":
            # Same scale as real token embeddings, so the frozen LLM sees in-distribution inputs.
            std = float(self.llm.input_embeddings.weight.detach().float().std())
            self.prompt_vectors = nn.Parameter(torch.randn(num_prompt_vectors, d) * std)
            self.late_fusion = prompt_fusion == "late"
            self.register_buffer("prompt_embeds", None, persistent=False)
        else:
            self.register_buffer("prompt_embeds", text, persistent=False)
        self.head = nn.Linear(2 * d if self.late_fusion else d, num_aus)

    @classmethod
    def build(
        cls,
        variant: str,
        num_aus: int,
        llm: BaseLLM | None,
        settings: ModelSettings | None = None,
        *,
        seed: int | None = None,
    ) -> "AULLM":
        """Validated construction. With `seed`, the cell's fresh modules are initialised
        from it (without touching the caller's RNG) and the shared LLM's adapters are
        reset from it, so the cell starts exactly where a fresh process would."""
        validate_choice("variant", variant, VARIANTS)
        s = settings or ModelSettings()
        kwargs = asdict(s)  # ModelSettings' fields are the constructor's keywords, one for one
        if seed is None:
            return cls(variant, num_aus, llm, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(variant, num_aus, llm, **kwargs)
        if model.llm is not None:
            model.llm.reset_adapters(seed)
        return model

    def forward(self, clips: Tensor) -> Tensor:
        f_mid, f_high = self.backbone(clips)
        visual = self.projector(f_mid, f_high)
        if self.llm is None:
            return visual  # the no_llm projector is the AU head
        llm = self.llm
        batch = clips.shape[0]
        prefix = self.prompt_prefix.to(llm.dtype)
        if self.prompt_vectors is not None:
            context = self.prompt_vectors.unsqueeze(0).to(llm.dtype)
            if self.late_fusion:
                # Static input: one LLM pass serves the whole batch.
                h = llm.last_hidden(torch.cat([prefix, context], dim=1)).to(visual.dtype).expand(batch, -1)
                return self.head(torch.cat([h, visual], dim=1))
            context = context.expand(batch, -1, -1)
        else:
            context = self.prompt_embeds.expand(batch, -1, -1).to(llm.dtype)
        prefix = prefix.expand(batch, -1, -1)
        token = visual.unsqueeze(1).to(llm.dtype)
        if self.settings.token_position == "prepend":
            seq = torch.cat([prefix, token, context], dim=1)
        else:
            seq = torch.cat([prefix, context, token], dim=1)
        h = llm.last_hidden(seq)
        return self.head(h.to(self.head.weight.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone, projector, head, prompt vectors and the LoRA weights: never base LLM weights."""
        return [p for p in self.parameters() if p.requires_grad]

    def cell_state_dict(self) -> dict[str, Tensor]:
        """This cell's weights (everything but the frozen base LLM): small enough to save per cell."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("llm.") or "lora_" in k
        }
