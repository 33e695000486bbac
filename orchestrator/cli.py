"""`aullm-grid`: one command for the whole grid.

    aullm-grid validate SWEEP                 check a sweep file and its paths; count cells
    aullm-grid submit SWEEP [--dry-run]       fan the grid out (returns at once)
    aullm-grid status [SWEEP] [--watch [S]]   where every cell stands (live with --watch)
    aullm-grid logs SWEEP CELL                a cell's task log (its tail)
    aullm-grid collect SWEEP [--out DIR]      tables, plots and MLflow summary runs
    aullm-grid retry SWEEP [--failed|--cells] resubmit cells that did not finish
    aullm-grid cancel SWEEP [--dry-run]       cancel the sweep's live jobs
    aullm-grid data synth --layout casme2 --out DIR   a synthetic dataset

SWEEP is the sweep file or its sweep directory (output_dir), for every command. Every
command has `--json`: one object with `command`, `sweep` (the argument as given) and
`sweep_dir`, documented in docs/cli.md. Human output ends with `next:` lines, the
commands worth running next.

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


def _q(text: Any) -> str:
    import shlex

    return shlex.quote(str(text))


def _next(steps: Sequence[str]) -> None:
    for step in steps:
        print(f"next: {step}")


def _sweep_file(args: argparse.Namespace) -> str:
    """SWEEP as a file, for the commands that read the sweep file (a directory names its own)."""
    from orchestrator.state.status import sweep_file_of

    return sweep_file_of(args.sweep)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aullm-grid")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.launch.prepare import check_compatible, prepare
    from orchestrator.launch.submit import preflight_datasets
    from orchestrator.ledger import SweepDir
    from orchestrator.sweep.cells import pack

    spec, subjects, cells = prepare(_sweep_file(args), args.set or ())
    # valid means submittable: the same settings check as submit (it only reads)
    check_compatible(spec, SweepDir(spec.output_dir), cells)

    # decode every frame once (in memory): a corrupt JPEG costs seconds here, not a GPU task
    preflight_datasets(spec, cells, write_cache=False)
    tasks = pack(cells, spec.resources.cells_per_task)
    kinds = {kind: sum(1 for c in cells if c.kind == kind) for kind in ("loso", "cross_domain")}
    summary = {
        "command": "validate",
        "sweep": args.sweep,
        "sweep_dir": str(spec.output_dir),
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
    summary["next"] = [f"{PROG} submit {_q(args.sweep)}"]
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
    _next(summary["next"])
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.launch.prepare import check_compatible, prepare
    from orchestrator.launch.submit import result_warnings, submit_sweep
    from orchestrator.ledger import SweepDir

    spec, _subjects, cells = prepare(_sweep_file(args), args.set or ())
    sweep = SweepDir(spec.output_dir)
    check_compatible(spec, sweep, cells)
    # submit_sweep owns the sweep directory: it writes the manifest under the lock.
    result = submit_sweep(spec, sweep, cells, dry_run=args.dry_run)
    for warning in result_warnings(result):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    submitted = result.get("submitted", 0)
    steps = [f"{PROG} status {_q(args.sweep)} --watch"] if submitted else [f"{PROG} status {_q(args.sweep)}"]
    if args.dry_run:
        steps = [f"{PROG} submit {_q(args.sweep)}"]
    payload = {"command": "submit", "sweep": args.sweep, "sweep_dir": str(spec.output_dir), **result, "next": steps}
    if args.dry_run or (args.json and not (args.wait and submitted)):
        _print_json(payload)
        return 0
    if args.json:  # --wait --json: one JSON object at the end, nothing before it
        from orchestrator.launch.submit import wait_for_sweep

        final = wait_for_sweep(sweep)
        _print_json({**payload, "status": final["counts"], "all_done": final["all_done"]})
        return 0 if final["all_done"] else 1
    print(
        f"{PROG}: submitted {submitted} of {result.get('cells', len(cells))} cells "
        f"({result.get('skipped_done', 0)} already done, {result.get('skipped_live', 0)} still live) "
        f"in {result.get('tasks', '?')} tasks; sweep directory {spec.output_dir}"
    )
    ids = result.get("array_job_ids") or ([result["batch_id"]] if result.get("batch_id") else [])
    if ids:
        print(f"  jobs: {', '.join(map(str, ids))}")
    if not (args.wait and submitted):
        _next(steps)
        return 0
    from orchestrator.launch.submit import sweep_settled
    from orchestrator.state.status import render, sweep_summary, watch

    print(f"{PROG}: waiting for the sweep to finish (Ctrl-C stops waiting, not the sweep)", flush=True)
    watch(sweep, 3.0, args.sweep, stop_when=lambda summary: sweep_settled(sweep, summary))
    summary = sweep_summary(sweep)
    render(summary, sweep.path, args.sweep)
    return 0 if summary["all_done"] else 1


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from aullm.model.tiny import build_tiny_llm

    path = build_tiny_llm(args.out, seed=args.seed)
    if args.json:
        _print_json({"command": "model tiny", "path": str(path)})
    else:
        print(path)
    return 0


def _delegate(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    """`module.attr(args)`, imported when the command runs: `status` must not pay for `collect`'s imports."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), attr)(args) or 0)

    return run


