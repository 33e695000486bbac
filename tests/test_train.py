"""One training cell: it learns, packing changes nothing, and a preempted cell resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aullm.constants import DATASET_AUS
from aullm.data.clips import ClipStore
from aullm.data.folds import loso_split, loso_subjects
from aullm.data.readers import read_dataset
from aullm.errors import UserInputError
from aullm.metrics import pooled_binary_f1
from aullm.train import CellTrainer, Preempted, TrainConfig

REPO = Path(__file__).resolve().parents[1]
AUS = DATASET_AUS["casme2"]


@pytest.fixture(scope="module")
def casme2_store(casme2_small: Path, tmp_path_factory: pytest.TempPathFactory):
    samples = read_dataset("casme2", casme2_small)
    return samples, ClipStore.load(samples, tmp_path_factory.mktemp("cache"))


def _shuffled(split, seed: int):
    """The same split with the training AU sets permuted across training clips."""
    import dataclasses

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split.train))
    train = [dataclasses.replace(s, aus=split.train[j].aus) for s, j in zip(split.train, order)]
    return dataclasses.replace(split, train=train)


@pytest.fixture(scope="module")
def casme2_many_subjects(tmp_path_factory: pytest.TempPathFactory):
    """12 subjects x 6 clips: LOSO generalises across subjects, so diversity matters more than clips."""
    from aullm.data.synth import write_synthetic

    root = write_synthetic("casme2", tmp_path_factory.mktemp("data") / "casme2-12", subjects=12, seed=0,
                           clips_per_subject=6)
    samples = read_dataset("casme2", root)
    return samples, ClipStore.load(samples, tmp_path_factory.mktemp("cache"))


def _pooled_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over AUs (with both classes present) of ROC AUC on pooled predictions: how
    well the model ranks clips, whatever its threshold. A constant predictor scores 0.5."""
    from sklearn.metrics import roc_auc_score

    cols = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
    return float(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in cols]))


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize(
    "recipe, variant",
    [("paper", "all"), ("paper", "no_llm"), ("script", "all")],
    ids=["paper-all", "paper-no_llm", "script-all"],
)
def test_learns_synthetic_au_motion_better_than_controls(casme2_many_subjects, tiny_llm, recipe, variant):
    """LOSO over a few folds: clearly better than a constant predictor and than a
    shuffled-label control trained the same way, under each recipe, with and without
    the LLM. 20 epochs of mini-batches of 32 at lr 1e-3 stand in for the paper's 350 full
    batches at 3e-5 on the CPU: 60 steps where 40 full batches took 1.6x the time
    (measured alone: 339 s against 551 s, the same margins met with room; at 15 epochs
    paper/all fell to F1 0.375, under its bar).

    Paper recipe: pooled binary F1 at the fixed 0.5 threshold, the headline protocol. It
    passes because each cell recomputes BatchNorm statistics over its training clips
    before predicting (docs/results.md); with the training-time moving averages, F1 sat
    at the constant predictor's level.

    Script recipe: it predicts with those moving averages, as the released script does,
    and its probabilities do not mean what they say at 0.5 (measured: pooled F1 0.06
    against the constant's 0.29 on this data, while the same recipe with recomputed
    statistics reaches 0.41). The script chose each AU's threshold on the test set, which
    hides that. So here the script recipe must show that it learns by ranking, pooled ROC
    AUC, threshold-free and with nothing fitted on the test clips: a margin of 0.10 over
    the shuffled-label control and over the constant predictor (AUC 0.5).
    """
    samples, store = casme2_many_subjects
    # the visual token appended after the prompt, as the script, in both (it learns faster here)
    config = TrainConfig(recipe=recipe, epochs=20, batch_size=32, lr=1e-3, token_position="append")
    trainer = CellTrainer(tiny_llm if variant != "no_llm" else None, config)
    real, shuffled, labels = [], [], []
    for subject in loso_subjects(samples)[:3]:
        split = loso_split(samples, subject, AUS)
        r = trainer.run(split, store, variant, 1, config)
        s = trainer.run(_shuffled(split, 7), store, variant, 1, config)
        assert r.epoch_losses[-1] < r.epoch_losses[0]
        real.append(r.probs)
        shuffled.append(s.probs)
        labels.append(r.labels)
    y = np.concatenate(labels)
    p_real, p_shuffled = np.concatenate(real), np.concatenate(shuffled)
    present = y.sum(axis=0) > 0  # an AU absent from every test fold scores 0 for any predictor
    f1_real = pooled_binary_f1(p_real, y)[present].mean()
    f1_shuffled = pooled_binary_f1(p_shuffled, y)[present].mean()
    # the best constant predictor for binary F1 says "positive" for every clip
    f1_constant = pooled_binary_f1(np.ones_like(y, dtype=float), y)[present].mean()
    auc_real, auc_shuffled = _pooled_auc(p_real, y), _pooled_auc(p_shuffled, y)
    print(f"{recipe}/{variant}: pooled binary F1 model {f1_real:.3f}, shuffled labels {f1_shuffled:.3f}, "
          f"constant {f1_constant:.3f}; pooled ROC AUC model {auc_real:.3f}, shuffled {auc_shuffled:.3f}")
    if recipe == "paper":
        assert f1_real > f1_constant + 0.10
        assert f1_real > f1_shuffled + 0.10
    else:
        assert auc_real > 0.5 + 0.10
        assert auc_real > auc_shuffled + 0.10


