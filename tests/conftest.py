"""Shared fixtures: synthetic datasets and the tiny LLM, built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# No code path may reach the Hugging Face hub: a hub id fails fast instead of retrying for 24 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle", type=int, metavar="SEED", default=None,
                     help="run the modules, and each module's tests, in an order drawn from SEED (tests/order.py)")


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--shuffle")
    return None if seed is None else f"test order: shuffled with seed {seed} (rerun with --shuffle {seed})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is not None:
        from tests.order import shuffled

        items[:] = shuffled(items, lambda item: item.nodeid.split("::", 1)[0], seed=seed)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 saved to disk, loaded through the same from_pretrained path as a 1.5B checkpoint."""
    from aullm.model.tiny import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory):
    """The synthetic datasets and tiny LLM of the grid tests (tests/helpers.shared_assets,
    built once per test process). tests/test_faults.py overrides it to start Slurm first."""
    from tests.helpers import shared_assets

    return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def two_fold_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-cell two-fold sweep trained in one process (the debug executor, inside the CLI):
    what the multi-process and DeepSpeed end-to-end tests must equal. Module scope, not
    session: a module's autouse fixtures (test_multiprocess's one thread per process, which
    the reference requires) then come first; the training itself is cached per test process."""
    from tests.helpers import shared_two_fold_reference

    return shared_two_fold_reference(tmp_path_factory)


@pytest.fixture(scope="session")
def casme2_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-subject synthetic dataset in the official CASME II layout."""
    from aullm.data.synth import write_synthetic

    return write_synthetic("casme2", tmp_path_factory.mktemp("data") / "casme2", subjects=6, seed=0)


@pytest.fixture(scope="session")
def samm_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aullm.data.synth import write_synthetic

    return write_synthetic("samm", tmp_path_factory.mktemp("data") / "samm", subjects=4, seed=1)


@pytest.fixture(scope="session")
def casme2_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 subjects x 2 clips in the CASME II layout: enough for the readers and the clip cache."""
    from aullm.data.synth import write_synthetic

    return write_synthetic("casme2", tmp_path_factory.mktemp("tiny") / "casme2", subjects=2, clips_per_subject=2)


@pytest.fixture
def casme2_copy(casme2_tiny: Path, tmp_path: Path) -> Path:
    """A private copy of `casme2_tiny`, for a test that damages or edits it."""
    return Path(shutil.copytree(casme2_tiny, tmp_path / "casme2"))
