"""Training settings as grid axes (issue 14), without training anything: expansion and
cell identity, packing, `--set`, the settings check of validate/submit/retry/collect, and
what collecting makes of settings (no pooling across them, the settings table).

The end-to-end runs (local executor, dev Slurm cluster) are in tests/test_grid_settings.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import cli
from orchestrator.ledger import SweepDir
from orchestrator.results.collect import collect_groups
from orchestrator.results.settings_table import settings_rows, to_markdown
from orchestrator.results.types import GroupKey, GroupResult, ProtocolSummary, Stat
from orchestrator.sweep.cells import expand, pack
from orchestrator.sweep.spec import load_sweep

SUBJECTS = {"casme2": ["sub01", "sub02"], "samm": ["006", "007"]}


def sweep_data(root: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "axes",
        "output_dir": str(root / "out"),
        "datasets": {"casme2": {"root": str(root / "casme2")}, "samm": {"root": str(root / "samm")}},
        "llms": {"tiny": {"path": str(root / "model")}},
        "seeds": [1],
        "grid": [
            {"protocol": "loso", "datasets": ["casme2"], "variants": ["all", "no_llm"]},
            {"protocol": "cross_domain", "pairs": [{"train": "casme2", "test": "samm"}], "variants": ["all"]},
        ],
        "training": {"epochs": 3, "lr": 1.0e-3},
        "resources": {"executor": "local", "cells_per_task": 8},
    }
    data.update(extra)
    return data


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cells_of(path: Path, overrides: tuple[str, ...] = ()) -> list[Any]:
    return expand(load_sweep(path, overrides), SUBJECTS)


def test_axes_are_a_cartesian_product_with_readable_ids(tmp_path: Path) -> None:
    plain = cells_of(write(tmp_path / "plain.yaml", sweep_data(tmp_path)))
    swept = cells_of(write(tmp_path / "swept.yaml", sweep_data(tmp_path, sweep={"lr": [1.0e-3, 1.0e-4], "lora_r": [8, 16]})))
    # LLM cells (2 folds + the pair) x 4 settings; the no_llm baseline (2 folds) never uses
    # LoRA, so only the lr axis multiplies it: 3 x 4 + 2 x 2
    assert len(plain) == 5 and len(swept) == 3 * 4 + 2 * 2
    assert not [c for c in swept if c.variant == "no_llm" and "lora_r" in c.settings]
    ids = {c.cell_id for c in swept}
    # the combination equal to the sweep's own training keeps the id it had without axes
    assert {c.cell_id for c in plain} <= ids
    assert "casme2-loso-sub01__tiny__all__s1" in ids
    labels = {c.settings.split("@")[0] for c in swept if c.settings}
    assert labels == {"lora_r=8", "lr=1e-4", "lr=1e-4,lora_r=8"}
    one = next(c for c in swept if c.settings.startswith("lr=1e-4,lora_r=8@") and c.fold == "sub01" and c.variant == "all")
    assert one.cell_id == f"casme2-loso-sub01__tiny__all__{one.settings}__s1"
    assert one.group_id == f"casme2/tiny/all/{one.settings}"
    # four settings, four groups per (data, llm, variant): results never pool across them
    assert len({c.group_id for c in swept if c.variant == "all" and c.kind == "loso"}) == 4


def test_a_scalar_is_a_one_value_axis_and_ids_are_stable(tmp_path: Path) -> None:
    a = cells_of(write(tmp_path / "a.yaml", sweep_data(tmp_path, sweep={"lr": 1.0e-4})))
    b = cells_of(write(tmp_path / "b.yaml", sweep_data(tmp_path, sweep={"lr": ["1e-4"]})))
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    # the hash covers every resolved field, not only the swept ones: another weight decay is another cell
    data = sweep_data(tmp_path, sweep={"lr": [1.0e-4]})
    data["training"]["weight_decay"] = 0.01
    c = cells_of(write(tmp_path / "c.yaml", data))
    assert {x.settings for x in c}.isdisjoint({x.settings for x in a})


def test_block_training_overrides_only_its_block(tmp_path: Path) -> None:
    data = sweep_data(tmp_path)
    data["grid"][1]["training"] = {"epochs": 7}
    cells = cells_of(write(tmp_path / "s.yaml", data))
    spec = load_sweep(tmp_path / "s.yaml")
    loso = [c for c in cells if c.kind == "loso"]
    cross = [c for c in cells if c.kind == "cross_domain"]
    assert all(c.settings == "" for c in loso)
    assert all(c.settings.startswith("epochs=7@") for c in cross)
    assert spec.settings_table()[cross[0].settings_hash]["epochs"] == 7
    assert spec.settings_table()[loso[0].settings_hash]["epochs"] == 3


def test_set_is_the_same_as_editing_the_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", sweep_data(tmp_path))
    edited = sweep_data(tmp_path, sweep={"lr": [1.0e-4, 3.0e-4]})
    edited["training"]["epochs"] = 5
    by_file = cells_of(write(tmp_path / "edited.yaml", edited))
    by_set = cells_of(base, ("training.epochs=5", "sweep.lr=[1e-4,3e-4]"))
    assert [c.to_dict() for c in by_set] == [c.to_dict() for c in by_file]
    assert load_sweep(base, ("training.epochs=5",)).overrides == ["training.epochs=5"]


def test_packing_shares_the_llm_across_settings_but_not_across_precision(tmp_path: Path) -> None:
    data = sweep_data(tmp_path, sweep={"lr": [1.0e-3, 1.0e-4], "lora_r": [8, 16]})
    cells = [c for c in cells_of(write(tmp_path / "s.yaml", data)) if c.llm]
    tasks = pack(cells, 100)
    assert len(tasks) == 1 and len({c.settings for c in tasks[0]}) == 4
    data["sweep"]["precision"] = ["fp32", "bf16"]
    cells = [c for c in cells_of(write(tmp_path / "p.yaml", data)) if c.llm]
    tasks = pack(cells, 100)
    assert len(tasks) == 2
    assert all(len({c.task_setup for c in t}) == 1 for t in tasks)
    # under DeepSpeed the engine's config takes the batch size: another batch size, another task
    data["sweep"] = {"batch_size": [128, 256], "lr": [1.0e-3, 1.0e-4]}
    data["training"]["deepspeed"] = "zero2"
    cells = [c for c in cells_of(write(tmp_path / "d.yaml", data)) if c.llm]
    assert sorted(len(t) for t in pack(cells, 100)) == [6, 6]


# ---------------------------------------------------------------- the settings check


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aullm.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("axes-assets")
    write_synthetic("casme2", root / "casme2", subjects=2, seed=0, clips_per_subject=1)
    write_synthetic("samm", root / "samm", subjects=2, seed=0, clips_per_subject=1)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    return root


def _submitted(real: Path, tmp_path: Path, data: dict[str, Any]) -> tuple[Path, SweepDir]:
    """A sweep directory as submit leaves it (its manifest), without running anything."""
    path = write(tmp_path / "sweep.yaml", data)
    spec = load_sweep(path)
    from orchestrator.sweep.spec import validate_paths

    subjects = validate_paths(spec)
    sweep = SweepDir(spec.output_dir)
    sweep.write_manifest(spec, expand(spec, subjects))
    return path, sweep


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    _run.out = captured.out  # type: ignore[attr-defined]
    return code, captured.err


def test_every_command_refuses_a_changed_setting(real: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = sweep_data(real, output_dir=str(tmp_path / "out"), sweep={"lora_r": [8, 16]})
    path, sweep = _submitted(real, tmp_path, data)
    before = sweep.manifest_path.read_bytes()
    changed = copy.deepcopy(data)
    changed["training"]["lr"] = 2.0e-3
    write(path, changed)
    for argv in (["validate", str(path)], ["submit", str(path), "--dry-run"], ["submit", str(path)],
                 ["retry", str(path), "--dry-run"], ["collect", str(path), "--no-mlflow"]):  # fmt: skip
        code, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert "field 'training.lr'" in lines[0] and "0.002" in lines[0] and "0.001" in lines[0], lines[0]
        assert "new output_dir" in lines[0] and "(line " in lines[0], lines[0]
    assert sweep.manifest_path.read_bytes() == before  # nothing written
    assert not (sweep.path / "results_tables").exists()
    # the same change through --set is refused the same way
    write(path, data)
    code, err = _run(["submit", str(path), "--dry-run", "--set", "training.lr=0.002"], capsys)
    assert code == 2 and "field 'training.lr'" in err and "--set training.lr=0.002" in err


def test_a_new_axis_value_is_new_cells_for_submit_not_for_retry(
    real: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sweep_data(real, output_dir=str(tmp_path / "out"), sweep={"lora_r": [8, 16]})
    path, sweep = _submitted(real, tmp_path, data)
    code, err = _run(["submit", str(path), "--dry-run", "--set", "sweep.lora_r=[8,16,32]"], capsys)
    assert code == 0, err
    plan = json.loads(_run.out)  # type: ignore[attr-defined]
    # 3 LLM cells x 3 ranks + the 2 no_llm cells (LoRA does not apply to them), where the
    # manifest had 3 x 2 + 2: nothing is done yet, so all are to submit
    assert len(sweep.cells()) == 8 and plan["cells"] == 11 and plan["to_submit"] == 11
    code, err = _run(["retry", str(path), "--dry-run", "--set", "sweep.lora_r=[8,16,32]"], capsys)
    assert code == 2 and "retry re-runs only the recorded cells" in err and len(err.strip().splitlines()) == 1


def test_a_stray_result_of_other_settings_is_refused(real: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A result left by an earlier manifest for a cell id the file now expands to again,
    trained under other settings, cannot be taken for done under the new ones."""
    data = sweep_data(real, output_dir=str(tmp_path / "out"))
    path, sweep = _submitted(real, tmp_path, data)
    cid = "casme2-loso-sub01__tiny__all__s1"
    sweep.write_result(cid, {"cell_id": cid, "status": "done", "settings_hash": "0badc0de"})
    pruned = copy.deepcopy(data)
    pruned["grid"] = pruned["grid"][1:]
    sweep.write_manifest(load_sweep(write(tmp_path / "p.yaml", pruned)), [])
    code, err = _run(["validate", str(path)], capsys)
    assert code == 2 and cid in err and "0badc0de" in err


