"""Tiny LLM checkpoint and the LoRA-wrapped base LLM (hidden states only)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from aullm.constants import PAPER_PROMPT
from aullm.errors import UserInputError
from aullm.model.llm import BaseLLM, LoraSettings, load_base_llm
from aullm.model.tiny import TINY_VOCAB_SIZE, build_tiny_llm


@pytest.fixture(scope="module")
def llm(tiny_llm: Path) -> BaseLLM:
    return load_base_llm(tiny_llm)


def test_tiny_checkpoint_round_trips_exactly(tiny_llm: Path) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, Qwen2ForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tiny_llm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rebuilt = Qwen2ForCausalLM(saved.config)
    ref = rebuilt.state_dict()
    got = saved.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    decoder = AutoModel.from_pretrained(tiny_llm)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k


def test_tiny_build_is_idempotent_and_refuses_other_seed(tiny_llm: Path) -> None:
    weights = tiny_llm / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_llm(tiny_llm, seed=0) == tiny_llm
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(UserInputError, match="seed"):
        build_tiny_llm(tiny_llm, seed=1)


def test_tiny_build_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not a tiny-LLM directory"):
        build_tiny_llm(tmp_path)


def test_tiny_tokenizer_works_offline(tiny_llm: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    ids = tok(PAPER_PROMPT, add_special_tokens=False)["input_ids"]
    assert 3 <= len(ids) <= 12  # trained on the prompt: whole words, not bytes
    assert tok.decode(ids) == PAPER_PROMPT
    odd = tok("zebra ünïcode 123", add_special_tokens=False)["input_ids"]  # byte fallback, no unk
    assert tok.decode(odd) == "zebra ünïcode 123"
    assert max(ids + odd) < TINY_VOCAB_SIZE


def test_loaded_llm_is_a_decoder_without_lm_head(llm: BaseLLM) -> None:
    base = llm.model.get_base_model()
    assert type(base).__name__ == "Qwen2Model"
    assert not any("lm_head" in name for name, _ in llm.named_modules())
    assert llm.hidden_size == 64


def test_only_lora_weights_are_trainable(llm: BaseLLM) -> None:
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r=16 on q_proj (64->64) and v_proj (64->32) in 2 layers: 2 * 16 * ((64+64) + (64+32))
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == 2 * 16 * (128 + 96)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "v_proj"}


def test_embed_prompt_and_last_hidden(llm: BaseLLM) -> None:
    emb = llm.embed_prompt(PAPER_PROMPT)
    assert emb.dim() == 3 and emb.shape[0] == 1 and emb.shape[2] == 64 and not emb.requires_grad
    llm.eval()
    seq = torch.randn(3, 5, 64)
    h = llm.last_hidden(seq)
    assert h.shape == (3, 64)
    # right padding: with a mask, the last *attended* position is read
    padded = torch.cat([seq[:, :4], torch.zeros(3, 2, 64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3)
    torch.testing.assert_close(llm.last_hidden(padded, mask), llm.last_hidden(seq[:, :4]))


def _lora_state(llm: BaseLLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in llm.lora_parameters().items()}


def test_reset_adapters_is_deterministic(llm: BaseLLM) -> None:
    llm.reset_adapters(5)
    first = _lora_state(llm)
    with torch.no_grad():
        for p in llm.lora_parameters().values():
            p.add_(1.0)
    torch.manual_seed(123)  # the global RNG must not matter
    llm.reset_adapters(5)
    second = _lora_state(llm)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.count_nonzero(v) == 0 for k, v in second.items() if "lora_B" in k)
    a = next(v for k, v in second.items() if "lora_A" in k)
    assert a.abs().max() <= 1 / 64**0.5 + 1e-7 and a.std() > 0  # kaiming-uniform(a=sqrt 5) bound
    llm.reset_adapters(6)
    assert not all(torch.equal(first[k], v) for k, v in _lora_state(llm).items())


def test_bad_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_base_llm(tmp_path / "nope")
    with pytest.raises(UserInputError, match="not a model directory"):
        load_base_llm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="cannot be loaded"):
        load_base_llm(tmp_path)


def test_bad_lora_settings_are_user_errors(tiny_llm: Path) -> None:
    with pytest.raises(UserInputError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(UserInputError, match="target_modules"):
        load_base_llm(tiny_llm, lora=LoraSettings(target_modules=("query",)))
    with pytest.raises(UserInputError, match="dtype"):
        load_base_llm(tiny_llm, dtype="float64")
