"""`aullm-grid`: one command for the whole grid.

    aullm-grid validate SWEEP                 check a sweep file and its paths; count cells
    aullm-grid submit SWEEP [--dry-run]       fan the grid out (returns at once)
    aullm-grid status [SWEEP] [--watch]       where every cell stands
    aullm-grid collect SWEEP [--out DIR]      tables, plots and MLflow summary runs
    aullm-grid retry SWEEP [--failed|--cells] resubmit cells that did not finish
    aullm-grid cancel SWEEP                   cancel the sweep's live jobs
    aullm-grid data synth --layout casme2 --out DIR   a synthetic dataset

Bad input (a file, field, path or value) prints one line, `aullm-grid: error: ...`, on
stderr and exits with 2, before anything is written or submitted. This module imports
only the standard library at start; each command imports what it needs, so
`validate`, `status` and `submit --dry-run` answer without loading torch or mlflow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

PROG = "aullm-grid"
EXIT_USER_ERROR = 2
EXIT_NOT_AVAILABLE = 1


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit 2, as argparse's do)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _optional(module: str, attr: str) -> Callable[..., Any] | None:
    """`module.attr` if that module exists (written by another part of the project)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the module itself is absent, not one of its imports
            return None
        raise
    return getattr(mod, attr, None)


def _require(module: str, attr: str, command: str) -> Callable[..., Any]:
    func = _optional(module, attr)
    if func is None:
        raise NotImplementedError(f"`{command}` is not available in this installation ({module}.{attr} is missing)")
    return func


# ---------------------------------------------------------------- shared steps


def prepare(sweep_file: str) -> tuple[Any, dict[str, list[str]], list[Any]]:
    """Load a sweep file, check its paths, expand it: (spec, subjects by dataset, cells).

    Everything that can be wrong with the user's input is found here, before any
    command writes to the sweep directory or talks to a scheduler.
    """
    from orchestrator.cells import expand
    from orchestrator.spec import check_deepspeed, load_sweep, validate_paths

    spec = load_sweep(sweep_file)
    subjects = validate_paths(spec)
    check_deepspeed(spec)
    cells = expand(spec, subjects)
    return spec, subjects, cells