# Cells of the packing tests: `<subject index>:<variant>:<seed>`. Each packed order trains
# the same variant second (all -> all), a different one before `all` (f_mid -> all) and
# prompt_learning (early fusion) after `all`; the second order reverses the first, so
# each transition is also taken the other way round. A crash mid-training then precedes
# a last cell, which must still equal its fresh run.
_PACK = ["0:all:1", "1:all:2", "2:f_mid:3", "3:all:4", "4:prompt_learning:5"]
_FAILING, _AFTER_FAILURE = "5:all:6:fail@1", "0:all:7"
PACKING_EPOCHS = "2"


def _run_pack_processes(jobs: list[tuple[Path, list[str]]], root: Path, cache: Path, llm: Path) -> dict:
    """Each job in its own process (two at a time): {out: {cell: array}}."""
    running: list[tuple[Path, subprocess.Popen]] = []
    results: dict[Path, dict[str, np.ndarray]] = {}
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < 2:
            out, args = pending.pop(0)
            cmd = [sys.executable, str(REPO / "tests" / "train_cells_script.py"), str(root), str(cache), str(llm),
                   str(out), PACKING_EPOCHS, *args]  # fmt: skip
            running.append((out, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        out, proc = running.pop(0)
        log = proc.communicate(timeout=600)[0].decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]
        results[out] = dict(np.load(out))
    return results


@pytest.fixture(scope="module")
def packing_runs(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> dict[str, dict[str, np.ndarray]]:
    """Fresh processes (one cell each), the two packed orders, and the mutated pack."""
    from aullm.data.synth import write_synthetic

    tmp = tmp_path_factory.mktemp("packing")
    root = write_synthetic("casme2", tmp / "casme2", subjects=6, seed=0, clips_per_subject=3)
    subjects = loso_subjects(read_dataset("casme2", root))

    def spec(cell: str) -> str:
        i, rest = cell.split(":", 1)
        return f"{subjects[int(i)]}:{rest}"

    order1 = [spec(c) for c in [*_PACK, _FAILING, _AFTER_FAILURE]]
    order2 = [spec(c) for c in [*reversed(_PACK), _FAILING, _AFTER_FAILURE]]
    fresh_cells = [spec(c) for c in [*_PACK, _AFTER_FAILURE]]
    jobs = [(tmp / "packed1.npz", order1), (tmp / "packed2.npz", order2),
            (tmp / "mutated.npz", ["--no-adapter-reset", *order1[:2]])]  # fmt: skip
    jobs += [(tmp / f"fresh{i}.npz", [c]) for i, c in enumerate(fresh_cells)]
    out = _run_pack_processes(jobs, root, tmp / "cache", tiny_llm)
    fresh: dict[str, np.ndarray] = {}
    for i in range(len(fresh_cells)):
        fresh.update(out[tmp / f"fresh{i}.npz"])
    return {"fresh": fresh, "packed1": out[tmp / "packed1.npz"], "packed2": out[tmp / "packed2.npz"],
            "mutated": out[tmp / "mutated.npz"], "cells": fresh_cells, "failing": spec(_FAILING)}  # fmt: skip


def _differences(packed: dict[str, np.ndarray], fresh: dict[str, np.ndarray], cells: list[str]) -> list[str]:
    """The cells whose packed predictions or losses are not bit-identical to their fresh run."""
    return [c for c in cells if c in packed
            and not (np.array_equal(packed[c], fresh[c]) and np.array_equal(packed[c + ":losses"], fresh[c + ":losses"]))]


@pytest.mark.slow
def test_packed_cells_equal_fresh_processes_bit_for_bit(packing_runs) -> None:
    """Packing changes nothing, in either order, whatever trained before (the same variant,
    another one, prompt_learning, or a cell that crashed mid-training): every packed cell's
    losses and test probabilities are bit-identical to the same cell in a fresh process
    (CPU, fp32)."""
    fresh, cells = packing_runs["fresh"], packing_runs["cells"]
    for order in ("packed1", "packed2"):
        packed = packing_runs[order]
        assert set(cells) <= set(packed), order
        assert _differences(packed, fresh, cells) == [], order
        failing = packing_runs["failing"]
        assert failing not in packed  # it did crash, and the pack went on
        assert not bool(packed[failing + ":alive_after_next"]), "the crashed cell's model lived on into the next cell"


@pytest.mark.slow
def test_packing_test_catches_adapters_that_are_not_reset(packing_runs) -> None:
    """Mutation check: with the LoRA reset disabled (test-only hook), the second cell of a
    pack starts from the first cell's adapters, and the comparison above sees it."""
    mutated, fresh, cells = packing_runs["mutated"], packing_runs["fresh"], packing_runs["cells"]
    assert _differences(mutated, fresh, cells[1:2]) == [cells[1]]


@pytest.mark.parametrize("other", [{"lora_r": 8}, {"lora_dropout": 0.3}, {"lora_alpha": 8}],
                         ids=["lora_r", "lora_dropout", "lora_alpha"])
def test_a_cell_after_other_lora_settings_equals_it_trained_first(casme2_store, tiny_llm, other):
    """A task packs the cells of a settings sweep (sweeps/ablations-hparams.yaml sweeps
    lora_r): a cell trained after one with other LoRA settings equals, bit for bit, the same
    cell trained first by a new trainer. The settings change rebuilds the adapters; when that
    drew from the global RNG after the cell's seed, the cell got another model init and its
    probabilities moved by 0.31 (found by running tests/test_concurrent.py out of order)."""
    import dataclasses

    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=16)
    first = CellTrainer(tiny_llm, config).run(split, store, "all", 1, config)
    trainer = CellTrainer(tiny_llm, config)
    trainer.run(split, store, "all", 2, dataclasses.replace(config, **other))
    after = trainer.run(split, store, "all", 1, config)
    assert np.array_equal(after.probs, first.probs) and after.epoch_losses == first.epoch_losses


def test_preempted_cell_resumes_where_it_stopped(casme2_store, tiny_llm, tmp_path):
    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    config = TrainConfig(epochs=4, lr=1e-3)
    straight = CellTrainer(tiny_llm, config).run(split, store, "all", 3, config)

    ckpt = tmp_path / "cell.pt"
    calls = {"n": 0}

    def stop_at_epoch_2() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Preempted):
        CellTrainer(tiny_llm, config).run(split, store, "all", 3, config, checkpoint_path=ckpt, should_stop=stop_at_epoch_2)
    assert ckpt.is_file()
    resumed = CellTrainer(tiny_llm, config).run(split, store, "all", 3, config, checkpoint_path=ckpt)
    assert resumed.start_epoch == 2
    assert len(resumed.epoch_losses) == 4
    np.testing.assert_allclose(resumed.epoch_losses, straight.epoch_losses, rtol=1e-5)
    np.testing.assert_allclose(resumed.probs, straight.probs, atol=1e-5)
    assert not ckpt.exists()  # a finished cell leaves no checkpoint behind


