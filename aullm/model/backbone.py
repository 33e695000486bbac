"""Visual backbone: LED filter + 3D-CNN giving mid- and high-level features (DESIGN.md §4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aullm.constants import FRAME_SIZE, NUM_FRAMES
from aullm.model.led import LEDFilter

F_HIGH_DIM = 256


def f_mid_dim(T: int = NUM_FRAMES, size: int = FRAME_SIZE) -> int:
    """Length of the flattened F_mid for T frames of size x size (10368 for 6x64x64)."""
    t = T - 1  # LED drops frame 0
    s = size - 4  # conv (1,5,5)
    s //= 3  # maxpool (1,3,3)
    t, s = t - 1, s - 2  # conv (2,3,3)
    t, s = t // 2, s // 2  # maxpool 2
    if t < 1 or s < 1:
        raise ValueError(f"clips of {T}x{size}x{size} are too small for the backbone")
    return 64 * t * s * s


F_MID_DIM = f_mid_dim()

# oneDNN's Conv3d backward on a CPU runs ~1.4x faster on channels-last activations
# (bench/bench_backbone.py; the backbone is about 70% of a tiny-model epoch). On CUDA the
# layout stays as cuDNN gets it: nothing was measured there.
CHANNELS_LAST_ON_CPU = True


class FrameSE(nn.Module):
    """Squeeze-and-Excitation applied to each frame separately.

    The squeeze averages over H and W only (not time), so every frame gets its own
    channel weights: a micro-expression's informative channels change between onset
    and apex.
    """

    def __init__(self, channels: int = 64, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excite = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, T, H, W)
        squeezed = x.mean(dim=(3, 4)).transpose(1, 2)  # (B, T, C)
        weights = self.excite(squeezed).transpose(1, 2)  # (B, C, T)
        return x * weights[..., None, None]


class VisualBackbone(nn.Module):
    """(B, T, 64, 64) float clips -> (F_mid (B, 10368), F_high (B, 256))."""

    def __init__(self, dropout: float = 0.3, T: int = NUM_FRAMES, size: int = FRAME_SIZE) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"VisualBackbone: dropout must be in [0, 1), got {dropout}")
        self.T, self.size = T, size
        self.mid_dim = f_mid_dim(T, size)
        self.high_dim = F_HIGH_DIM
        self.led = LEDFilter(T=T)
        self.block1 = nn.Sequential(
            nn.Conv3d(1, 32, kernel_size=(1, 5, 5)),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3)),
            nn.BatchNorm3d(32),
            nn.Dropout3d(dropout),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(32, 64, kernel_size=(2, 3, 3)),
            nn.ReLU(inplace=True),
            nn.BatchNorm3d(64),
        )
        self.se = FrameSE(64, reduction=16)  # 64 -> 4 -> 64
        self.pool2 = nn.Sequential(nn.MaxPool3d(2), nn.Dropout3d(dropout))
        self.high = nn.Sequential(
            nn.Linear(self.mid_dim, F_HIGH_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        if clips.dim() != 4 or tuple(clips.shape[1:]) != (self.T, self.size, self.size):
            raise ValueError(
                f"VisualBackbone expects (B, {self.T}, {self.size}, {self.size}), got {tuple(clips.shape)}"
            )
        # fp32 whatever the autocast around: the LED filter divides two sums of products
        # of raw 0..255 pixels, which bf16 (8 bits of mantissa) rounds by ~0.4% each, far more
        # than the subtle differences between frames it exists to amplify. The LLM is what
        # bf16 pays for; this path is a small share of the FLOPs.
        with torch.autocast(device_type=clips.device.type, enabled=False):
            x = self.led(clips.float()).unsqueeze(1)  # (B, 1, T-1, H, W)
            if CHANNELS_LAST_ON_CPU and x.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last_3d)  # same values, other strides
            x = self.block1(x)
            x = self.se(self.conv2(x))
            f_mid = torch.flatten(self.pool2(x), 1)
            f_high = self.high(f_mid)
        return f_mid, f_high
