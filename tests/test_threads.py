"""Edits run torch on one thread, and the thread count comes back afterwards, also after an error."""

import pytest
import torch

from explicitlm.threads import one_thread


def test_one_thread_inside_and_the_count_restored_after_nesting_and_errors():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            with one_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the inner exit leaves the outer use on one thread
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("an edit that failed")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
