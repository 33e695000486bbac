"""LED temporal filter (Laplacian of Exponential of Difference), DESIGN.md §4.

The filter reweights the T frames of a clip with a learnable upper-triangular TxT
matrix W and normalises per pixel, which amplifies transient (onset-apex) changes
while staying invariant to the absolute brightness of the clip.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aullm.constants import NUM_FRAMES

# Added to the per-pixel normaliser |x| . |W|. The ratio is scale-invariant, and the
# script feeds raw 0..255 pixels, so the normaliser is >= ~0.1 wherever any of the
# frames is non-zero; eps only keeps pixels that are exactly 0 in every frame finite
# (their output is then 0). 1e-6 is far below any real normaliser in float32 yet
# large enough that the input gradient at such pixels stays bounded (~|W|/eps).
LED_EPS = 1e-6


def led_matrix(alpha: Tensor | float, r1: Tensor | float, r2: Tensor | float, T: int) -> Tensor:
    """The LED matrix W (T, T), differentiable in alpha, r1 and r2.

    W[i, j] = alpha * ((1-r1)^(j-i) * r1^min(1,i) - (1-r2)^(j-i) * r2^min(1,i))  for j > i
    W[i, i] = alpha * (r1 - r2)
    W[i, j] = 0                                                             for j < i
    """
    if T < 1:
        raise ValueError(f"led_matrix: T must be >= 1, got {T}")
    alpha_t, r1_t, r2_t = (torch.as_tensor(v, dtype=torch.get_default_dtype()) for v in (alpha, r1, r2))
    alpha_t, r1_t, r2_t = torch.broadcast_tensors(alpha_t, r1_t, r2_t)
    zero = torch.zeros_like(alpha_t)
    rows: list[Tensor] = []
    for i in range(T):
        row: list[Tensor] = []
        for j in range(T):
            if j < i:
                row.append(zero)
            elif j == i:
                row.append(alpha_t * (r1_t - r2_t))
            else:
                # Python-int exponents keep pow exact (and defined) even if a learnt r
                # drifts above 1 and makes the base negative.
                k, m = j - i, min(1, i)
                row.append(alpha_t * ((1 - r1_t) ** k * r1_t**m - (1 - r2_t) ** k * r2_t**m))
        rows.append(torch.stack(row))
    return torch.stack(rows)


class LEDFilter(nn.Module):
    """Learnable LED filter over the time axis: (B, T, H, W) -> (B, T-1, H, W).

    alpha, r1 and r2 are stored as logs so that they stay positive while learning.
    out[:, j] = sum_i x[:, i] W[i, j] / (sum_i |x[:, i]| |W[i, j]| + eps); output frame
    0 is then replaced by input frame 0 and dropped, so T-1 frames remain. (Frame 0
    only ever sees W[0, 0], i.e. it would carry sign(x0); the replacement mirrors the
    reference implementation and is kept so the semantics are explicit.)
    """

    def __init__(
        self,
        T: int = NUM_FRAMES,
        alpha: float = 10.0,
        r1: float = 0.4,
        r2: float = 0.05,
        eps: float = LED_EPS,
    ) -> None:
        super().__init__()
        if T < 2:
            raise ValueError(f"LEDFilter: T must be >= 2 (frame 0 is dropped), got {T}")
        for name, value in (("alpha", alpha), ("r1", r1), ("r2", r2)):
            if not value > 0:
                raise ValueError(f"LEDFilter: {name} must be > 0 (stored as a log), got {value}")
        self.T = T
        self.eps = eps
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_r1 = nn.Parameter(torch.tensor(math.log(r1)))
        self.log_r2 = nn.Parameter(torch.tensor(math.log(r2)))

    def matrix(self) -> Tensor:
        return led_matrix(self.log_alpha.exp(), self.log_r1.exp(), self.log_r2.exp(), self.T)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.T:
            raise ValueError(f"LEDFilter expects (B, {self.T}, H, W), got {tuple(x.shape)}")
        w = self.matrix().to(dtype=x.dtype, device=x.device)
        num = torch.einsum("bihw,ij->bjhw", x, w)
        den = torch.einsum("bihw,ij->bjhw", x.abs(), w.abs()) + self.eps
        out = num / den
        out = torch.cat([x[:, :1], out[:, 1:]], dim=1)
        return out[:, 1:]

    def extra_repr(self) -> str:
        return f"T={self.T}, eps={self.eps}"