def test_recomputed_batchnorm_stats_are_those_of_the_training_clips(casme2_store):
    """After training, each BatchNorm layer normalises with the exact mean and variance of
    its inputs over the training clips (test sampling, dropout off), not the moving averages."""
    import torch

    from aullm.data.clips import test_frame_indices
    from aullm.model.au_llm import AULLM

    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    trainer = CellTrainer(None, TrainConfig(epochs=1))
    model = AULLM("no_llm", len(AUS), None, dropout=0.3)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(norms) == 2
    trainer._recompute_batchnorm_stats(model, split, store, 1.0)

    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0])) for i, m in enumerate(norms)]
    model.eval()
    with torch.no_grad():
        model.backbone(torch.from_numpy(store.batch(split.train, lambda n: test_frame_indices(n, 6))))
    for h in hooks:
        h.remove()
    for i, m in enumerate(norms):
        x = seen[i].transpose(0, 1).flatten(1)  # (channels, everything else)
        assert not m.training
        torch.testing.assert_close(m.running_mean, x.mean(1), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(m.running_var, x.var(1), rtol=1e-3, atol=1e-4)
        assert m.momentum == 0.1  # restored for the next cell


def test_no_llm_variant_trains_without_an_llm(casme2_store):
    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[1], AUS)
    config = TrainConfig(epochs=2, lr=1e-3)
    result = CellTrainer(None, config).run(split, store, "no_llm", 1, config)
    assert result.probs.shape == (len(split.test), len(AUS))
    assert ((result.probs >= 0) & (result.probs <= 1)).all()


