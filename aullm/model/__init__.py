"""AU-LLM model: LED filter, 3D-CNN backbone, projectors, LoRA LLM and the full model.

`peft` and `transformers` are imported only when an LLM is loaded or built.
"""

from aullm.model.au_llm import AULLM, PROMPT_FUSIONS, ModelSettings
from aullm.model.backbone import F_HIGH_DIM, F_MID_DIM, VisualBackbone
from aullm.model.led import LEDFilter, led_matrix
from aullm.model.llm import BaseLLM, LoraSettings, load_base_llm
from aullm.model.projector import FeatureProjector, make_projector
from aullm.model.tiny import build_tiny_llm

__all__ = [
    "AULLM",
    "BaseLLM",
    "F_HIGH_DIM",
    "F_MID_DIM",
    "FeatureProjector",
    "LEDFilter",
    "LoraSettings",
    "ModelSettings",
    "PROMPT_FUSIONS",
    "VisualBackbone",
    "build_tiny_llm",
    "led_matrix",
    "load_base_llm",
    "make_projector",
]
