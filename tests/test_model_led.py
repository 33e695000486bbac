"""LED filter: the matrix formula on hand-computed values and the frame semantics."""

from __future__ import annotations

import math

import pytest
import torch

from aullm.model.led import LEDFilter, led_matrix

# alpha=10, r1=0.4, r2=0.05, T=4, worked out by hand:
#   diagonal            10 * (0.4 - 0.05)                        =  3.5
#   (0,1) i=0 -> r^0=1  10 * (0.6 - 0.95)                        = -3.5
#   (0,2)               10 * (0.36 - 0.9025)                     = -5.425
#   (0,3)               10 * (0.216 - 0.857375)                  = -6.41375
#   (1,2) (2,3)         10 * (0.6 * 0.4 - 0.95 * 0.05)           =  1.925
#   (1,3)               10 * (0.36 * 0.4 - 0.9025 * 0.05)        =  0.98875
EXPECTED_T4 = [
    [3.5, -3.5, -5.425, -6.41375],
    [0.0, 3.5, 1.925, 0.98875],
    [0.0, 0.0, 3.5, 1.925],
    [0.0, 0.0, 0.0, 3.5],
]


def test_led_matrix_matches_hand_computed_values() -> None:
    w = led_matrix(10.0, 0.4, 0.05, 4)
    assert w.shape == (4, 4)
    torch.testing.assert_close(w, torch.tensor(EXPECTED_T4), rtol=0, atol=1e-5)


def test_led_filter_initial_matrix_is_the_paper_init() -> None:
    f = LEDFilter(T=4)
    torch.testing.assert_close(f.matrix().detach(), torch.tensor(EXPECTED_T4), rtol=0, atol=1e-5)
    # stored as logs, and learnable
    assert math.isclose(f.log_alpha.item(), math.log(10.0), rel_tol=1e-6)
    assert {n for n, p in f.named_parameters() if p.requires_grad} == {"log_alpha", "log_r1", "log_r2"}


def test_led_filter_output_frames_follow_the_formula() -> None:
    f = LEDFilter(T=3)
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    out = f(x).detach()
    assert out.shape == (1, 2, 1, 1)  # frame 0 replaced then dropped: T-1 frames remain
    # input frame 1: (1*-3.5 + 2*3.5) / (1*3.5 + 2*3.5) = 3.5 / 10.5
    # input frame 2: (1*-5.425 + 2*1.925 + 3*3.5) / (5.425 + 3.85 + 10.5)
    expected = torch.tensor([3.5 / 10.5, 8.925 / 19.775]).view(1, 2, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_led_filter_is_per_pixel_and_scale_invariant() -> None:
    torch.manual_seed(0)
    f = LEDFilter()
    x = torch.rand(2, 6, 8, 8) * 255 + 1
    out = f(x)
    assert out.shape == (2, 5, 8, 8)
    torch.testing.assert_close(f(3.0 * x), out)
    # a pixel's output depends only on that pixel's time series
    y = x.clone()
    y[:, :, 0, 0] += 50
    diff = (f(y) - out).abs().detach()
    assert diff[:, :, 0, 0].max() > 1e-3
    diff[:, :, 0, 0] = 0
    assert diff.max() == 0


def test_led_filter_is_finite_on_black_pixels_and_trains() -> None:
    f = LEDFilter()
    x = torch.zeros(1, 6, 4, 4)
    x[:, :, :2] = torch.rand(1, 6, 2, 4) * 255
    out = f(x)
    assert torch.isfinite(out).all()
    assert out[:, :, 2:].abs().max() == 0
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())
    assert f.log_r1.grad.abs() > 0


def test_led_filter_rejects_wrong_frame_count() -> None:
    with pytest.raises(ValueError, match="expects"):
        LEDFilter(T=6)(torch.zeros(1, 5, 4, 4))
