"""The sweep schema: defaults, path handling, env expansion, profiles, value parsing."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from aullm.constants import PAPER_PROMPT
from aullm.errors import UserInputError
from orchestrator.sweep import profiles
from orchestrator.sweep.spec import (
    ResourcesSpec,
    SweepSpec,
    TrainingSpec,
    load_sweep,
    parse_mem_mb,
    parse_minutes,
)

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "sweeps"


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def minimal(**over: object) -> dict:
    spec = {
        "name": "t",
        "output_dir": "out",
        "datasets": {"casme2": {"root": "data/casme2"}},
        "llms": {"tiny": {"path": "models/tiny"}},
        "grid": [{"datasets": ["casme2"], "variants": ["all"]}],
    }
    spec.update(over)
    return spec


@pytest.fixture
def h100_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """full.yaml names profile h100; use the shipped one, or a stand-in while it is absent."""
    if profiles.find_profile("h100", SWEEPS / "full.yaml") is None:
        write(tmp_path / "profiles" / "h100.yaml", {"partition": "gpu", "gres": "gpu:h100:1", "time": "04:00:00"})
        monkeypatch.setenv(profiles.PROFILES_ENV, str(tmp_path / "profiles"))


def test_demo_sweep_loads_with_paths_anchored_at_the_sweep_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    spec = load_sweep(SWEEPS / "demo.yaml")
    assert spec.output_dir == REPO / "runs" / "demo"
    assert spec.datasets["casme2"].root == REPO / "runs" / "demo" / "data" / "casme2"
    assert spec.datasets["samm"].layout == "samm"
    assert spec.llms["tiny-qwen2"].path == str(REPO / "runs" / "demo" / "models" / "tiny-qwen2")
    assert spec.cache_dir == spec.output_dir / "cache"
    assert spec.tracking.experiment == "demo"
    assert spec.resources.executor == "local" and spec.resources.max_local_workers == 2
    assert spec.training.epochs == 20 and spec.training.lr == pytest.approx(1e-3)
    assert spec.training.prompt == PAPER_PROMPT  # untouched fields keep the paper's defaults


def test_full_sweep_has_the_paper_settings(monkeypatch: pytest.MonkeyPatch, h100_profile: None) -> None:
    monkeypatch.setenv("AULLM_DATA", "/data/me")
    monkeypatch.setenv("AULLM_MODELS", "/models")
    monkeypatch.delenv("AULLM_RUNS", raising=False)
    spec = load_sweep(SWEEPS / "full.yaml")
    assert spec.datasets["casme2"].root == Path("/data/me/CASME2")
    assert spec.llms["qwen2.5-1.5b"].path == "/models/Qwen2.5-1.5B"
    assert list(spec.llms) == ["qwen2-1.5b", "qwen2.5-1.5b", "deepseek-r1-distill-qwen-1.5b"]
    assert spec.output_dir == REPO / "runs" / "au-llm-paper"  # ${AULLM_RUNS:-../runs}
    t = spec.training
    assert (t.epochs, t.lr, t.weight_decay, t.batch_size, t.dropout) == (350, 3e-5, 0.005, 256, 0.3)
    assert spec.seeds == [1]
    assert spec.resources.executor == "slurm" and spec.resources.cells_per_task == 8
    assert spec.resources.profile == "h100"


def test_unset_env_var_is_named(monkeypatch: pytest.MonkeyPatch, h100_profile: None) -> None:
    monkeypatch.delenv("AULLM_DATA", raising=False)
    monkeypatch.setenv("AULLM_MODELS", "/models")
    with pytest.raises(UserInputError, match=r"datasets\.casme2\.root.*AULLM_DATA is not set"):
        load_sweep(SWEEPS / "full.yaml")


def test_env_default_is_used_only_when_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = write(tmp_path / "s.yaml", minimal(output_dir="${OUT_X:-fallback}/o"))
    monkeypatch.delenv("OUT_X", raising=False)
    assert load_sweep(f).output_dir == tmp_path / "fallback" / "o"
    monkeypatch.setenv("OUT_X", "/abs")
    assert load_sweep(f).output_dir == Path("/abs/o")


def test_profile_fills_resources_and_the_sweep_overrides_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "p" / "gpu.yaml", {"partition": "gpu", "time": "02:00:00", "cells_per_task": 4, "mem": "64G"})
    monkeypatch.setenv(profiles.PROFILES_ENV, str(tmp_path / "p"))
    f = write(tmp_path / "s.yaml", minimal(resources={"executor": "slurm", "profile": "gpu", "cells_per_task": 16}))
    res = load_sweep(f).resources
    assert res.partition == "gpu"
    assert res.time == 120
    assert res.mem == 64 * 1024
    assert res.cells_per_task == 16  # the sweep's own field wins


def test_profile_given_as_a_path(tmp_path: Path) -> None:
    write(tmp_path / "site" / "a100.yaml", {"partition": "a100", "gpus_per_node": 1})
    f = write(tmp_path / "s.yaml", minimal(resources={"profile": "site/a100.yaml"}))
    assert load_sweep(f).resources.partition == "a100"


def test_bad_profile_content_names_the_profile_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write(tmp_path / "p" / "gpu.yaml", {"partition": "gpu", "time": "-5"})
    monkeypatch.setenv(profiles.PROFILES_ENV, str(tmp_path / "p"))
    f = write(tmp_path / "s.yaml", minimal(resources={"profile": "gpu"}))
    with pytest.raises(UserInputError, match=r"gpu\.yaml: field 'time'"):
        load_sweep(f)


@pytest.mark.parametrize(
    ("value", "minutes"),
    [(90, 90), ("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440), ("00:00:30", 1), ("2-03:04:05", 2 * 1440 + 184 + 1)],
)
def test_time_limits(value: object, minutes: int) -> None:
    assert parse_minutes(value) == minutes


@pytest.mark.parametrize("value", [0, -1, "0", "4h", "1:2", "01:61:00", True, 3.5, "00:00:00"])
def test_bad_time_limits(value: object) -> None:
    with pytest.raises(ValueError):
        parse_minutes(value)


@pytest.mark.parametrize(
    ("value", "mb"), [("64G", 65536), ("500M", 500), ("2T", 2 * 1024 * 1024), ("1.5GB", 1536), (2048, 2048), ("0", 0)]
)
def test_memory_sizes(value: object, mb: int) -> None:
    assert parse_mem_mb(value) == mb


def test_hub_id_is_kept_and_local_paths_are_anchored(tmp_path: Path) -> None:
    f = write(tmp_path / "s.yaml", minimal(llms={"a": {"path": "Qwen/Qwen2-1.5B"}, "b": {"path": "./models/x"}}))
    spec = load_sweep(f)
    assert spec.llms["a"].path == "Qwen/Qwen2-1.5B" and spec.llms["a"].is_hub_id
    assert spec.llms["b"].path == str(tmp_path / "models" / "x") and not spec.llms["b"].is_hub_id


def test_snapshot_round_trips(tmp_path: Path) -> None:
    f = write(tmp_path / "s.yaml", minimal(resources={"time": "01:00:00", "mem": "8G"}, seeds=[3, 1]))
    spec = load_sweep(f)
    again = SweepSpec.from_snapshot(spec.snapshot())
    assert again.snapshot() == spec.snapshot()
    assert again.resources.time == 60 and again.seeds == [3, 1]


def test_user_labelled_dataset_needs_a_layout(tmp_path: Path) -> None:
    ok = minimal(
        datasets={"casme2-cropped": {"layout": "casme2", "root": "d"}},
        grid=[{"datasets": ["casme2-cropped"], "variants": ["all"]}],
    )
    assert load_sweep(write(tmp_path / "ok.yaml", ok)).datasets["casme2-cropped"].layout == "casme2"
    del ok["datasets"]["casme2-cropped"]["layout"]
    with pytest.raises(UserInputError, match=r"datasets\.casme2-cropped\.layout"):
        load_sweep(write(tmp_path / "bad.yaml", ok))


def test_deepspeed_names_resolve_to_the_shipped_configs(tmp_path: Path) -> None:
    shipped = sorted((REPO / "jobs" / "configs").glob("*.json"))
    if not shipped:
        pytest.skip("no shipped DeepSpeed config yet")
    f = write(tmp_path / "s.yaml", minimal(training={"deepspeed": shipped[0].stem}))
    assert load_sweep(f).training.deepspeed == str(shipped[0])


def test_training_block_mirrors_trainconfig() -> None:
    """Same field names and defaults as aullm.train.TrainConfig (read from its source:
    importing it would load torch)."""
    tree = ast.parse((REPO / "aullm" / "train.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    fields: dict[str, object] = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            value = node.value
            if isinstance(value, ast.Call):  # field(default=..., metadata=...)
                value = next(k.value for k in value.keywords if k.arg == "default")
            fields[node.target.id] = (
                PAPER_PROMPT if isinstance(value, ast.Name) and value.id == "PAPER_PROMPT" else ast.literal_eval(value)
            )
    defaults = TrainingSpec().model_dump()
    assert set(defaults) == set(fields)
    # both resolve the fields they leave unset from the same recipe table
    from aullm.recipes import RECIPE_FIELDS, resolve

    assert all(fields[k] is None for k in RECIPE_FIELDS)
    assert {k: defaults[k] for k in fields} == resolve(fields)
    for recipe in ("paper", "script"):
        assert TrainingSpec(recipe=recipe).model_dump() == resolve({**fields, "recipe": recipe})


def test_resources_defaults_are_usable_without_a_cluster() -> None:
    res = ResourcesSpec()
    assert res.executor == "local" and res.cells_per_task == 1 and res.time == 60
    assert res.concurrent_cells == "auto"  # the task picks K: 1 on a CPU


@pytest.mark.parametrize(("value", "stored"), [("auto", "auto"), (" auto ", "auto"), (1, 1), (8, 8), (64, 64)])
def test_concurrent_cells_takes_a_whole_number_or_auto(tmp_path: Path, value: object, stored: object) -> None:
    spec = load_sweep(write(tmp_path / "s.yaml", minimal(resources={"concurrent_cells": value})))
    assert spec.resources.concurrent_cells == stored
    assert SweepSpec.from_snapshot(spec.snapshot()).resources.concurrent_cells == stored  # the manifest keeps it


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (0, "0 is out of range"),
        (65, "65 is out of range"),
        (-1, "-1 is out of range"),
        ("many", "'many' is not"),
        ("AUTO", "'AUTO' is not"),
        ("4", "'4' is not"),  # quoted in YAML: text, not a number
        (2.5, "2.5 is not"),
        (2.0, "2.0 is not"),
        (True, "true is not"),  # YAML's true would otherwise pass as 1
        (None, "nothing (null) is not"),
        ([2], "a list is not"),
    ],
)
def test_bad_concurrent_cells_are_named_in_one_line(tmp_path: Path, value: object, says: str) -> None:
    f = write(tmp_path / "s.yaml", minimal(resources={"concurrent_cells": value}))
    with pytest.raises(UserInputError) as caught:
        load_sweep(f)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(f"{f}: field 'resources.concurrent_cells': {says}"), line
    assert "a whole number 1..64 or auto" in line, line


@pytest.mark.parametrize(
    ("concurrent", "processes", "refused"),
    [(2, 2, True), (64, 4, True), (1, 2, False), ("auto", 2, False), ("auto", 1, False), (8, 1, False)],
)
def test_only_an_explicit_k_above_one_refuses_several_processes(concurrent: object, processes: int, refused: bool) -> None:
    """auto becomes 1 in a task of several processes (jobs/run_cells.py): nothing to refuse."""
    from pydantic import ValidationError

    make = lambda: ResourcesSpec(concurrent_cells=concurrent, processes_per_task=processes, executor="local")  # noqa: E731
    if refused:
        with pytest.raises(ValidationError, match=f"concurrent_cells {concurrent} with processes_per_task {processes}"):
            make()
    else:
        assert make().concurrent_cells == concurrent


@pytest.mark.parametrize(("concurrent", "refused"), [(3, True), (1, False), ("auto", False)])
def test_only_an_explicit_k_above_one_refuses_deepspeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrent: object, refused: bool
) -> None:
    import aullm.deepspeed_config as ds_config
    from orchestrator.sweep.spec import check_deepspeed

    monkeypatch.setattr(ds_config, "probe", lambda *_a, **_k: "probed")  # DeepSpeed's own import is not the point
    spec = load_sweep(write(tmp_path / "s.yaml", minimal(training={"deepspeed": "zero2"},
                                                         resources={"concurrent_cells": concurrent})))  # fmt: skip
    if refused:
        with pytest.raises(UserInputError, match=f"concurrent_cells {concurrent} does not combine with training.deepspeed"):
            check_deepspeed(spec)
    else:
        assert check_deepspeed(spec) == "probed"


def test_profile_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(profiles.PROFILES_ENV, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    write(tmp_path / "b" / "x.yaml", {"partition": "b"})
    write(tmp_path / "a" / "x.yaml", {"partition": "a"})
    assert profiles.find_profile("x") == tmp_path / "a" / "x.yaml"
    assert "x" in profiles.available_profiles()
