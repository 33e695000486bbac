"""Expansion of sweeps into cells (counts, stable ids) and packing into tasks and arrays."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from aullm.errors import UserInputError
from orchestrator.sweep import profiles
from orchestrator.sweep.cells import Cell, expand, pack, split_arrays
from orchestrator.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parent.parent

CASME2 = [f"sub{i:02d}" for i in range(1, 27)]  # 26 subjects
SAMM = [f"{i:03d}" for i in range(6, 38)]  # 32 subjects
FOURDME_N = 41
FOURDME = [f"S{i}" for i in range(1, FOURDME_N + 1)]
SUBJECTS = {"casme2": CASME2, "samm": SAMM, "4dme": FOURDME}


@pytest.fixture
def full_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("AULLM_DATA", "/data")
    monkeypatch.setenv("AULLM_MODELS", "/models")
    if profiles.find_profile("h100", REPO / "sweeps" / "full.yaml") is None:  # stand-in until it ships
        (tmp_path / "profiles").mkdir()
        (tmp_path / "profiles" / "h100.yaml").write_text("partition: gpu\n")
        monkeypatch.setenv(profiles.PROFILES_ENV, str(tmp_path / "profiles"))
    return load_sweep(REPO / "sweeps" / "full.yaml")


def sweep_file(tmp_path: Path, grid: list[dict], **extra: object) -> Path:
    spec = {
        "name": "t",
        "output_dir": "out",
        "datasets": {"casme2": {"root": "c"}, "samm": {"root": "s"}},
        "llms": {"a": {"path": "/m/a"}, "b": {"path": "/m/b"}},
        "grid": grid,
        **extra,
    }
    path = tmp_path / f"s{random.random()}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_full_grid_cell_count(full_spec) -> None:
    cells = expand(full_spec, SUBJECTS)
    llms, variants = 3, 5
    expected = (
        26 * llms * variants  # Tables 1-3, CASME II
        + 32 * llms * variants  # Tables 1-3, SAMM
        + 2 * llms  # Table 4: casme2->samm, samm->casme2, variant all
        + FOURDME_N * llms  # 4DME LOSO, variant all
        + (26 + 32) * 1  # no-LLM baseline, LOSO: one cell per fold, not per LLM
        + 2 * 1  # no-LLM baseline, cross-domain
    )
    assert expected == 390 + 480 + 6 + 123 + 58 + 2
    assert len(cells) == expected
    by_kind = Counter(c.kind for c in cells)
    assert by_kind == {"loso": expected - 8, "cross_domain": 8}
    no_llm = [c for c in cells if c.variant == "no_llm"]
    assert len(no_llm) == 60
    assert all(c.llm is None and c.llm_path is None and "__none__no_llm__" in c.cell_id for c in no_llm)
    per_llm = 26 * variants + 32 * variants + 2 + FOURDME_N
    assert Counter(c.llm for c in cells if c.llm) == {
        "qwen2-1.5b": per_llm,
        "qwen2.5-1.5b": per_llm,
        "deepseek-r1-distill-qwen-1.5b": per_llm,
    }


def test_ids_are_stable_unique_and_readable(full_spec) -> None:
    first = expand(full_spec, SUBJECTS)
    shuffled = {k: random.Random(3).sample(v, len(v)) for k, v in SUBJECTS.items()}
    second = expand(full_spec, shuffled)
    assert [c.cell_id for c in first] == [c.cell_id for c in second]
    assert len({c.cell_id for c in first}) == len(first)
    ids = {c.cell_id for c in first}
    assert "casme2-loso-sub01__qwen2-1.5b__all__s1" in ids
    assert "samm-to-casme2__deepseek-r1-distill-qwen-1.5b__all__s1" in ids
    assert "samm-loso-006__none__no_llm__s1" in ids
    assert "4dme-loso-S41__qwen2.5-1.5b__all__s1" in ids
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", c.cell_id) for c in first)  # filesystem-safe


def test_block_order_does_not_change_ids(tmp_path: Path) -> None:
    blocks = [
        {"datasets": ["casme2", "samm"], "variants": ["all", "f_mid"], "llms": ["a", "b"]},
        {"protocol": "cross_domain", "pairs": [{"train": "samm", "test": "casme2"}], "variants": ["all", "no_llm"]},
        {"datasets": ["samm"], "variants": ["no_llm"], "seeds": [2, 7]},
    ]
    subjects = {"casme2": ["sub01", "sub02"], "samm": ["006", "007", "008"]}
    a = expand(load_sweep(sweep_file(tmp_path, blocks)), subjects)
    b = expand(load_sweep(sweep_file(tmp_path, list(reversed(blocks)))), subjects)
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    # 5 folds x 2 variants x 2 LLMs + cross (2 LLMs + 1 no_llm) + 3 samm folds x 2 seeds
    assert len(a) == 20 + 3 + 6


def test_overlapping_blocks_are_merged(tmp_path: Path) -> None:
    block = {"datasets": ["casme2"], "variants": ["all", "no_llm"]}
    spec = load_sweep(sweep_file(tmp_path, [block, block, {"datasets": ["casme2"], "variants": ["no_llm"]}]))
    cells = expand(spec, {"casme2": ["sub01", "sub02"]})
    assert len(cells) == 2 * 2 + 2  # (all x 2 LLMs + no_llm) per fold, duplicates once


def test_seeds_folds_and_paths(tmp_path: Path) -> None:
    spec = load_sweep(
        sweep_file(
            tmp_path,
            [{"datasets": ["casme2"], "variants": ["all"], "llms": ["b"]}],
            seeds=[1, 2, 3],
            datasets={"casme2": {"root": "c", "folds": ["sub02"]}},
        )
    )
    cells = expand(spec, {"casme2": ["sub01", "sub02", "sub03"]})
    assert [(c.fold, c.seed) for c in cells] == [("sub02", 1), ("sub02", 2), ("sub02", 3)]
    assert {c.llm_path for c in cells} == {"/m/b"}
    assert cells[0].train_dataset == cells[0].test_dataset == cells[0].dataset == "casme2"


def test_fold_subset_must_exist(tmp_path: Path) -> None:
    spec = load_sweep(
        sweep_file(tmp_path, [{"datasets": ["casme2"], "variants": ["all"]}], datasets={"casme2": {"root": "c", "folds": ["sub99"]}})
    )
    with pytest.raises(UserInputError, match=r"datasets\.casme2\.folds\[0\].*sub99"):
        expand(spec, {"casme2": ["sub01"]})


def test_subjects_that_collide_after_sanitising_are_rejected(tmp_path: Path) -> None:
    spec = load_sweep(sweep_file(tmp_path, [{"datasets": ["casme2"], "variants": ["no_llm"]}]))
    with pytest.raises(UserInputError, match="same id"):
        expand(spec, {"casme2": ["s 1", "s/1"]})


def test_cell_round_trip_and_group(full_spec) -> None:
    cells = expand(full_spec, SUBJECTS)
    for cell in cells[:: max(1, len(cells) // 50)]:
        record = cell.to_dict()
        assert record["group"] == "/".join(cell.group)
        assert Cell.from_dict(record) == cell
    cross = next(c for c in cells if c.kind == "cross_domain" and c.llm)
    assert cross.dataset == f"{cross.train_dataset}_to_{cross.test_dataset}" and cross.fold is None
    assert cross.group == (cross.dataset, cross.llm, "all")


@pytest.mark.parametrize("per_task", [1, 3, 8, 1000])
def test_pack_respects_size_and_llm(full_spec, per_task: int) -> None:
    cells = expand(full_spec, SUBJECTS)
    tasks = pack(cells, per_task)
    assert all(1 <= len(t) <= per_task for t in tasks)
    assert all(len({c.llm_path for c in t}) == 1 for t in tasks)
    assert sorted(c.cell_id for t in tasks for c in t) == sorted(c.cell_id for c in cells)
    sizes_by_llm: dict[str | None, list[int]] = {}
    for t in tasks:
        sizes_by_llm.setdefault(t[0].llm, []).append(len(t))
    for llm, sizes in sizes_by_llm.items():
        group = sum(1 for c in cells if c.llm == llm)
        assert len(sizes) == -(-group // per_task)  # as few tasks as the limit allows
        assert max(sizes) - min(sizes) <= 1  # balanced: no straggler task of 2 cells
    # deterministic whatever the input order
    shuffled = random.Random(5).sample(cells, len(cells))
    assert [[c.cell_id for c in t] for t in pack(shuffled, per_task)] == [[c.cell_id for c in t] for t in tasks]


def test_pack_counts_for_the_full_grid(full_spec) -> None:
    tasks = pack(expand(full_spec, SUBJECTS), 8)
    per_llm = 26 * 5 + 32 * 5 + 2 + FOURDME_N  # 333 cells -> ceil(333/8) = 42 tasks
    assert len(tasks) == 3 * 42 + 8  # + 60 no-LLM cells -> 8 tasks
    assert per_llm == 333


@pytest.mark.parametrize(("n", "limit", "arrays"), [(0, 5, 0), (5, 5, 1), (6, 5, 2), (1001, 1000, 2), (10, 1, 10)])
def test_split_arrays(n: int, limit: int, arrays: int) -> None:
    tasks = [[f"t{i}"] for i in range(n)]
    out = split_arrays(tasks, limit)
    assert len(out) == arrays
    assert all(1 <= len(a) <= limit for a in out)
    assert [t for a in out for t in a] == tasks


def test_pack_rejects_zero() -> None:
    with pytest.raises(ValueError):
        pack([], 0)


def test_full_sweep_packs_into_balanced_arrays(full_spec) -> None:
    cells = expand(full_spec, SUBJECTS)
    tasks = pack(cells, full_spec.resources.cells_per_task)
    arrays = split_arrays(tasks, 50)
    assert len(tasks) == 134
    assert [len(a) for a in arrays] == [45, 45, 44]
    assert sorted(c.cell_id for a in arrays for t in a for c in t) == sorted(c.cell_id for c in cells)
    assert all(len(t) <= 8 for a in arrays for t in a)
