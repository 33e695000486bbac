"""Redaction hides credentials and nothing else (issue 15.1): a table of names on each side.

A training setting shown as ``***`` in MLflow (every cell's ``token_position`` once was)
is a record lost; a credential shown in clear is a leak. Both lists are checked as field
names (params, tags) and as environment variable names (whose values are scrubbed from
everything written)."""

from __future__ import annotations

import pytest

from orchestrator.tracking import config

CREDENTIALS = [
    "hf_token", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "api_key", "apiKey", "API_KEY", "WANDB_API_KEY", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY",
    "aws_access_key_id", "password", "db.password", "DB_PASSWD", "secret", "client_secret", "token",
    "access_token", "refresh_token", "auth_token", "GITHUB_TOKEN", "bearer", "ssh_private_key",
    "credentials", "GOOGLE_APPLICATION_CREDENTIALS", "session_token", "authorization", "x-api-key",
]  # fmt: skip
SETTINGS = [
    "token_position", "max_tokens", "tokenizer_path", "tokenizer", "num_tokens", "tokens", "pad_token",
    "pad_token_id", "eos_token", "visual_token", "token_count", "max_new_tokens", "keyframes",
    "key_frames", "sort_key", "cache_key", "key", "monkey", "TOKENIZERS_PARALLELISM", "keywords",
    "train.lr", "prompt", "secretary", "author", "passage", "hotkey", "turkey_subjects",
]  # fmt: skip


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credential_names_are_hidden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.is_secret_name(name)
    assert config.redact({name: "value-1234"}) == {name: "***"}
    # as an environment variable: its value is scrubbed wherever it appears
    monkeypatch.setenv(name.replace(".", "_").replace("-", "_"), "Zq9-cred-value")
    assert config.redact({"note": "uses Zq9-cred-value here"}) == {"note": "uses *** here"}


@pytest.mark.parametrize("name", SETTINGS)
def test_setting_names_are_kept(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not config.is_secret_name(name)
    assert config.redact({name: "prepend"}) == {name: "prepend"}
    monkeypatch.setenv(name.replace(".", "_"), "prepend")
    assert config.redact({"train.token_position": "prepend"}) == {"train.token_position": "prepend"}


def test_tables_are_large_enough() -> None:
    assert len(CREDENTIALS) >= 20 and len(SETTINGS) >= 20
    assert not set(CREDENTIALS) & set(SETTINGS)
