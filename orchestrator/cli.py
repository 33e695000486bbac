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


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit 2, as argparse's do)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.launch.prepare import check_compatible, prepare
    from orchestrator.launch.submit import preflight_datasets
    from orchestrator.ledger import SweepDir
    from orchestrator.sweep.cells import pack

    spec, subjects, cells = prepare(args.sweep, args.set or ())
    # valid means submittable: the same settings check as submit (it only reads)
    check_compatible(spec, SweepDir(spec.output_dir), cells)

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
        "settings": len({c.settings_hash for c in cells}),
        "swept_fields": spec.swept_fields(),
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
    from orchestrator.launch.prepare import check_compatible, prepare
    from orchestrator.launch.submit import submit_sweep
    from orchestrator.ledger import SweepDir

    spec, _subjects, cells = prepare(args.sweep, args.set or ())
    sweep = SweepDir(spec.output_dir)
    check_compatible(spec, sweep, cells)
    # submit_sweep owns the sweep directory: it writes the manifest under the lock.
    result = submit_sweep(spec, sweep, cells, dry_run=args.dry_run)
    if result.get("collector_error"):
        print(f"{PROG}: warning: {result['collector_error']}", file=sys.stderr)
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
        from orchestrator.state.status import render
        from orchestrator.launch.submit import wait_for_sweep

        print(f"{PROG}: waiting for the sweep to finish (Ctrl-C stops waiting, not the sweep)", flush=True)
        summary = wait_for_sweep(sweep)
        render(summary, sweep.path)
        return 0 if summary["all_done"] else 1
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from aullm.model.tiny import build_tiny_llm

    print(build_tiny_llm(args.out, seed=args.seed))
    return 0


def _delegate(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    """`module.attr(args)`, imported when the command runs: `status` must not pay for `collect`'s imports."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), attr)(args) or 0)

    return run


def cmd_data_synth(args: argparse.Namespace) -> int:
    from aullm.data.synth import write_synthetic

    path = write_synthetic(
        args.layout, args.out, subjects=args.subjects, seed=args.seed, clips_per_subject=args.clips_per_subject
    )
    print(path)
    return 0


# ---------------------------------------------------------------- parser


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum`, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 seconds")
    return value


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a field of the sweep file (YAML value), checked as the file is; repeatable: "
                   "--set training.epochs=5 --set 'sweep.lr=[1e-4,3e-4]'")


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
    _add_set(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="submit every cell not yet done (returns at once)",
                       description="Validate the sweep, write its manifest and submit the cells that are not done, "
                       "packed into array tasks. Nothing is written or submitted if validation fails.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--dry-run", action="store_true", help="print the plan (cells, tasks, arrays) as JSON; write nothing")
    p.add_argument("--json", action="store_true", help="print the submission result as JSON")
    p.add_argument("--wait", action="store_true",
                   help="block until every submitted cell has finished or failed, then print the status")
    _add_set(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="where every cell stands (one batched scheduler query)",
                       description="Join the sweep's result files with one batched sacct query and print where "
                       "every cell stands.")
    p.add_argument("sweep", metavar="SWEEP", nargs="?", help=sweep_help)
    p.add_argument("--json", action="store_true", help="print per-cell states as JSON")
    p.add_argument("--watch", nargs="?", const=5.0, type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until every cell is done or stopped")
    p.set_defaults(func=_delegate("orchestrator.state.status", "status_main"))

    p = sub.add_parser("collect", help="pool fold predictions into the paper's tables, plots and MLflow summaries",
                       description="Score every complete group (pooled LOSO predictions, per seed) and write tables "
                       "and plots; can be re-run at any time from the sweep directory.")
    p.add_argument("sweep", metavar="SWEEP", help="sweep file or sweep directory")
    p.add_argument("--out", metavar="DIR", help="where tables and plots go (default: inside the sweep directory)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log summary runs to MLflow")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    _add_set(p)
    p.set_defaults(func=_delegate("orchestrator.results.collect", "collect_main"))

    p = sub.add_parser("retry", help="resubmit failed (or named) cells",
                       description="Resubmit cells that failed, timed out or were cancelled, or the cells named.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--failed", action="store_true", help="only cells whose result says failed")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cell ids")
    p.add_argument("--dry-run", action="store_true", help="print what would be resubmitted; submit nothing")
    _add_set(p)
    p.set_defaults(func=_delegate("orchestrator.launch.submit", "retry_main"))

    p = sub.add_parser("cancel", help="cancel the sweep's pending and running jobs",
                       description="Cancel every live job of the sweep (scancel / stop the local supervisor). "
                       "Finished results stay.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.set_defaults(func=_delegate("orchestrator.launch.submit", "cancel_main"))

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
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `aullm-grid submit --dry-run | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
