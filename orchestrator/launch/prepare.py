"""The step before any submission: load a sweep file, check its paths, expand it into cells,
and refuse to mix its cells into a sweep directory trained differently.

Everything that can be wrong with the user's input is found here, before any command writes
to the sweep directory or talks to a scheduler. `validate`, `submit` and `retry` share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aullm.errors import UserInputError

if TYPE_CHECKING:
    from orchestrator.ledger import SweepDir
    from orchestrator.sweep.cells import Cell
    from orchestrator.sweep.spec import SweepSpec


def prepare(sweep_file: str, overrides: Sequence[str] = ()) -> tuple[SweepSpec, dict[str, list[str]], list[Cell]]:
    """Load a sweep file (with its `--set` overrides), check its paths, expand it:
    (spec, subjects by dataset, cells)."""
    from orchestrator.sweep.cells import expand
    from orchestrator.sweep.spec import check_deepspeed, load_sweep, validate_paths

    spec = load_sweep(sweep_file, overrides)
    subjects = validate_paths(spec)
    check_deepspeed(spec)
    cells = expand(spec, subjects)
    return spec, subjects, cells


def check_compatible(spec: SweepSpec, sweep: SweepDir, cells: Sequence[Cell]) -> None:
    """Refuse a sweep file whose cells would land on results trained under other settings
    (`orchestrator.ledger.check_settings`: the one check of validate, submit, retry, collect)."""
    from orchestrator.ledger import check_settings

    check_settings(spec, sweep, cells)


def check_same_cells(spec: SweepSpec, sweep: SweepDir, cells: Sequence[Cell]) -> None:
    """`retry` re-runs the manifest's cells under the manifest's settings and nothing else:
    a sweep file that now expands to other cells (an axis value added or changed) is the
    business of `submit`, never of a retry that would rewrite the manifest behind the user."""
    known = {c.cell_id for c in sweep.cells()}
    now = {c.cell_id for c in cells}
    if known == now:
        return
    added, gone = sorted(now - known), sorted(known - now)
    what = f"cell {added[0]} is new" if added else f"cell {gone[0]} is gone"
    raise UserInputError(
        f"{spec.source}: the sweep file no longer expands to the cells of {sweep.manifest_path} "
        f"({len(added)} new, {len(gone)} gone; {what}); retry re-runs only the recorded cells: "
        "submit the file to add cells, or retry with the file the sweep was submitted with "
        f"({sweep.resolved_sweep_path})"
    )