def check_compatible(spec: Any, sweep: Any) -> None:
    """Refuse to add cells to a sweep directory whose results were trained differently."""
    from aullm.errors import UserInputError

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


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.cells import pack

    spec, subjects, cells = prepare(args.sweep)
    from orchestrator.submit import preflight_datasets

    # decode every frame once (in memory): a corrupt JPEG costs seconds here, not a GPU task
    preflight_datasets(spec, cells, write_cache=False)
    tasks = pack(cells, spec.resources.cells_per_task)
    kinds = {kind: sum(1 for c in cells if c.kind == kind) for kind in ("loso", "cross_domain")}
    summary = {
        "sweep": args.sweep,
        "name": spec.name,
        "valid": True,
        "output_dir": str(spec.output_dir),
        "subjects": {name: len(subs) for name, subs in subjects.items()},
        "llms": spec.used_llms(),
        "cells": len(cells),
        "cells_by_kind": kinds,
        "tasks": len(tasks),
        "executor": spec.resources.executor,
    }
    if args.json:
        _print_json(summary)
        return 0
    datasets = ", ".join(f"{name} ({n} subjects)" for name, n in summary["subjects"].items())
    print(f"{args.sweep}: valid")
    print(f"  datasets: {datasets}")
    print(f"  llms: {', '.join(summary['llms']) or 'none'}")
    print(
        f"  cells: {len(cells)} (loso {kinds['loso']}, cross_domain {kinds['cross_domain']}) in {len(tasks)} tasks "
        f"of <= {spec.resources.cells_per_task}; executor {spec.resources.executor}; output {spec.output_dir}"
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.ledger import SweepDir

    spec, _subjects, cells = prepare(args.sweep)
    sweep = SweepDir(spec.output_dir)
    check_compatible(spec, sweep)
    submit_sweep = _optional("orchestrator.submit", "submit_sweep")
    if submit_sweep is not None:
        # submit_sweep owns the sweep directory: it writes the manifest under the lock.
        result = submit_sweep(spec, sweep, cells, dry_run=args.dry_run)
    elif args.dry_run:
        from orchestrator.cells import submission_plan

        done = sweep.done_cell_ids() & {c.cell_id for c in cells}
        result = {"dry_run": True, **submission_plan(spec, [c for c in cells if c.cell_id not in done], skipped_done=len(done))}
        result["cells"] = len(cells)
        result["to_submit"] = len(cells) - len(done)
        result["cell_ids"] = [c.cell_id for c in cells]
    else:
        raise NotImplementedError(
            "real submission is not available in this installation (orchestrator.submit.submit_sweep is missing); "
            "`submit --dry-run` shows the plan"
        )
    if args.dry_run or args.json:
        _print_json(result)
        return 0
    submitted = result.get("submitted", 0)
    print(
        f"{PROG}: submitted {submitted} of {result.get('cells', len(cells))} cells "
        f"({result.get('skipped_done', 0)} already done, {result.get('skipped_live', 0)} still live) "
        f"in {result.get('tasks', '?')} tasks; sweep directory {spec.output_dir}"
    )
    ids = result.get("array_job_ids") or ([result["batch_id"]] if result.get("batch_id") else [])
    if ids:
        print(f"  jobs: {', '.join(map(str, ids))}; follow with `{PROG} status {args.sweep}`")
    if args.wait and submitted:
        from orchestrator.status import render
        from orchestrator.submit import wait_for_sweep

        print(f"{PROG}: waiting for the sweep to finish (Ctrl-C stops waiting, not the sweep)", flush=True)
        summary = wait_for_sweep(sweep)
        render(summary, sweep.path)
        return 0 if summary["all_done"] else 1
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    build_tiny_llm = _require("aullm.model.tiny", "build_tiny_llm", "model tiny")
    print(build_tiny_llm(args.out, seed=args.seed))
    return 0


def _delegate(module: str, attr: str, command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return int(_require(module, attr, command)(args) or 0)

    return run


def cmd_data_synth(args: argparse.Namespace) -> int:
    write_synthetic = _require("aullm.data.synth", "write_synthetic", "data synth")
    path = write_synthetic(
        args.layout, args.out, subjects=args.subjects, seed=args.seed, clips_per_subject=args.clips_per_subject
    )
    print(path)
    return 0


# ---------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run the AU-LLM paper grid (datasets x folds x LLMs x variants x seeds) as Slurm arrays or locally.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every command has --help. Bad input exits with 2 and one line on stderr.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sweep_help = "sweep file (YAML), e.g. sweeps/demo.yaml"

    p = sub.add_parser("validate", help="check a sweep file, its datasets and models; count its cells",
                       description="Check a sweep file and every path it uses (dataset sheets, model folders, folds); "
                       "print the cell count. Writes nothing.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="submit every cell not yet done (returns at once)",
                       description="Validate the sweep, write its manifest and submit the cells that are not done, "
                       "packed into array tasks. Nothing is written or submitted if validation fails.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--dry-run", action="store_true", help="print the plan (cells, tasks, arrays) as JSON; write nothing")
    p.add_argument("--json", action="store_true", help="print the submission result as JSON")
    p.add_argument("--wait", action="store_true",
                   help="block until every submitted cell has finished or failed, then print the status")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="where every cell stands (one batched scheduler query)",
                       description="Join the sweep's result files with one batched sacct query and print where "
                       "every cell stands.")
    p.add_argument("sweep", metavar="SWEEP", nargs="?", help=sweep_help)
    p.add_argument("--json", action="store_true", help="print per-cell states as JSON")
    p.add_argument("--watch", nargs="?", const=5.0, type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until every cell is done or stopped")
    p.set_defaults(func=_delegate("orchestrator.status", "status_main", "status"))

    p = sub.add_parser("collect", help="pool fold predictions into the paper's tables, plots and MLflow summaries",
                       description="Score every complete group (pooled LOSO predictions, per seed) and write tables "
                       "and plots; can be re-run at any time from the sweep directory.")
    p.add_argument("sweep", metavar="SWEEP", help="sweep file or sweep directory")
    p.add_argument("--out", metavar="DIR", help="where tables and plots go (default: inside the sweep directory)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log summary runs to MLflow")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=_delegate("orchestrator.collect", "collect_main", "collect"))

    p = sub.add_parser("retry", help="resubmit failed (or named) cells",
                       description="Resubmit cells that failed, timed out or were cancelled, or the cells named.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--failed", action="store_true", help="only cells whose result says failed")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cell ids")
    p.add_argument("--dry-run", action="store_true", help="print what would be resubmitted; submit nothing")
    p.set_defaults(func=_delegate("orchestrator.submit", "retry_main", "retry"))

    p = sub.add_parser("cancel", help="cancel the sweep's pending and running jobs",
                       description="Cancel every live job of the sweep (scancel / stop the local supervisor). "
                       "Finished results stay.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.set_defaults(func=_delegate("orchestrator.submit", "cancel_main", "cancel"))

    p = sub.add_parser("data", help="dataset utilities", description="Dataset utilities.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser("synth", help="write a synthetic dataset in an official on-disk layout",
                            description="Write a synthetic dataset (coding sheet + frame folders) in the layout of "
                            "CASME II, SAMM or 4DME, with learnable AU-localised motion.")
    s.add_argument("--layout", required=True, choices=("casme2", "samm", "4dme"), help="which dataset's layout")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset root to create")
    s.add_argument("--subjects", type=_positive_int, metavar="N", help="number of subjects (default: the generator's)")
    s.add_argument("--clips-per-subject", type=_positive_int, metavar="K",
                   help="clips per subject (default: scaled from the real dataset)")
    s.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="random seed (default 0)")
    s.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("model", help="model utilities", description="Model utilities.")
    model_sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    m = model_sub.add_parser("tiny", help="save a tiny random Qwen2 (tests, the demo)",
                             description="Build a tiny Qwen2 from a config with random weights and save it with its "
                             "tokenizer, loadable by from_pretrained like a real checkpoint.")
    m.add_argument("--out", required=True, metavar="DIR", help="folder to write (idempotent)")
    m.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="weights seed (default 0)")
    m.set_defaults(func=cmd_model_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `aullm-grid`; returns the exit code (argparse errors raise SystemExit(2))."""
    from aullm.errors import UserInputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NotImplementedError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_AVAILABLE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `aullm-grid submit --dry-run | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
