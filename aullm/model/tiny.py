"""A tiny Qwen2 checkpoint + offline tokenizer, for tests, CI and CPU demo sweeps.

It is saved exactly like a real hub checkpoint (a `Qwen2ForCausalLM` with
`save_pretrained`, and a tokenizer directory), so the real loading path
(`aullm.model.llm.load_base_llm`) is what every test exercises.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from aullm.constants import PAPER_PROMPT
from aullm.errors import UserInputError

TINY_VOCAB_SIZE = 1000
# Bump when the recipe below changes, so stale cached directories are noticed.
TINY_FORMAT_VERSION = 1
MARKER = "aullm_tiny.json"

# Text the byte-level BPE is trained on. Byte-level pre-tokenisation means any text
# still tokenises (into bytes) without an unknown token; this corpus only decides
# which words get short encodings.
_CORPUS = (
    PAPER_PROMPT,
    "Analyze the facial features to classify action units.",
    "Describe the micro-expression in this face clip and detect the action units.",
    "Action unit 1 inner brow raiser, 2 outer brow raiser, 4 brow lowerer, 6 cheek raiser,",
    "7 lid tightener, 12 lip corner puller, 14 dimpler, 15 lip corner depressor,",
    "17 chin raiser, 45 blink. Onset apex offset frames of a subtle facial movement.",
    "The quick brown fox jumps over the lazy dog while the camera records at 200 fps.",
)


def _train_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    if tok.get_vocab_size() > TINY_VOCAB_SIZE:  # the model's embedding table must cover every id
        raise RuntimeError(f"tiny tokenizer vocabulary {tok.get_vocab_size()} > {TINY_VOCAB_SIZE}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )


def _is_built(path: Path) -> dict | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_tiny_llm(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 (2 layers, hidden 64) and its tokenizer to `out_dir`.

    Idempotent and safe to call from concurrent processes: the checkpoint is written
    to a temporary sibling directory and renamed into place; whoever renames first
    wins and the others discard their copy (same seed -> identical weights anyway).
    """
    out = Path(out_dir)
    want = {"format": TINY_FORMAT_VERSION, "seed": seed}
    found = _is_built(out)
    if found == want:
        return out
    if found is not None:
        raise UserInputError(
            f"{out}: holds a tiny LLM built with {found}, not {want}; use another directory or delete it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out}: exists and is not a tiny-LLM directory; give an empty or new directory")

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = Qwen2Config(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,  # as in the 1.5B Qwen2 family
        )
        # fork_rng: building test fixtures must not shift the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
        # Saved as plain weights, before anything could wrap it with PEFT (PEFT injects
        # LoRA in place; a base saved afterwards reloads with random q/v weights).
        model.save_pretrained(tmp)
        tokenizer = _train_tokenizer()
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(want))
        try:
            os.rename(tmp, out)  # replaces `out` only if it is an empty directory
        except OSError:
            if _is_built(out) != want:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
