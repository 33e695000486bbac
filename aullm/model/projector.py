"""Projectors from the backbone's features to the LLM embedding space (DESIGN.md §4, Table 3).

Each variant decides which features it reads and how it maps them:

| variant           | reads            | map                                            |
| ----------------- | ---------------- | ---------------------------------------------- |
| `all` (EFP)       | F_mid ++ F_high  | Linear(-> (in+D)//2) -> ReLU -> Dropout -> Linear(-> D) |
| `f_high`          | F_high           | same two-layer MLP, in = 256                   |
| `f_mid`           | F_mid            | same two-layer MLP, in = 10368                 |
| `efp_linear` (EFP-)| F_mid ++ F_high | one Linear(-> D)                               |
| `prompt_learning` | F_high           | one Linear(-> D) (no EFP; see `aullm.model.au_llm`) |
| `no_llm`          | F_mid ++ F_high  | one Linear(-> out_dim = number of AUs): the head itself |

The paper's Eq. (3) puts an activation sigma on the EFP output ("a non-linear
activation", not named); the released script has none. `activation` is that switch
(`training.efp_activation`): the paper recipe takes the logistic sigmoid, what the
symbol sigma usually denotes; the script recipe none. It applies to the
variants whose token comes from the EFP or its ablations (all, f_high, f_mid,
efp_linear); prompt_learning has no EFP and no_llm no token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from aullm.constants import VARIANTS
from aullm.errors import UserInputError
from aullm.model.backbone import F_HIGH_DIM, F_MID_DIM

FeatureSource = Literal["mid", "high", "both"]

_SOURCES: dict[str, FeatureSource] = {
    "all": "both",
    "f_high": "high",
    "f_mid": "mid",
    "efp_linear": "both",
    "prompt_learning": "high",
    "no_llm": "both",
}
_MLP_VARIANTS = frozenset({"all", "f_high", "f_mid"})
_EFP_VARIANTS = _MLP_VARIANTS | {"efp_linear"}
EFP_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
}


class FeatureProjector(nn.Module):
    """Selects the features a variant reads and maps them to `out_dim`."""

    def __init__(self, source: FeatureSource, net: nn.Module, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.source: FeatureSource = source
        self.net = net
        self.in_dim = in_dim
        self.out_dim = out_dim

    def features(self, f_mid: Tensor, f_high: Tensor) -> Tensor:
        """What `net` reads: F_mid, F_high or both side by side (on the last axis, so a
        stack of K cells' features, (K, B, D), selects alike)."""
        if self.source == "mid":
            return f_mid
        if self.source == "high":
            return f_high
        return torch.cat([f_mid, f_high], dim=-1)

    def forward(self, f_mid: Tensor, f_high: Tensor) -> Tensor:
        return self.net(self.features(f_mid, f_high))


def efp_mlp(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """The EFP fusion MLP: hidden width (in + out) // 2, as in the authors' script."""
    hidden = (in_dim + out_dim) // 2
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


def make_projector(
    variant: str,
    out_dim: int,
    dropout: float = 0.3,
    *,
    in_mid: int = F_MID_DIM,
    in_high: int = F_HIGH_DIM,
    activation: str = "none",
) -> FeatureProjector:
    """The projector of `variant` (one of `aullm.constants.VARIANTS`).

    `out_dim` is the LLM hidden size D, except for `no_llm`, where it is the number of
    AUs (the projector is then the whole classification head).
    """
    if variant not in _SOURCES:
        raise UserInputError(f"variant {variant!r} is unknown; allowed: {', '.join(VARIANTS)}")
    if out_dim < 1:
        raise ValueError(f"make_projector: out_dim must be >= 1, got {out_dim}")
    source = _SOURCES[variant]
    in_dim = {"mid": in_mid, "high": in_high, "both": in_mid + in_high}[source]
    net: nn.Module
    if activation not in EFP_ACTIVATIONS:
        raise UserInputError(f"efp_activation {activation!r} is unknown; allowed: {', '.join(EFP_ACTIVATIONS)}")
    if variant in _MLP_VARIANTS:
        net = efp_mlp(in_dim, out_dim, dropout)
    else:
        net = nn.Linear(in_dim, out_dim)
    act = EFP_ACTIVATIONS[activation]
    if act is not None and variant in _EFP_VARIANTS:
        net = nn.Sequential(net, act()) if isinstance(net, nn.Linear) else nn.Sequential(*net, act())
    return FeatureProjector(source, net, in_dim, out_dim)
