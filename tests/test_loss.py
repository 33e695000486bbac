"""Asymmetric loss against hand-computed numbers and an explicit per-element loop."""

from __future__ import annotations

import math

import pytest
import torch

from aullm.errors import UserInputError
from aullm.loss import AsymmetricLoss


def reference_asl(logits: list[list[float]], targets: list[list[int]], form: str,
                  gp: float = 0.0, gn: float = 4.0, clip: float = 0.05, eps: float = 1e-8) -> float:
    """Straight from the formula, one element at a time, 1/N over samples."""
    total = 0.0
    for row_x, row_y in zip(logits, targets):
        for x, y in zip(row_x, row_y):
            p = 1.0 / (1.0 + math.exp(-x))
            if y == 1:
                total += (1 - p) ** gp * math.log(max(p, eps))
            else:
                p_m = max(p - clip, 0.0)
                weight = p_m**gn if form == "official" else (1 - p_m) ** gn
                total += weight * math.log(max(1 - p_m, eps))
    return -total / len(logits)


LOGITS = [[0.0, 2.0, -1.5, 4.0], [-3.0, 0.5, 1.0, -0.2], [-6.0, 8.0, 0.1, -0.05]]
TARGETS = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("form", ["official", "script"])
@pytest.mark.parametrize("gp,gn,clip", [(0.0, 4.0, 0.05), (1.0, 2.0, 0.0), (0.0, 4.0, 0.2)])
def test_asl_equals_explicit_loop(form: str, gp: float, gn: float, clip: float) -> None:
    loss = AsymmetricLoss(gamma_pos=gp, gamma_neg=gn, clip=clip, form=form)
    got = loss(torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS))
    assert got.item() == pytest.approx(reference_asl(LOGITS, TARGETS, form, gp, gn, clip), rel=1e-10)


def test_asl_hand_computed_single_logit() -> None:
    # logit 0 -> p = 0.5. Positive: -log 0.5. Negative: p_m = 0.45, log(1 - p_m) = log 0.55,
    # official weight 0.45^4 = 0.04100625; script weight 0.55^4 = 0.09150625.
    x = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([[1, 0]])
    official = AsymmetricLoss()(x, y).item()
    script = AsymmetricLoss(form="script")(x, y).item()
    assert official == pytest.approx(0.6931471806 + 0.04100625 * 0.5978370008, rel=1e-9)
    assert script == pytest.approx(0.6931471806 + 0.09150625 * 0.5978370008, rel=1e-9)


def test_asl_reduction_is_paper_mean_over_samples() -> None:
    x, y = torch.tensor(LOGITS), torch.tensor(TARGETS)
    mean = AsymmetricLoss()(x, y)
    total = AsymmetricLoss(reduction="sum")(x, y)
    torch.testing.assert_close(total, mean * len(LOGITS))


def test_clipped_easy_negatives_cost_nothing() -> None:
    # p <= clip for a negative -> p_m = 0 -> zero loss and zero gradient (ASL's hard threshold).
    x = torch.tensor([[-4.0]], requires_grad=True)  # p ~ 0.018 < 0.05
    loss = AsymmetricLoss()(x, torch.tensor([[0]]))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.item() == 0.0


def test_detach_focusing_changes_gradient_not_value() -> None:
    x1 = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y = torch.tensor(TARGETS)
    l1 = AsymmetricLoss(detach_focusing=True)(x1, y)
    l2 = AsymmetricLoss(detach_focusing=False)(x2, y)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    l1.backward()
    l2.backward()
    assert not torch.allclose(x1.grad, x2.grad)
    # the full-gradient variant agrees with autograd through the explicit formula
    x3 = x1.detach().clone().requires_grad_(True)
    p = torch.sigmoid(x3)
    p_m = (p - 0.05).clamp(min=0)
    yf = y.double()
    ref = -(yf * torch.log(p) + (1 - yf) * p_m**4 * torch.log(1 - p_m)).sum() / 3
    ref.backward()
    torch.testing.assert_close(x2.grad, x3.grad)


@pytest.mark.parametrize("kwargs", [{"form": "inverted"}, {"reduction": "avg"}, {"clip": 1.5}, {"gamma_neg": -1}])
def test_bad_settings_are_user_errors(kwargs: dict) -> None:
    with pytest.raises(UserInputError):
        AsymmetricLoss(**kwargs)


def script_loss_as_released(x: torch.Tensor, y: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                            clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """The released script's loss, re-implemented here the way it is written there
    (AULLMmain.py, AsymmetricLoss.forward with disable_torch_grad_focal_loss=True): the
    focusing weight multiplied in *in place* while gradients are switched off, then a sum."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos, xs_neg = x_sigmoid, 1 - x_sigmoid
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    torch.set_grad_enabled(False)
    focal_weight = torch.where(y == 1, (1 - xs_pos) ** gamma_pos, xs_neg**gamma_neg)
    loss *= focal_weight
    torch.set_grad_enabled(True)
    return -loss.sum()


@pytest.mark.parametrize("gp,gn,clip", [(0.0, 4.0, 0.05), (1.0, 2.0, 0.1)])
def test_script_form_trains_on_the_scripts_gradient_and_prints_its_value(gp: float, gn: float, clip: float) -> None:
    """recipe `script`: on random logits, the gradient equals the released script's (the
    unweighted clipped BCE, summed), and the loss value equals the weighted one it prints."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(64, 8, generator=g) < 0.3).double()
    x_ref = logits.clone().requires_grad_(True)
    ref = script_loss_as_released(x_ref, targets, gamma_neg=gn, gamma_pos=gp, clip=clip)
    ref.backward()
    x = logits.clone().requires_grad_(True)
    ours = AsymmetricLoss(gamma_pos=gp, gamma_neg=gn, clip=clip, form="script", reduction="sum")(x, targets)
    ours.backward()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    # ... and that gradient is the plain clipped BCE's: the weights never reach it
    x_bce = logits.clone().requires_grad_(True)
    p = torch.sigmoid(x_bce)
    bce = -(targets * torch.log(p) + (1 - targets) * torch.log((1 - p + clip).clamp(max=1))).sum()
    bce.backward()
    torch.testing.assert_close(x.grad, x_bce.grad, rtol=1e-12, atol=1e-12)
    # while the official form's gradient is a different one
    x_off = logits.clone().requires_grad_(True)
    AsymmetricLoss(gamma_pos=gp, gamma_neg=gn, clip=clip, reduction="sum")(x_off, targets).backward()
    assert not torch.allclose(x_off.grad, x_ref.grad)
