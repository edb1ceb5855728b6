"""Where this process stands in a data-parallel run, and the collectives the training loop needs.

Each works unchanged in a single process (tests, benchmarks): rank 0 of a world of 1. Every tensor
handed to a collective lives on the process group's device: NCCL (Ray Train's group on GPU workers)
rejects CPU tensors, gloo takes CPU tensors.
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


def group_device(backend: str, cuda_index: int | None = None) -> torch.device:
    """The device a process group of `backend` takes tensors on.

    "nccl" communicates CUDA tensors only, on this process's current CUDA device (Ray Train sets it
    per worker); gloo, and mixed groups such as "cpu:gloo,cuda:nccl", take CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")


def collective_device() -> torch.device:
    """The current process group's device (CPU when there is no group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return group_device(dist.get_backend())


def allreduce_min(value: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` summed, on `t`'s device (a copy travels through the group's device)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t.detach().clone()
    on_group = t.detach().to(collective_device(), copy=True)
    dist.all_reduce(on_group, op=dist.ReduceOp.SUM)
    return on_group.to(t.device)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s values; a tensor off the group's device
    travels through a copy on it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = collective_device()
    for t in tensors:
        if t.device == device:
            dist.broadcast(t, src=src)
        else:
            on_group = t.detach().to(device)
            dist.broadcast(on_group, src=src)
            t.copy_(on_group)


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order. Under NCCL, torch pickles it to a tensor on the current
    CUDA device, which Ray Train sets for each worker."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
