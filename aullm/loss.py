"""Asymmetric Loss (Ridnik et al., ICCV 2021) for multi-label AU detection (DESIGN.md §4).

With p = sigmoid(logit), the shifted negative probability p_m = max(p - clip, 0), and
the clipped BCE  b = y log(p) + (1-y) log(1-p_m):

    official:  l = -[ y (1-p)^g+ log(p)  +  (1-y) p_m^g- log(1-p_m) ]   (value and gradient)
    script:    value     -[ y (1-p)^g+ log(p)  +  (1-y) (1-p_m)^g- log(1-p_m) ]
               gradient  that of -b: the plain clipped BCE, unweighted

`official` is the ASL paper's (and the AU-LLM paper's Eq. 4) formulation: easy
negatives (small p) are down-weighted by p_m^g-, and the focusing weights are treated
as constants in the backward pass (`detach_focusing`, as the official ASL code trains
with `disable_torch_grad_focal_loss`), so the gradient is that of the weighted log terms.

`script` is what the released script (AULLMmain.py, `AsymmetricLoss.forward`) trains
on. It builds `loss = y log(p) + (1-y) log(1-p_m)`, then, with gradients switched off,
multiplies it *in place* by its focusing weight ((1-p)^g+ for positives, (1-p_m)^g- for
negatives) and returns `-loss.sum()`. An in-place multiply under
`set_grad_enabled(False)` changes the tensor's values but is not recorded by autograd,
and neither the sum's backward nor the addition's reads those values: the gradient that
reaches the model is exactly that of the unweighted clipped BCE. The weights change only
the printed loss value. (Their negative form, (1-p_m)^g-, is the opposite of ASL's, but
it never reaches a gradient: what changes training is that there is no focusing at
all.) `script` reproduces both the value the script prints and the gradient it trains on.

Reduction: the paper's Eq. 4 has -1/N sum_i sum_j, so `mean` sums over AUs and averages
over the N samples; the script returns the plain sum, `sum`. With Adam the two differ
only through Adam's eps and the weight decay balance, but they are not interchangeable.
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

        if s.form == "script":
            clipped_bce = y * log_pos + (1.0 - y) * log_neg
            with torch.no_grad():
                weights = (1.0 - p) ** s.gamma_pos * y + q_neg**s.gamma_neg * (1.0 - y)
                weighted = clipped_bce * weights
            # the weighted loss's value, the unweighted loss's gradient (see the module doc)
            loss = clipped_bce + (weighted - clipped_bce).detach()
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not s.detach_focusing):
                w_pos = (1.0 - p) ** s.gamma_pos
                w_neg = (1.0 - q_neg) ** s.gamma_neg
            loss = y * w_pos * log_pos + (1.0 - y) * w_neg * log_neg
        total = -loss.sum()
        if s.reduction == "mean":
            total = total / logits.shape[0]
        return total