def _watch_either_side(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`status [SWEEP] [--watch [SECONDS]]` in either order: `status --watch sweeps/x.yaml`
    hands the sweep to --watch's optional value, which is given back to SWEEP here."""
    watch = getattr(args, "watch", None)
    if args.command != "status" or watch is None:
        return
    try:
        args.watch = _seconds(watch)
    except argparse.ArgumentTypeError as exc:
        if args.sweep is not None or _looks_like_number(watch):
            parser.error(f"argument --watch: {exc}")
        args.sweep, args.watch = watch, 5.0


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_data_synth(args: argparse.Namespace) -> int:
    from aullm.data.synth import write_synthetic

    path = write_synthetic(
        args.layout, args.out, subjects=args.subjects, seed=args.seed, clips_per_subject=args.clips_per_subject
    )
    if args.json:
        _print_json({"command": "data synth", "layout": args.layout, "path": str(path)})
    else:
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


# Each command's help ends with these (`aullm-grid CMD --help`).
EXAMPLES = {
    "validate": ["aullm-grid validate sweeps/demo.yaml", "aullm-grid validate sweeps/full.yaml --json"],
    "submit": ["aullm-grid submit sweeps/full.yaml --dry-run",
               "aullm-grid submit sweeps/demo.yaml --wait --set training.epochs=5 --set 'sweep.lr=[1e-4,3e-4]'",
               "aullm-grid submit runs/demo/sweep   # the sweep directory works too"],
    "status": ["aullm-grid status", "aullm-grid status sweeps/demo.yaml --watch",
               "aullm-grid status --watch 30 runs/demo/sweep --json"],
    "logs": ["aullm-grid logs sweeps/demo.yaml CELL_ID", "aullm-grid logs sweeps/demo.yaml CELL_ID --all"],
    "collect": ["aullm-grid collect sweeps/demo.yaml", "aullm-grid collect runs/demo/sweep --out tables/ --no-mlflow"],
    "retry": ["aullm-grid retry sweeps/demo.yaml --failed", "aullm-grid retry sweeps/demo.yaml --cells CELL_ID --force",
              "aullm-grid retry sweeps/demo.yaml --dry-run --json"],
    "cancel": ["aullm-grid cancel sweeps/demo.yaml --dry-run", "aullm-grid cancel sweeps/demo.yaml --yes"],
    "data synth": ["aullm-grid data synth --layout casme2 --out runs/demo/data/casme2 --subjects 4",
                   "aullm-grid data synth --layout samm --out /tmp/samm --json"],
    "model tiny": ["aullm-grid model tiny --out runs/demo/models/tiny-qwen2"],
}  # fmt: skip


def _examples(command: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run the AU-LLM paper grid (datasets x folds x LLMs x variants x seeds) as Slurm arrays or locally.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every command has --help and --json. SWEEP is a sweep file or its sweep directory. "
        "Bad input exits with 2 and one line on stderr.\n\n"
        "examples:\n  aullm-grid submit sweeps/demo.yaml --wait\n  aullm-grid status\n  aullm-grid collect sweeps/demo.yaml",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sweep_help = "sweep file (YAML, e.g. sweeps/demo.yaml) or its sweep directory"
    json_help = "print one JSON object (schema: docs/cli.md) instead of text"

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=_examples(name), formatter_class=argparse.RawDescriptionHelpFormatter,
                              **kwargs)  # fmt: skip

    p = command("validate", help="check a sweep file, its datasets and models; count its cells",
                description="Check a sweep file and every path it uses (dataset sheets, model folders, folds); "
                "print the cell count. Writes nothing.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--json", action="store_true", help=json_help)
    _add_set(p)
    p.set_defaults(func=cmd_validate)

    p = command("submit", help="submit every cell not yet done (returns at once)",
                description="Validate the sweep, write its manifest and submit the cells that are not done, "
                "packed into array tasks. Nothing is written or submitted if validation fails.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--dry-run", action="store_true", help="print the plan (cells, tasks, arrays) as JSON; write nothing")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--wait", action="store_true",
                   help="show live progress until every submitted cell has finished or failed, then the status")
    _add_set(p)
    p.set_defaults(func=cmd_submit)

    p = command("status", help="where every cell stands (one batched scheduler query)",
                description="Join the sweep's result files with one batched sacct query and print, per group, "
                "the cells done, running (with the slowest one's epoch), pending and failed, and an ETA. "
                "Without SWEEP: every sweep submitted from ./sweeps/*.yaml, each once.")
    p.add_argument("sweep", metavar="SWEEP", nargs="?", help=sweep_help)
    p.add_argument("--json", action="store_true",
                   help="print per-cell states (cell_states), per-group counts and the ETA as JSON")
    p.add_argument("--watch", nargs="?", const="5", metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until no cell is pending or running; before or after SWEEP")
    p.set_defaults(func=_delegate("orchestrator.state.status", "status_main"))

    p = command("logs", help="print a cell's task log (its last lines)",
                description="Print the log of the task that ran (or runs) a cell: its last lines, or all of it.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("cell", metavar="CELL", help="cell id (see `aullm-grid status SWEEP --json`)")
    p.add_argument("--lines", "-n", type=_positive_int, default=40, metavar="N", help="last N lines (default 40)")
    p.add_argument("--all", action="store_true", help="the whole log")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_delegate("orchestrator.state.status", "logs_main"))

    p = command("collect", help="pool fold predictions into the paper's tables, plots and MLflow summaries",
                description="Score every complete group (pooled LOSO predictions, per seed) and write tables "
                "and plots; can be re-run at any time from the sweep directory.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--out", metavar="DIR", help="where tables and plots go (default: inside the sweep directory)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log summary runs to MLflow")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    _add_set(p)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_delegate("orchestrator.results.collect", "collect_main"))

    p = command("retry", help="resubmit failed (or named) cells",
                description="Resubmit cells that failed, timed out or were cancelled, or the cells named. "
                "Done cells are not run again unless --force: then their result is moved to superseded/ "
                "and the cell runs as a new attempt.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--failed", action="store_true", help="only cells whose result says failed")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cell ids")
    p.add_argument("--force", action="store_true", help="run named cells again even when done (a new attempt)")
    p.add_argument("--dry-run", action="store_true", help="print what would be resubmitted; submit nothing")
    _add_set(p)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_delegate("orchestrator.launch.submit", "retry_main"))

    p = command("cancel", help="cancel the sweep's pending and running jobs",
                description="Cancel every live job of the sweep (scancel / stop the local supervisor). "
                "Finished results stay. On a terminal it asks first.")
    p.add_argument("sweep", metavar="SWEEP", help=sweep_help)
    p.add_argument("--dry-run", action="store_true", help="list what would be cancelled; cancel nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_delegate("orchestrator.launch.submit", "cancel_main"))

    p = sub.add_parser("data", help="dataset utilities", description="Dataset utilities.")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser("synth", help="write a synthetic dataset in an official on-disk layout",
                            description="Write a synthetic dataset (coding sheet + frame folders) in the layout of "
                            "CASME II, SAMM or 4DME, with learnable AU-localised motion.",
                            epilog=_examples("data synth"), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--layout", required=True, choices=("casme2", "samm", "4dme"), help="which dataset's layout")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset root to create")
    s.add_argument("--subjects", type=_positive_int, metavar="N", help="number of subjects (default: the generator's)")
    s.add_argument("--clips-per-subject", type=_positive_int, metavar="K",
                   help="clips per subject (default: scaled from the real dataset)")
    s.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="random seed (default 0)")
    s.add_argument("--json", action="store_true", help=json_help)
    s.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("model", help="model utilities", description="Model utilities.")
    model_sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    m = model_sub.add_parser("tiny", help="save a tiny random Qwen2 (tests, the demo)",
                             description="Build a tiny Qwen2 from a config with random weights and save it with its "
                             "tokenizer, loadable by from_pretrained like a real checkpoint.",
                             epilog=_examples("model tiny"), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--out", required=True, metavar="DIR", help="folder to write (idempotent)")
    m.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="weights seed (default 0)")
    m.add_argument("--json", action="store_true", help=json_help)
    m.set_defaults(func=cmd_model_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `aullm-grid`; returns the exit code (argparse errors raise SystemExit(2))."""
    from aullm.errors import UserInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    _watch_either_side(parser, args)
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