# ---------------------------------------------------------------- collecting


def _prediction(aus: tuple[int, ...], n: int = 4) -> dict[str, Any]:
    return {"aus": list(aus), "probs": [[0.9] * len(aus)] * n, "labels": [[1] * len(aus)] * n,
            "sample_keys": [f"casme2/sub01/c{i}" for i in range(n)], "subjects": ["sub01"] * n}  # fmt: skip


def test_collect_never_pools_a_result_of_other_settings(tmp_path: Path) -> None:
    spec = load_sweep(write(tmp_path / "s.yaml", sweep_data(tmp_path, sweep={"lora_r": [8, 16]})))
    cells = [c for c in expand(spec, {"casme2": ["sub01"], "samm": []}) if c.kind == "loso" and c.variant == "all"]
    assert len(cells) == 2
    aus = (1, 2, 4, 7, 12, 14, 15, 17)
    results = {c.cell_id: {"status": "done", "predictions": _prediction(aus), "settings_hash": c.settings_hash}
               for c in cells}  # fmt: skip
    wrong = cells[0]
    results[wrong.cell_id]["settings_hash"] = cells[1].settings_hash
    groups = collect_groups(cells, results, layouts={"casme2": "casme2"}, settings=spec.settings_table())
    by_id = {g.key.id: g for g in groups}
    bad = by_id[wrong.group_id]
    assert bad.status == "incomplete" and "other settings" in bad.missing[0].reason
    good = by_id[cells[1].group_id]
    assert good.complete and good.settings["lora_r"] == (8 if "lora_r=8" in cells[1].settings else 16)
    assert good.swept == ("lora_r",)


