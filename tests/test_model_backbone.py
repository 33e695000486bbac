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
