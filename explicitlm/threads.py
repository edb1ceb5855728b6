"""Small torch work on one thread.

An edit touches a few rows: its torch ops are tiny, yet each one torch runs in parallel leaves
OpenMP's worker threads spinning afterwards, waiting for more work (GNU OpenMP spins some 300,000
times before it sleeps). On a server whose cores the forward pass needs, that spinning cost about
6 ms of CPU per edit, twice the edit itself. `one_thread()` runs such work with torch on one
thread, and gives it its thread count back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside, and the thread count as it was afterwards.

    With torch's OpenMP backend a thread that has run parallel work keeps its own count, so a forward
    pass in another thread is not slowed; but the call also sets the count a thread takes on its
    first parallel op. So use it where no thread starts torch work meanwhile: a model's edits, under
    the lock its forward passes and loading also take."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