def _group(settings: str, mean: float, seeds: int, lr: float) -> GroupResult:
    stat = Stat(mean, 2.0, seeds)
    return GroupResult(
        key=GroupKey("loso", "casme2", "tiny", "all", settings), layout="casme2", train_layout=None,
        cell_ids=(), seeds=tuple(range(seeds)), folds=("sub01",), status="complete",
        summary={"pooled_binary@0.5": ProtocolSummary({}, stat)}, settings={"lr": lr}, swept=("lr",),
    )  # fmt: skip


def test_settings_table_rows_and_difference_to_the_default() -> None:
    groups = [_group("", 50.0, 2, 1e-3), _group("lr=1e-4@aaaa", 45.5, 2, 1e-4), _group("lr=1e-2@bbbb", 60.0, 1, 1e-2)]
    rows = settings_rows(groups)
    assert [r.setting for r in rows][0] == "default (training:)"
    delta = {r.setting: r.delta for r in rows}
    assert delta["lr=1e-4@aaaa"] == pytest.approx(-4.5) and delta["lr=1e-2@bbbb"] == pytest.approx(10.0)
    text = to_markdown(rows)
    assert "| casme2/tiny/all | lr=1e-4@aaaa | 1e-4 | 2 | 45.5 ± 2.0 | -4.5 | complete |" in text
    assert "| 1 | 60.0 | +10.0 |" in text  # one seed: no ± (a std of one seed does not exist)
    assert settings_rows([_group("", 50.0, 2, 1e-3)]) == []  # one setting: no settings table