def test_a_packed_trainer_frees_each_cells_model(casme2_store, tiny_llm, monkeypatch):
    """Cells packed in one process: once the next cell has run, nothing of the previous
    cell's model is alive (the trainer exempts long-lived objects from the garbage
    collector between cells; a cell's own model must never be among them)."""
    import weakref

    import aullm.model.au_llm as au

    built: list[weakref.ref] = []

    class Recorded(au.AULLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))
            # A reference cycle, as Accelerate makes on a GPU (a bf16 forward bound to the
            # model, stored on it): only the garbage collector can free such a model.
            self.__dict__["_bound_forward"] = self.forward

    monkeypatch.setattr(au, "AULLM", Recorded)
    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    config = TrainConfig(epochs=1, lr=1e-3)
    trainer = CellTrainer(tiny_llm, config)
    for variant in ("all", "no_llm", "f_mid"):
        trainer.run(split, store, variant, 1, config)
    assert len(built) == 3
    assert built[0]() is None and built[1]() is None


@pytest.mark.parametrize(
    "values, field",
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"token_position": "middle"}, "token_position"),
     ({"dropout": 1.5}, "dropout"), ({"bogus": 1}, "bogus")],
)
def test_bad_training_settings_name_the_field(values, field):
    with pytest.raises(UserInputError, match=field):
        TrainConfig.from_dict(values)


def test_unknown_variant_is_a_user_error(casme2_store):
    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    with pytest.raises(UserInputError, match="allowed"):
        CellTrainer(None, TrainConfig(epochs=1)).run(split, store, "f_low", 1)


def test_cuda_determinism_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a cell asks for deterministic kernels (cuDNN without autotuning, as the
    script, and deterministic algorithms with a fixed cuBLAS workspace); on the CPU it
    changes nothing. The flags are process-wide, so they are restored afterwards."""
    import torch

    from aullm.train import CUBLAS_WORKSPACE, configure_determinism

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())  # fmt: skip
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_determinism("cpu")
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                torch.are_deterministic_algorithms_enabled()) == before  # fmt: skip
        configure_determinism("cuda")
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2])


def test_recipes_resolve_unset_fields_and_yield_to_explicit_ones() -> None:
    from aullm.recipes import RECIPE_VALUES, SCRIPT_PROMPT

    paper, script = TrainConfig(), TrainConfig(recipe="script")
    for field, value in RECIPE_VALUES["paper"].items():
        assert getattr(paper, field) == value, field
    for field, value in RECIPE_VALUES["script"].items():
        assert getattr(script, field) == value, field
    assert script.prompt == SCRIPT_PROMPT and script.token_position == "append" and script.loss_reduction == "sum"
    mixed = TrainConfig.from_dict({"recipe": "script", "token_position": "prepend", "batchnorm_stats": "recompute"})
    assert (mixed.token_position, mixed.batchnorm_stats, mixed.asl_form) == ("prepend", "recompute", "script")
    with pytest.raises(UserInputError, match="field 'recipe'.*paper, script"):
        TrainConfig.from_dict({"recipe": "released"})


def test_script_recipe_trains_a_cell(casme2_store, tiny_llm) -> None:
    """The whole script recipe (appended token, its Chinese prompt, running BatchNorm
    statistics, its ASL gradient summed, no EFP activation) trains and predicts."""
    samples, store = casme2_store
    split = loso_split(samples, loso_subjects(samples)[0], AUS)
    config = TrainConfig(recipe="script", epochs=2, lr=1e-3)
    result = CellTrainer(tiny_llm, config).run(split, store, "all", 1, config)
    assert result.probs.shape == (len(split.test), len(AUS)) and np.isfinite(result.probs).all()
    assert len(result.epoch_losses) == 2 and all(np.isfinite(result.epoch_losses))
