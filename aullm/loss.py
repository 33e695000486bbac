"""Asymmetric Loss (Ridnik et al., ICCV 2021) for multi-label AU detection (DESIGN.md §4).

With p = sigmoid(logit) and the shifted negative probability p_m = max(p - clip, 0):

    official:  l = -[ y (1-p)^g+ log(p)  +  (1-y) p_m^g- log(1-p_m) ]
    script:    l = -[ y (1-p)^g+ log(p)  +  (1-y) (1-p_m)^g- log(1-p_m) ]

`official` is the ASL paper's (and AU-LLM paper's Eq. 4) formulation: easy negatives
(small p) are down-weighted by p_m^g-. DESIGN.md notes that the authors' released
script "inverts the negative focusing term"; our reading of that is `script`, where
the weight becomes (1 - p_m)^g-, i.e. it is the *hard* negatives that get
down-weighted. Only `official` is the default.

Reduction: the AU-LLM paper's Eq. 4 has -1/N sum_i sum_j, so the default
`reduction="mean"` sums over AUs and averages over the N samples. (The official ASL
code returns the plain sum, `reduction="sum"`; with Adam the two differ only through
Adam's eps and weight decay balance, but they are not interchangeable.)

Gradient of the focusing weight: the official ASL training script builds the loss
with `disable_torch_grad_focal_loss=True`, i.e. the weights are treated as constants
in the backward pass; `detach_focusing=True` (default) does the same. The loss value
does not depend on this switch, only its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from aullm.errors import UserInputError

ASL_FORMS: tuple[str, ...] = ("official", "script")
ASL_REDUCTIONS: tuple[str, ...] = ("mean", "sum")


@dataclass(frozen=True)
class AslSettings:
    gamma_pos: float = 0.0
    gamma_neg: float = 4.0
    clip: float = 0.05
    eps: float = 1e-8
    form: Literal["official", "script"] = "official"
    reduction: Literal["mean", "sum"] = "mean"
    detach_focusing: bool = True

    def __post_init__(self) -> None:
        if self.form not in ASL_FORMS:
            raise UserInputError(f"loss.form: {self.form!r} is not allowed; allowed: {', '.join(ASL_FORMS)}")
        if self.reduction not in ASL_REDUCTIONS:
            raise UserInputError(
                f"loss.reduction: {self.reduction!r} is not allowed; allowed: {', '.join(ASL_REDUCTIONS)}"
            )
        if self.gamma_pos < 0 or self.gamma_neg < 0:
            raise UserInputError(
                f"loss.gamma_pos/gamma_neg: {self.gamma_pos}/{self.gamma_neg} not allowed; must be >= 0"
            )
        if not 0.0 <= self.clip < 1.0:
            raise UserInputError(f"loss.clip: {self.clip} is not allowed; must be in [0, 1)")
        if not self.eps > 0:
            raise UserInputError(f"loss.eps: {self.eps} is not allowed; must be > 0")


class AsymmetricLoss(nn.Module):
    """forward(logits (N, A), targets multi-hot (N, A)) -> scalar loss."""

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        form: str = "official",
        reduction: str = "mean",
        detach_focusing: bool = True,
    ) -> None:
        super().__init__()
        self.settings = AslSettings(
            gamma_pos=gamma_pos,
            gamma_neg=gamma_neg,
            clip=clip,
            eps=eps,
            form=form,  # type: ignore[arg-type]
            reduction=reduction,  # type: ignore[arg-type]
            detach_focusing=detach_focusing,
        )

    @classmethod
    def from_settings(cls, s: AslSettings) -> "AsymmetricLoss":
        return cls(s.gamma_pos, s.gamma_neg, s.clip, s.eps, s.form, s.reduction, s.detach_focusing)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.shape != targets.shape or logits.dim() != 2:
            raise ValueError(
                f"AsymmetricLoss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (N, A)"
            )
        s = self.settings
        y = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        # 1 - p_m, with p_m = max(p - clip, 0): the "probability shifting" of ASL.
        q_neg = (1.0 - p + s.clip).clamp(max=1.0) if s.clip > 0 else 1.0 - p
        log_pos = torch.log(p.clamp(min=s.eps))
        log_neg = torch.log(q_neg.clamp(min=s.eps))

        with torch.set_grad_enabled(torch.is_grad_enabled() and not s.detach_focusing):
            w_pos = (1.0 - p) ** s.gamma_pos
            p_m = 1.0 - q_neg
            w_neg = p_m**s.gamma_neg if s.form == "official" else q_neg**s.gamma_neg

        loss = y * w_pos * log_pos + (1.0 - y) * w_neg * log_neg
        total = -loss.sum()
        if s.reduction == "mean":
            total = total / logits.shape[0]
        return total