def test_the_paper_tables_show_only_the_default_setting() -> None:
    from orchestrator.results.tables import build_tables

    groups = [_group("", 50.0, 2, 1e-3), _group("lr=1e-4@aaaa", 45.5, 2, 1e-4)]
    shown = {e.group for t in build_tables(groups) for s in t.sections for b in s.blocks for e in b.entries.values()}
    assert shown - {""} == {"casme2/tiny/all"}


def test_a_task_gives_each_cell_its_own_lora_rank(tiny_llm: Path) -> None:
    """Cells of one task sweep lora_r over one LLM load: the adapters follow the cell."""
    from aullm.model.llm import LoraSettings, load_base_llm

    llm = load_base_llm(tiny_llm, lora=LoraSettings(r=16))
    base_weight = next(p for n, p in llm.model.named_parameters() if "lora_" not in n).detach().clone()
    llm.use_lora(LoraSettings(r=8, alpha=16))
    ranks = {layer.lora_A[a].weight.shape[0] for _, layer in llm.lora_layers() for a in layer.lora_A}
    assert ranks == {8} and llm.lora.r == 8
    assert all(layer.scaling[a] == 2.0 for _, layer in llm.lora_layers() for a in layer.scaling)
    # the frozen base is the same weights, not a reload
    assert torch_equal(next(p for n, p in llm.model.named_parameters() if "lora_" not in n), base_weight)
    assert not any(p.requires_grad for n, p in llm.model.named_parameters() if "lora_" not in n)


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


def test_the_shipped_hparams_sweep_has_the_cell_count_its_comment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("AULLM_DATA", "/data")
    monkeypatch.setenv("AULLM_MODELS", "/models")
    spec = load_sweep(repo / "sweeps" / "ablations-hparams.yaml")
    cells = expand(spec, {"casme2": [f"sub{i:02d}" for i in range(1, 27)]})
    assert len(cells) == 468 and "26 x 18 = 468" in (repo / "sweeps" / "ablations-hparams.yaml").read_text()
    assert spec.swept_fields() == ["epochs", "lr", "lora_r"]
    default = [c for c in cells if not c.settings]
    assert len(default) == 26 and default[0].cell_id == "casme2-loso-sub01__qwen2-1.5b__all__s1"
    assert len(pack(cells, spec.resources.cells_per_task)) == 52


def test_a_task_trains_a_cell_only_under_the_settings_its_id_names(tmp_path: Path) -> None:
    """The job side reads the cell's row of the manifest's settings table and checks it
    against the hash in the cell's id: a row edited since submit cannot train that cell."""
    from jobs.run_cells import _cell_config

    spec = load_sweep(write(tmp_path / "s.yaml", sweep_data(tmp_path, sweep={"lora_r": [8, 16]})))
    cells = expand(spec, SUBJECTS)
    manifest = {"spec": spec.snapshot(), "settings": spec.settings_table()}
    cell = next(c for c in cells if c.settings.startswith("lora_r=8@"))
    assert _cell_config(manifest, cell).lora_r == 8
    assert _cell_config(manifest, next(c for c in cells if not c.settings)).lora_r == 16
    manifest["settings"][cell.settings_hash] = {**manifest["settings"][cell.settings_hash], "lora_r": 32}
    with pytest.raises(RuntimeError, match="no settings with hash"):
        _cell_config(manifest, cell)
