"""The in-process training tests take one torch thread for their module and give it back."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import one_torch_thread


def test_one_thread_inside_and_the_count_before_restored_after_even_on_error() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a count other than 1, so "restored" and "left at 1" differ
    try:
        with pytest.raises(RuntimeError), one_torch_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("a failing test inside the block")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
