"""Two named recipes: what the paper's text says, and what the released script does.

The paper (shared/seeds/paper-au-llm.txt) and the authors' released script
(`AULLMmain.py`, commit 45430d07 of ZS-liu-JLU/AU-LLMs) disagree on several details.
`training.recipe` picks one side as a whole; any field set explicitly still overrides
its recipe's value. docs/results.md has the full table of differences.

Pure Python (no torch): the sweep schema resolves recipes when it reads a file, and
`status` must stay light.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aullm.constants import PAPER_PROMPT

RECIPES: tuple[str, ...] = ("paper", "script")
DEFAULT_RECIPE = "paper"

# The released script's prompt, verbatim ("analyse the following fused facial video
# features for action unit classification").
SCRIPT_PROMPT = "分析以下融合后的面部视频特征以进行动作单元分类。"

# Each recipe's value of every field the two disagree on. A field left unset (None) in a
# sweep or a TrainConfig takes its recipe's value.
RECIPE_VALUES: dict[str, dict[str, Any]] = {
    "paper": {
        "token_position": "prepend",  # §3.3: the visual token "is prepended to a task-specific text prompt"
        "prompt": PAPER_PROMPT,  # §3.3, the example prompt
        # The paper does not say; a model trained with a BOS token expects it first, so the
        # tokenizer's own special tokens are kept and the visual token goes after the BOS.
        "prompt_special_tokens": "tokenizer",
        # Not in the paper, which does not say how it predicts; we recompute exact statistics
        # so that a fixed 0.5 threshold is fair (docs/results.md, "BatchNorm statistics").
        "batchnorm_stats": "recompute",
        "asl_form": "official",  # Eq. 4
        "loss_reduction": "mean",  # Eq. 4: -1/N sum_i sum_j
        # Eq. 3: sigma on the EFP output, "a non-linear activation"; the symbol's usual
        # meaning, the logistic sigmoid (docs/results.md says why not tanh)
        "efp_activation": "sigmoid",
        "precision": "auto",  # bf16 LLM on a GPU, LED and 3D-CNN in fp32; fp32 on the CPU
    },
    "script": {
        "token_position": "append",  # torch.cat([prompt_embeddings, projected_features])
        "prompt": SCRIPT_PROMPT,
        "prompt_special_tokens": "tokenizer",  # tokenizer(prompt) with its default special tokens
        "batchnorm_stats": "running",  # net.eval(): the training-time moving averages
        "asl_form": "script",  # focusing weight applied with gradients off: plain clipped BCE gradient
        "loss_reduction": "sum",  # -loss.sum()
        "efp_activation": "none",  # the fusion projector ends with a Linear
        "precision": "fp16_llm",  # fp16 LLM, fp32 visual path and head (on a GPU; fp32 on the CPU)
    },
}
RECIPE_FIELDS: tuple[str, ...] = tuple(RECIPE_VALUES["paper"])

# Fields that manifests written before recipes existed do not carry, and the value the
# code of that time used: a sweep directory from then compares against these.
LEGACY_VALUES: dict[str, Any] = {
    "recipe": "paper",
    "loss_reduction": "mean",
    "efp_activation": "none",
    "prompt_fusion": "late",
    "prompt_special_tokens": "none",
}


def check_recipe(name: object) -> str:
    if name not in RECIPES:
        raise ValueError(f"'{name}' is not a recipe; allowed: {', '.join(RECIPES)}")
    return str(name)


def resolve(values: Mapping[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """`values` with every recipe field that is None (or absent) filled from the recipe."""
    name = check_recipe(recipe or values.get("recipe") or DEFAULT_RECIPE)
    out = dict(values)
    out["recipe"] = name
    for key, value in RECIPE_VALUES[name].items():
        if out.get(key) is None:
            out[key] = value
    return out


def differs_from(values: Mapping[str, Any], recipe: str) -> tuple[str, ...]:
    """The recipe fields of resolved `values` whose value is not `recipe`'s, in table order."""
    return tuple(k for k, v in RECIPE_VALUES[check_recipe(recipe)].items() if values.get(k) != v)


def recorded(training: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved settings a manifest's `training` block stands for. A manifest from
    before recipes lacks the newer fields: its cells were trained with the legacy values,
    never with today's defaults."""
    out = {k: v for k, v in LEGACY_VALUES.items() if k not in training}
    out.update(training)
    return resolve(out)
