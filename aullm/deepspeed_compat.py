"""One workaround for DeepSpeed 0.19.8, applied when the trainer sets up DeepSpeed.

`DeepSpeedEngine._broadcast_model` sends every parameter as `p.data.view(torch.uint8)`,
which torch refuses for a 0-dim tensor ("self.dim() cannot be 0 to view Float as Byte").
The LED filter's alpha, r1 and r2 are such scalars (DESIGN.md §4), so every cell failed
in `accelerator.prepare`. The patch gives those parameters a 1-element shape over the
same storage for the length of the broadcast, then restores it: DeepSpeed's own logic
(groups, source rank) is untouched and the values are the ones it broadcast.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_aullm_scalar_broadcast"


def patch_scalar_parameter_broadcast() -> None:
    """Idempotent: wrap `DeepSpeedEngine._broadcast_model` once per process."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    if getattr(original, _PATCHED, False):
        return

    def broadcast_model(self: Any) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.view(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.view(())

    setattr(broadcast_model, _PATCHED, True)
    DeepSpeedEngine._broadcast_model = broadcast_model
