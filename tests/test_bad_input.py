"""Bad sweep input: exit 2, one line naming the field or path, nothing written.

Each case starts from a valid sweep (real synthetic datasets, a model folder) and breaks
one thing. Cases run in-process through `orchestrator.cli.main` (fast); a few also run
as a subprocess, the way a user meets them.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import cli
from orchestrator.sweep import profiles

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aullm.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("bad-input-assets")
    write_synthetic("casme2", root / "casme2", subjects=2, seed=0, clips_per_subject=1)
    write_synthetic("samm", root / "samm", subjects=2, seed=0, clips_per_subject=1)
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (root / "no-config-model").mkdir()
    (root / "a-file").write_text("not a folder")
    (root / "empty-dataset").mkdir()
    (root / "profiles").mkdir()
    (root / "profiles" / "broken.yaml").write_text("partition: gpu\ncpus_per_task: 0\n")
    return {
        "root": root,
        "casme2": root / "casme2",
        "samm": root / "samm",
        "model": model,
    }


def base(assets: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "bad-input",
        "output_dir": "out",
        "datasets": {"casme2": {"root": str(assets["casme2"])}, "samm": {"root": str(assets["samm"])}},
        "llms": {"tiny": {"path": str(assets["model"])}},
        "seeds": [1],
        "grid": [
            {"protocol": "loso", "datasets": ["casme2", "samm"], "variants": ["all", "no_llm"]},
            {"protocol": "cross_domain", "pairs": [{"train": "casme2", "test": "samm"}], "variants": ["all"]},
        ],
        "training": {"epochs": 3, "lr": 0.001},
        "resources": {"executor": "local", "cells_per_task": 2},
    }


Mutation = Callable[[dict[str, Any], dict[str, Path]], "dict[str, Any] | str"]


def setting(dotted: str, value: Any) -> Mutation:
    def mutate(spec: dict[str, Any], _assets: dict[str, Path]) -> dict[str, Any]:
        *parents, last = dotted.split(".")
        node: Any = spec
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return spec

    return mutate


def removing(dotted: str) -> Mutation:
    def mutate(spec: dict[str, Any], _assets: dict[str, Path]) -> dict[str, Any]:
        *parents, last = dotted.split(".")
        node: Any = spec
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
        return spec

    return mutate


def text(content: str) -> Mutation:
    return lambda _spec, _assets: content


def with_asset(dotted: str, asset: str) -> Mutation:
    return lambda spec, assets: setting(dotted, str(assets["root"] / asset))(spec, assets)


def appended_text(extra: str) -> Mutation:
    return lambda spec, _assets: yaml.safe_dump(spec, sort_keys=False) + extra


# (case id, mutation, substrings the one error line must contain)
CASES: list[tuple[str, Mutation, tuple[str, ...]]] = [
    # --- the file itself
    ("yaml-syntax", text("name: [unclosed\noutput_dir: out\n"), ("invalid YAML", "line 2")),
    ("yaml-bad-indent", text("name: x\n  output_dir: out\n"), ("invalid YAML", "line 2")),
    ("yaml-two-documents", text("name: a\n---\nname: b\n"), ("invalid YAML",)),
    ("empty-file", text(""), ("empty",)),
    ("only-comments", text("# nothing here\n"), ("empty",)),
    ("top-level-list", text("- name: x\n"), ("expected a mapping", "a list")),
    ("duplicate-top-key", appended_text("llms:\n  other: {path: x}\n"), ("field 'llms'", "appears twice")),
    ("duplicate-llm-name", text("llms:\n  tiny: {path: a}\n  tiny: {path: b}\n"), ("field 'llms.tiny'", "lines 2 and 3")),
    # --- unknown keys at every level
    ("unknown-top-key", setting("epochs", 3), ("field 'epochs'", "unknown key")),
    ("unknown-training-key", setting("training.epoch", 3), ("field 'training.epoch'", "did you mean 'epochs'")),
    ("unknown-resources-key", setting("resources.partion", "gpu"), ("field 'resources.partion'", "partition")),
    ("unknown-dataset-key", setting("datasets.casme2.rooot", "x"), ("field 'datasets.casme2.rooot'",)),
    ("unknown-llm-key", setting("llms.tiny.revision", "main"), ("field 'llms.tiny.revision'",)),
    ("unknown-grid-key", setting("grid.0.dataset", ["casme2"]), ("field 'grid[0].dataset'", "datasets")),
    ("unknown-pair-key", setting("grid.1.pairs.0.source", "casme2"), ("field 'grid[1].pairs[0].source'",)),
    ("unknown-tracking-key", setting("tracking.url", "http://x"), ("field 'tracking.url'", "uri")),
    # --- wrong types
    ("epochs-not-a-number", setting("training.epochs", "ten"), ("field 'training.epochs'", "'ten'")),
    ("epochs-float", setting("training.epochs", 3.5), ("field 'training.epochs'", "whole number")),
    ("datasets-as-list", setting("datasets", ["casme2"]), ("field 'datasets'", "mapping")),
    ("seeds-as-text", setting("seeds", "1,2"), ("field 'seeds'", "list")),
    ("variants-as-text", setting("grid.0.variants", "all"), ("field 'grid[0].variants'", "list")),
    ("offline-not-bool", setting("llms.tiny.offline", "maybe"), ("field 'llms.tiny.offline'", "true or false")),
    ("name-as-number", setting("name", 7), ("field 'name'", "text")),
    ("missing-name", removing("name"), ("field 'name'", "required")),
    ("missing-grid", removing("grid"), ("field 'grid'", "required")),
    ("empty-grid", setting("grid", []), ("field 'grid'", "empty")),
    ("bad-name", setting("name", "My Sweep"), ("field 'name'", "'My Sweep'")),
    # --- unknown names
    ("unknown-layout-name", setting("datasets.casme3", {"root": "x"}), ("field 'datasets.casme3.layout'",)),
    ("unknown-layout-value", setting("datasets.casme2.layout", "casme9"), ("datasets.casme2.layout", "casme2, samm, 4dme")),
    ("unknown-variant", setting("grid.0.variants", ["all", "f_low"]), ("field 'grid[0].variants[1]'", "'f_low'", "no_llm")),
    ("unknown-executor", setting("resources.executor", "slrum"), ("field 'resources.executor'", "slurm, local, debug")),
    ("unknown-protocol", setting("grid.0.protocol", "kfold"), ("field 'grid[0].protocol'", "loso, cross_domain")),
    ("unknown-precision", setting("training.precision", "fp8"), ("field 'training.precision'", "auto, bf16, fp16_llm, fp32")),
    ("unknown-recipe", setting("training.recipe", "released"), ("field 'training.recipe'", "paper, script")),
    ("unknown-efp-activation", setting("training.efp_activation", "swish"), ("field 'training.efp_activation'", "tanh")),
    ("unknown-loss-reduction", setting("training.loss_reduction", "avg"), ("field 'training.loss_reduction'", "mean, sum")),
    ("unknown-token-position", setting("training.token_position", "middle"), ("training.token_position", "prepend")),
    ("grid-unknown-dataset", setting("grid.0.datasets", ["casme2", "smic"]), ("field 'grid[0].datasets[1]'", "'smic'")),
    ("grid-unknown-llm", setting("grid.0.llms", ["qwen9"]), ("field 'grid[0].llms[0]'", "'qwen9'")),
    ("cross-domain-undefined", setting("grid.1.pairs.0.test", "4dme"), ("field 'grid[1].pairs[0].test'", "'4dme'")),
    ("cross-domain-same", setting("grid.1.pairs.0.test", "casme2"), ("field 'grid[1].pairs[0]'", "both")),
    ("loso-with-pairs", setting("grid.0.pairs", [{"train": "casme2", "test": "samm"}]), ("field 'grid[0].pairs'",)),
    ("cross-domain-with-datasets", setting("grid.1.datasets", ["casme2"]), ("field 'grid[1].datasets'",)),
    ("llm-variant-without-llms", setting("llms", {}), ("field 'grid[0].llms'", "needs an LLM")),
    ("reserved-llm-name", setting("llms.none", {"path": "x"}), ("field 'llms.none'", "reserved")),
    ("bad-llm-name", setting("llms.Qwen__X", {"path": "x"}), ("field 'llms.Qwen__X'", "not a valid name")),
    ("unknown-profile", setting("resources.profile", "h1000"), ("field 'resources.profile'", "'h1000'", "h100")),
    ("broken-profile", with_asset("resources.profile", "profiles/broken.yaml"), ("broken.yaml", "field 'cpus_per_task'")),
    ("unknown-deepspeed", setting("training.deepspeed", "zero9"), ("field 'training.deepspeed'", "'zero9'")),
    ("bad-tracking-uri", setting("tracking.uri", "ftp://host"), ("field 'tracking.uri'", "ftp://host")),
    ("unset-env-var", setting("output_dir", "${AULLM_TEST_SURELY_UNSET}/out"), ("field 'output_dir'", "AULLM_TEST_SURELY_UNSET")),
    # --- impossible values
    ("negative-epochs", setting("training.epochs", -5), ("field 'training.epochs'", "-5", "> 0")),
    ("zero-epochs", setting("training.epochs", 0), ("field 'training.epochs'", "> 0")),
    ("negative-lr", setting("training.lr", -0.1), ("field 'training.lr'",)),
    ("dropout-one", setting("training.dropout", 1.0), ("field 'training.dropout'", "< 1")),
    ("zero-batch", setting("training.batch_size", 0), ("field 'training.batch_size'",)),
    ("too-many-cpus", setting("resources.cpus_per_task", 2000), ("field 'resources.cpus_per_task'", "1024")),
    ("zero-time", setting("resources.time", 0), ("field 'resources.time'", "positive")),
    ("negative-time", setting("resources.time", "-01:00:00"), ("field 'resources.time'",)),
    ("time-with-units", setting("resources.time", "4h"), ("field 'resources.time'", "HH:MM:SS")),
    ("zero-cells-per-task", setting("resources.cells_per_task", 0), ("field 'resources.cells_per_task'", ">= 1")),
    ("zero-array-parallelism", setting("resources.array_parallelism", 0), ("field 'resources.array_parallelism'",)),
    ("zero-concurrent-cells", setting("resources.concurrent_cells", 0),
     ("field 'resources.concurrent_cells'", "0 is out of range", "1..64 or auto")),
    ("too-many-concurrent-cells", setting("resources.concurrent_cells", 65),
     ("field 'resources.concurrent_cells'", "65 is out of range", "1..64 or auto")),
    ("concurrent-cells-text", setting("resources.concurrent_cells", "many"),
     ("field 'resources.concurrent_cells'", "'many'", "1..64 or auto")),
    ("concurrent-cells-fraction", setting("resources.concurrent_cells", 2.5),
     ("field 'resources.concurrent_cells'", "2.5", "1..64 or auto")),
    ("concurrent-cells-bool", setting("resources.concurrent_cells", True),
     ("field 'resources.concurrent_cells'", "true is not", "1..64 or auto")),
    ("concurrent-cells-with-processes", setting("resources", {"concurrent_cells": 2, "processes_per_task": 2}),
     ("field 'resources'", "concurrent_cells 2 with processes_per_task 2", "set one of them to 1")),
    ("concurrent-cells-with-deepspeed",
     lambda spec, a: setting("training.deepspeed", "zero2")(setting("resources.concurrent_cells", 3)(spec, a), a),
     ("resources.concurrent_cells 3 does not combine with training.deepspeed", "set concurrent_cells: 1")),
    ("unparsable-mem", setting("resources.mem", "lots"), ("field 'resources.mem'", "'lots'")),
    ("bad-gres", setting("resources.gres", "gpu h100"), ("field 'resources.gres'",)),
    ("signal-after-limit", setting("resources", {"time": 1, "signal_delay_s": 90}), ("field 'resources'", "signal_delay_s")),
    ("bad-sbatch-option", setting("resources.extra_sbatch", {"--constraint": "h100"}), ("field 'resources.extra_sbatch'",)),
    ("duplicate-seeds", setting("seeds", [1, 2, 1]), ("field 'seeds'", "listed twice")),
    ("duplicate-block-llms", setting("grid.0.llms", ["tiny", "tiny"]), ("field 'grid[0].llms'", "listed twice")),
    ("duplicate-variants", setting("grid.0.variants", ["all", "all"]), ("field 'grid[0].variants'", "listed twice")),
    ("negative-seed", setting("seeds", [-1]), ("field 'seeds[0]'", ">= 0")),
    # --- the filesystem
    ("missing-root", setting("datasets.casme2.root", "/nonexistent/casme2"), ("field 'datasets.casme2.root'", "/nonexistent/casme2", "does not exist")),
    ("root-is-a-file", with_asset("datasets.casme2.root", "a-file"), ("field 'datasets.casme2.root'", "not a folder")),
    ("root-without-sheet", with_asset("datasets.samm.root", "empty-dataset"), ("field 'datasets.samm'", "coding sheet")),
    ("missing-sheet-name", setting("datasets.casme2.sheet", "nope.xlsx"), ("field 'datasets.casme2'", "nope.xlsx")),
    ("missing-model", setting("llms.tiny.path", "/nonexistent/model"), ("field 'llms.tiny.path'", "/nonexistent/model")),
    ("model-without-config", with_asset("llms.tiny.path", "no-config-model"), ("field 'llms.tiny.path'", "config.json")),
    ("absent-fold", setting("datasets.casme2.folds", ["sub01", "sub77"]), ("field 'datasets.casme2.folds[1]'", "'sub77'", "sub01")),
    ("output-dir-is-a-file", with_asset("output_dir", "a-file"), ("field 'output_dir'", "not a folder")),
    # --- settings axes (`sweep:`) and per-block `training:`
    ("axis-unknown-field", setting("sweep", {"lrr": [1e-4]}), ("field 'sweep.lrr'", "did you mean 'lr'", "line ")),
    ("axis-unknown-block-field", setting("grid.0.sweep", {"lora_rank": [8]}), ("field 'grid[0].sweep.lora_rank'", "'lora_r'")),
    ("axis-seeds-not-a-field", setting("sweep", {"seeds": [1, 2]}), ("field 'sweep.seeds'", "not a training field")),
    ("block-training-unknown", setting("grid.0.training", {"epoch": 3}), ("field 'grid[0].training.epoch'", "did you mean 'epochs'")),
    ("block-training-bad-value", setting("grid.0.training", {"epochs": 0}), ("field 'grid[0].training.epochs'", "> 0")),
    ("axis-wrong-type", setting("sweep", {"lr": [1e-4, "fast"]}), ("field 'sweep.lr[1]'", "'fast'", "number")),
    ("axis-not-whole", setting("sweep", {"lora_r": [8, 2.5]}), ("field 'sweep.lora_r[1]'", "whole number")),
    ("axis-empty-list", setting("sweep", {"lr": []}), ("field 'sweep.lr'", "at least one value")),
    ("axis-duplicate", setting("sweep", {"lora_r": [8, 16, 8]}), ("field 'sweep.lora_r[2]'", "listed twice")),
    ("axis-duplicate-spelling", setting("sweep", {"lr": [0.0001, "1e-4"]}), ("field 'sweep.lr[1]'", "listed twice")),
    ("axis-mapping-value", setting("sweep", {"lr": {"low": 1e-4}}), ("field 'sweep.lr'", "mapping")),
    ("axis-not-a-mapping", setting("sweep", [1e-4, 3e-4]), ("field 'sweep'", "mapping")),
    ("axis-bad-choice", setting("sweep", {"precision": ["fp32", "fp8"]}), ("field 'sweep.precision[1]'", "'fp8'", "auto, bf16")),
    ("axis-out-of-range", setting("sweep", {"dropout": [0.1, 1.5]}), ("field 'sweep.dropout[1]'", "< 1")),
    ("axis-unknown-deepspeed", setting("sweep", {"deepspeed": [None, "zero9"]}), ("field 'sweep.deepspeed[1]'", "'zero9'")),
    ("axis-conflicts-with-block-training",
     lambda spec, a: setting("grid.0.training", {"lr": 0.01})(setting("sweep", {"lr": [1e-4, 1e-3]})(spec, a), a),
     ("field 'grid[0].training.lr'", "conflicts with the axis sweep.lr")),
    ("axis-swept-twice",
     lambda spec, a: setting("grid.0.sweep", {"lr": [0.1]})(setting("sweep", {"lr": [1e-4, 1e-3]})(spec, a), a),
     ("field 'grid[0].sweep.lr'", "top level too")),
]

# `--set FIELD=VALUE` on top of the valid base sweep: (case id, overrides, expected substrings)
SET_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("set-unknown-axis-field", ["sweep.lrr=[1e-4]"], ("field 'sweep.lrr'", "did you mean 'lr'", "--set sweep.lrr")),
    ("set-unknown-training-field", ["training.epoch=5"], ("field 'training.epoch'", "'epochs'", "--set")),
    ("set-wrong-type", ["training.epochs=many"], ("field 'training.epochs'", "'many'", "--set training.epochs=many")),
    ("set-axis-wrong-type", ["sweep.lr=[1e-4,high]"], ("field 'sweep.lr[1]'", "'high'", "--set")),
    ("set-empty-list", ["sweep.lr=[]"], ("field 'sweep.lr'", "at least one value", "--set")),
    ("set-duplicate-values", ["sweep.lr=[1e-4,0.0001]"], ("field 'sweep.lr[1]'", "listed twice")),
    ("set-conflict", ["training.epochs=5", "training.epochs=7"], ("conflicts with --set 'training.epochs=5'",)),
    ("set-conflict-parent", ["training={epochs: 5}", "training.lr=0.1"], ("conflicts", "'training'")),
    ("set-conflicts-with-block", ["grid.0.training.lr=0.1", "sweep.lr=[1e-4,1e-3]"], ("grid[0].training.lr", "conflicts with the axis")),
    ("set-no-equals", ["training.epochs"], ("FIELD=VALUE",)),
    ("set-bad-yaml", ["sweep.lr=[1e-4"], ("not valid YAML",)),
    ("set-into-scalar", ["name.x=1"], ("'name' is text", "no field 'x'")),
    ("set-bad-index", ["grid.5.variants=[all]"], ("'grid' has no item 5",)),
]


def _write_case(tmp_path: Path, assets: dict[str, Path], mutate: Mutation) -> tuple[Path, Path]:
    content = mutate(copy.deepcopy(base(assets)), assets)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return sweep, tmp_path / "out"


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's exits
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_base_sweep_is_valid(tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sweep, out = _write_case(tmp_path, assets, lambda spec, _assets: spec)
    code, stdout, stderr = _main(["validate", str(sweep)], capsys)
    assert code == 0, stderr
    assert "cells: 9 " in stdout  # 2 x 2 folds x (all, no_llm) + 1 cross-domain
    assert not out.exists()


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize(("case_id", "mutate", "expects"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    case_id: str,
    mutate: Mutation,
    expects: tuple[str, ...],
    command: str,
    tmp_path: Path,
    assets: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AULLM_TEST_SURELY_UNSET", raising=False)
    monkeypatch.delenv(profiles.PROFILES_ENV, raising=False)
    sweep, out = _write_case(tmp_path, assets, mutate)
    argv = ["validate", str(sweep)] if command == "validate" else ["submit", str(sweep), "--dry-run"]
    code, stdout, stderr = _main(argv, capsys)
    assert code == 2, f"{case_id}: exit {code}; stdout {stdout!r}; stderr {stderr!r}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in stderr
    assert line.startswith("aullm-grid: error: ")
    assert str(sweep) in line or "broken.yaml" in line  # names the file at fault
    for expected in expects:
        assert expected in line, f"{case_id}: {expected!r} not in {line!r}"
    assert stdout == ""
    assert not out.exists(), f"{case_id}: the sweep directory was created"


def test_missing_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = _main(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and stderr.strip().endswith("nope.yaml: no such sweep file")
    code, _, stderr = _main(["validate", str(tmp_path)], capsys)
    assert code == 2 and "not a sweep directory (no manifest.json)" in stderr  # a folder must be a submitted sweep


def test_binary_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    code, _, stderr = _main(["validate", str(path)], capsys)
    assert code == 2 and "UTF-8" in stderr and len(stderr.strip().splitlines()) == 1


SUBPROCESS_CASES = ["yaml-syntax", "unknown-executor", "absent-fold"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_as_a_subprocess(case_id: str, tmp_path: Path, assets: dict[str, Path]) -> None:
    _, mutate, expects = next(c for c in CASES if c[0] == case_id)
    sweep, out = _write_case(tmp_path, assets, mutate)
    env = {k: v for k, v in os.environ.items() if k != profiles.PROFILES_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(sweep), "--dry-run"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert all(e in lines[0] for e in expects), lines[0]
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("command", ["validate", "submit"])
@pytest.mark.parametrize(("case_id", "overrides", "expects"), SET_CASES, ids=[c[0] for c in SET_CASES])
def test_bad_override(
    case_id: str,
    overrides: list[str],
    expects: tuple[str, ...],
    command: str,
    tmp_path: Path,
    assets: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep, out = _write_case(tmp_path, assets, lambda spec, _assets: spec)
    argv = ["validate", str(sweep)] if command == "validate" else ["submit", str(sweep), "--dry-run"]
    for text in overrides:
        argv += ["--set", text]
    code, stdout, stderr = _main(argv, capsys)
    assert code == 2, f"{case_id}: exit {code}; stdout {stdout!r}; stderr {stderr!r}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, lines
    assert lines[0].startswith("aullm-grid: error: ") and str(sweep) in lines[0]
    for expected in expects:
        assert expected in lines[0], f"{case_id}: {expected!r} not in {lines[0]!r}"
    assert stdout == ""
    assert not out.exists(), f"{case_id}: the sweep directory was created"
