"""Where this process stands in a data-parallel run, and the collectives the training loop needs.

Each works unchanged in a single process (tests, benchmarks): rank 0 of a world of 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def train_context():
    """(rank, world size, device, under Ray Train?) inside a Ray Train worker, or a single-process stand-in."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        import ray.train.torch

        return rank, world, ray.train.torch.get_device(), True
    except Exception:  # not inside a Ray Train worker
        return 0, 1, torch.device("cpu"), False


def allreduce_min(value: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
