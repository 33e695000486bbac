"""The step before any submission: load a sweep file, check its paths, expand it into cells,
and refuse to mix its cells into a sweep directory trained differently.

Everything that can be wrong with the user's input is found here, before any command writes
to the sweep directory or talks to a scheduler. `validate`, `submit` and `retry` share it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aullm.errors import UserInputError

if TYPE_CHECKING:
    from orchestrator.ledger import SweepDir
    from orchestrator.sweep.cells import Cell
    from orchestrator.sweep.spec import SweepSpec


def prepare(sweep_file: str) -> tuple[SweepSpec, dict[str, list[str]], list[Cell]]:
    """Load a sweep file, check its paths, expand it: (spec, subjects by dataset, cells)."""
    from orchestrator.sweep.cells import expand
    from orchestrator.sweep.spec import check_deepspeed, load_sweep, validate_paths

    spec = load_sweep(sweep_file)
    subjects = validate_paths(spec)
    check_deepspeed(spec)
    cells = expand(spec, subjects)
    return spec, subjects, cells


def check_compatible(spec: SweepSpec, sweep: SweepDir) -> None:
    """Refuse to add cells to a sweep directory whose results were trained differently."""
    if not sweep.exists():
        return
    from aullm.recipes import recorded

    previous = recorded(sweep.read_manifest().get("spec", {}).get("training", {}))
    current = spec.snapshot()["training"]
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if changed:
        key = changed[0]
        raise UserInputError(
            f"{spec.source}: field 'training.{key}': {current.get(key)!r} differs from {previous.get(key)!r} "
            f"used by the results already in {sweep.path}; results would mix, so use a new output_dir"
        )
