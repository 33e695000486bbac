"""Visual backbone: feature sizes and per-frame squeeze-and-excitation."""

from __future__ import annotations

import pytest
import torch

from aullm.model.backbone import F_HIGH_DIM, F_MID_DIM, FrameSE, VisualBackbone


def test_feature_sizes_for_a_6x64x64_clip() -> None:
    torch.manual_seed(0)
    net = VisualBackbone(dropout=0.3)
    f_mid, f_high = net(torch.rand(2, 6, 64, 64) * 255)
    assert F_MID_DIM == 10368 and F_HIGH_DIM == 256
    assert f_mid.shape == (2, 10368)
    assert f_high.shape == (2, 256)
    assert (f_high >= 0).all()  # ReLU before the dropout


def test_eval_mode_is_deterministic_and_train_mode_drops_out() -> None:
    torch.manual_seed(0)
    net = VisualBackbone(dropout=0.3)
    x = torch.rand(4, 6, 64, 64) * 255
    net.eval()
    a, b = net(x)[1], net(x)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    net.train()
    assert not torch.equal(net(x)[1], net(x)[1])


def test_se_squeezes_each_frame_separately() -> None:
    torch.manual_seed(0)
    se = FrameSE(64)
    assert [m.out_features for m in se.excite if isinstance(m, torch.nn.Linear)] == [4, 64]
    with torch.no_grad():  # positive squeeze weights: the ReLU passes, so a change must show
        se.excite[0].weight.fill_(0.05)
        se.excite[0].bias.zero_()
    x = torch.rand(1, 64, 4, 5, 5)
    y = x.clone()
    y[:, :, 2] *= 3  # change frame 2 only
    out_x, out_y = se(x), se(y)
    for t in (0, 1, 3):
        torch.testing.assert_close(out_x[:, :, t], out_y[:, :, t], rtol=0, atol=0)
    assert not torch.allclose(out_x[:, :, 2] * 3, out_y[:, :, 2], rtol=1e-4, atol=0)  # its own weights changed


def test_backbone_rejects_wrong_clip_shape() -> None:
    with pytest.raises(ValueError, match="expects"):
        VisualBackbone()(torch.zeros(2, 6, 32, 32))


def test_led_and_cnn_stay_fp32_under_bf16_autocast() -> None:
    """Under the project's mixed precision (bf16 autocast around the whole model) the LED
    output equals fp32 within 1e-5 relative; the same filter under plain bf16 autocast
    does not come close (its einsums run in bf16)."""
    torch.manual_seed(0)
    net = VisualBackbone(dropout=0.0).eval()
    x = torch.rand(4, 6, 64, 64) * 255
    seen: list[torch.Tensor] = []
    net.led.register_forward_hook(lambda _m, _inp, out: seen.append(out))
    with torch.no_grad():
        net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f_mid, f_high = net(x)
            plain = net.led(x)  # the filter without the backbone's guard
    reference, mixed = seen[0], seen[1]
    assert mixed.dtype == torch.float32 and f_mid.dtype == torch.float32 and f_high.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-6)
    rel = ((plain.float() - reference).abs() / reference.abs().clamp(min=1e-3)).max().item()
    assert rel > 1e-3, rel
