"""The full AU-LLM model: every variant and token position, frozen base, packed cells."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from aullm.constants import PAPER_PROMPT, TOKEN_POSITIONS, VARIANTS
from aullm.errors import UserInputError
from aullm.loss import AsymmetricLoss
from aullm.model.au_llm import AULLM, ModelSettings
from aullm.model.backbone import F_HIGH_DIM, F_MID_DIM
from aullm.model.llm import BaseLLM, load_base_llm
from aullm.model.projector import make_projector
from aullm.model.tiny import TINY_VOCAB_SIZE

NUM_AUS = 4


@pytest.fixture(scope="module")
def llm(tiny_llm: Path) -> BaseLLM:
    return load_base_llm(tiny_llm)


def clips(batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 6, 64, 64, generator=g) * 255  # the script feeds raw 0..255


@pytest.mark.parametrize("variant", VARIANTS)
def test_projector_output_size(variant: str, llm: BaseLLM) -> None:
    out_dim = NUM_AUS if variant == "no_llm" else llm.hidden_size
    proj = make_projector(variant, out_dim=out_dim, dropout=0.3)
    out = proj(torch.randn(2, F_MID_DIM), torch.randn(2, F_HIGH_DIM))
    assert out.shape == (2, out_dim)
    expected_in = {"f_high": 256, "prompt_learning": 256, "f_mid": 10368}.get(variant, 10624)
    assert proj.in_dim == expected_in
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    if variant in ("all", "f_high", "f_mid"):
        assert [m.out_features for m in linears] == [(expected_in + out_dim) // 2, out_dim]
    else:
        assert len(linears) == 1


def test_projector_rejects_unknown_variant() -> None:
    with pytest.raises(UserInputError, match="allowed: all, f_high"):
        make_projector("efp_minus", out_dim=8)


@pytest.mark.parametrize("position", TOKEN_POSITIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gives_one_logit_per_au(variant: str, position: str, llm: BaseLLM) -> None:
    model = AULLM.build(variant, NUM_AUS, llm, ModelSettings(token_position=position), seed=0)
    seen_vocab = []
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out: seen_vocab.append(1)
            if isinstance(out, torch.Tensor) and out.shape[-1] == TINY_VOCAB_SIZE
            else None
        )
        for m in model.modules()
    ]
    try:
        logits = model(clips())
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (3, NUM_AUS) and torch.isfinite(logits).all()
    assert not seen_vocab, "a module produced vocabulary-sized outputs (LM head logits)"
    assert (model.llm is None) == (variant == "no_llm")


def test_token_position_changes_the_sequence(llm: BaseLLM) -> None:
    x = clips()
    out = {}
    for position in TOKEN_POSITIONS:
        model = AULLM.build("f_high", NUM_AUS, llm, ModelSettings(token_position=position), seed=3).eval()
        with torch.no_grad():
            out[position] = model(x)
    assert not torch.allclose(out["prepend"], out["append"])


def test_prompt_learning_fusions(llm: BaseLLM) -> None:
    late = AULLM.build("prompt_learning", NUM_AUS, llm, ModelSettings(prompt_fusion="late"), seed=0)
    early = AULLM.build("prompt_learning", NUM_AUS, llm, ModelSettings(prompt_fusion="early"), seed=0)
    assert late.prompt_vectors is not None and late.prompt_vectors.shape == (4, llm.hidden_size)
    assert late.head.in_features == 2 * llm.hidden_size and early.head.in_features == llm.hidden_size
    for model in (late, early):
        model(clips()).sum().backward()
        assert model.prompt_vectors.grad is not None and model.prompt_vectors.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
    # no text prompt is embedded: the learnable vectors replace it
    assert late.prompt_embeds is None


def test_base_llm_is_frozen_and_only_cell_weights_train(llm: BaseLLM) -> None:
    for variant in ("all", "prompt_learning"):
        model = AULLM.build(variant, NUM_AUS, llm, seed=0)
        trainable = {id(p) for p in model.trainable_parameters()}
        for name, p in model.llm.named_parameters():
            assert (id(p) in trainable) == ("lora_" in name), name
        for module in (model.backbone, model.projector, model.head):
            assert all(id(p) in trainable for p in module.parameters())
        if model.prompt_vectors is not None:
            assert id(model.prompt_vectors) in trainable
    # a few real optimiser steps (f_high: small enough to be quick)
    model = AULLM.build("f_high", NUM_AUS, llm, seed=0)
    base_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" in n}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    target = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]])
    for _ in range(2):  # lora_B starts at 0, so lora_A only moves from the second step
        opt.zero_grad()
        AsymmetricLoss()(model(clips()), target).backward()
        opt.step()
    after = dict(model.llm.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    assert all(not torch.equal(after[n], v) for n, v in lora_before.items())
    state = model.cell_state_dict()
    assert any("lora_A" in k for k in state) and not any(k.startswith("llm.") and "lora_" not in k for k in state)
    assert "head.weight" in state and "backbone.led.log_alpha" in state


def _train_and_predict(model: AULLM, steps: int = 2) -> torch.Tensor:
    torch.manual_seed(11)  # dropout masks
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=0.005)
    target = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]])
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        AsymmetricLoss()(model(clips()), target).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(clips(seed=1))


def test_reused_llm_after_reset_equals_fresh_load(tiny_llm: Path, llm: BaseLLM) -> None:
    # A job that trained another cell before (LoRA weights moved) ...
    _train_and_predict(AULLM.build("f_high", NUM_AUS, llm, seed=99), steps=1)
    torch.manual_seed(1234)  # ... and whose global RNG is elsewhere
    # f_high: the smallest LLM variant (the projector is not what is under test here)
    reused = _train_and_predict(AULLM.build("f_high", NUM_AUS, llm, seed=7))
    fresh_llm = load_base_llm(tiny_llm)
    fresh = _train_and_predict(AULLM.build("f_high", NUM_AUS, fresh_llm, seed=7))
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    other_seed = _train_and_predict(AULLM.build("f_high", NUM_AUS, fresh_llm, seed=8))
    assert not torch.allclose(fresh, other_seed)


def test_bad_variant_is_a_user_error(llm: BaseLLM) -> None:
    with pytest.raises(UserInputError, match="variant: 'EFP-' is not allowed; allowed: all, f_high"):
        AULLM.build("EFP-", NUM_AUS, llm)


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserInputError, match="token_position: 'middle' is not allowed; allowed: prepend, append"):
        ModelSettings(token_position="middle")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="prompt_fusion"):
        ModelSettings(prompt_fusion="mid")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="num_prompt_vectors"):
        ModelSettings(num_prompt_vectors=0)


def test_llm_variants_need_an_llm() -> None:
    with pytest.raises(ValueError, match="needs an LLM"):
        AULLM("all", NUM_AUS, None)
    assert AULLM("no_llm", NUM_AUS, None)(clips(2)).shape == (2, NUM_AUS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # the paper recipe's on a GPU; the script's fp16_llm
def test_half_precision_llm_with_float32_cell_modules(tiny_llm: Path, dtype: str) -> None:
    """A 16-bit base LLM (loaded so, no autocast) between fp32 cell modules: the visual
    token is cast down into the LLM, its last hidden state back up for the fp32 head,
    and the LoRA weights Adam updates stay fp32."""
    llm16 = load_base_llm(tiny_llm, dtype=dtype)
    assert llm16.dtype == getattr(torch, dtype)
    model = AULLM.build("all", NUM_AUS, llm16, seed=0)
    logits = model(clips(2))
    assert logits.dtype == torch.float32 and logits.shape == (2, NUM_AUS)
    logits.sum().backward()
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()
    lora = llm16.lora_parameters()
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_llm_dtype_per_precision() -> None:
    from aullm.train import llm_dtype

    assert llm_dtype("auto", on_gpu=True) == torch.bfloat16 and llm_dtype("auto", on_gpu=False) == torch.float32
    assert llm_dtype("fp16_llm", on_gpu=True) == torch.float16 and llm_dtype("fp16_llm", on_gpu=False) == torch.float32
    assert llm_dtype("bf16", on_gpu=False) == torch.bfloat16 and llm_dtype("fp32", on_gpu=True) == torch.float32


def test_prompt_learning_defaults_to_early_fusion(llm: BaseLLM) -> None:
    """The default reading feeds each clip's own token to the LLM: two clips give two
    different last hidden states (under `late` the LLM's output is one constant)."""
    model = AULLM.build("prompt_learning", NUM_AUS, llm, seed=0).eval()
    assert model.settings.prompt_fusion == "early" and not model.late_fusion
    seen: list[torch.Tensor] = []
    handle = model.head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    with torch.no_grad():
        model(clips(batch=2))
    handle.remove()
    assert not torch.allclose(seen[0][0], seen[0][1])


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_efp_activation_bounds_the_visual_token(activation: str, llm: BaseLLM) -> None:
    proj = make_projector("all", out_dim=llm.hidden_size, dropout=0.0, activation=activation)
    token = proj(torch.randn(3, F_MID_DIM) * 50, torch.randn(3, F_HIGH_DIM) * 50)
    low = -1.0 if activation == "tanh" else 0.0
    assert token.min() >= low and token.max() <= 1.0
    assert token.abs().max() > 0.5  # the activation really ran on a large pre-activation
    plain = make_projector("all", out_dim=llm.hidden_size, dropout=0.0, activation="none")
    assert isinstance(plain.net[-1], torch.nn.Linear)
    with pytest.raises(UserInputError, match="efp_activation"):
        make_projector("all", out_dim=8, activation="swish")


def test_a_tokenizer_bos_stays_first_in_either_token_position(tiny_llm: Path) -> None:
    """A tokenizer that adds a BOS (as DeepSeek-R1-Distill's does): with
    prompt_special_tokens=tokenizer the sequence is [BOS, token, prompt] (prepend) or
    [BOS, prompt, token] (append, the script's tokenizer(prompt) then the token)."""
    from tokenizers.processors import TemplateProcessing

    llm = load_base_llm(tiny_llm)
    bos = "<|endoftext|>"
    bos_id = llm.tokenizer.convert_tokens_to_ids(bos)
    llm.tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    prefix, text = llm.embed_prompt_parts(PAPER_PROMPT, special_tokens=True)
    bos_embedding = llm.input_embeddings.weight[bos_id]
    assert prefix.shape[1] == 1 and torch.equal(prefix[0, 0], bos_embedding)
    assert torch.equal(text, llm.embed_prompt(PAPER_PROMPT))
    for position in ("prepend", "append"):
        model = AULLM.build("all", NUM_AUS, llm, ModelSettings(token_position=position), seed=0).eval()
        seqs: list[torch.Tensor] = []
        original = llm.last_hidden
        llm.last_hidden = lambda seq, *a, **k: (seqs.append(seq), original(seq, *a, **k))[1]  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                model(clips(batch=1))
        finally:
            del llm.last_hidden
        seq = seqs[0][0]
        assert seq.shape[0] == 1 + text.shape[1] + 1
        assert torch.equal(seq[0], bos_embedding)
        body = seq[2:] if position == "prepend" else seq[1:-1]
        assert torch.equal(body, text[0])
    none = AULLM.build("all", NUM_AUS, llm, ModelSettings(prompt_special_tokens="none"), seed=0)
    assert none.prompt_prefix.shape[1] == 0
