"""The training loop's collectives under a real process group: values, and every tensor on the group's device."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from explicitlm.distributed import allreduce_min, allreduce_sum, broadcast_, collective_device, gather, group_device
from tests.conftest import free_port


def _ranks(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = []
    c10d = dist.distributed_c10d  # all_gather_object calls all_gather from here
    real = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather")}

    def spy(name):
        def call(*args, **kwargs):
            tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
            seen.append([name, sorted({str(t.device) for t in tensors})])
            return real[name](*args, **kwargs)

        return call

    for name in real:  # the real collectives run; the spy only records the devices they were given
        setattr(dist, name, spy(name))
        setattr(c10d, name, getattr(dist, name))
    try:
        params = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1))]
        broadcast_(params, src=0)
        result = {
            "backend": dist.get_backend(),
            "group_device": str(collective_device()),
            "min": allreduce_min(7 - rank),
            "sum": allreduce_sum(torch.tensor([rank + 1, 10 * rank])).tolist(),
            "gathered": gather({"rank": rank, "n": 5 * rank}),
            "broadcast": [p.flatten().tolist() for p in params],
            "seen": seen,
        }
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
            setattr(c10d, name, fn)
        dist.destroy_process_group()
    with open(f"{out}/{rank}.json", "w") as fh:
        json.dump(result, fh)


def test_reductions_run_on_the_process_groups_device(tmp_path):
    mp.start_processes(_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["backend"] == "gloo" and r["group_device"] == "cpu"
        assert r["min"] == 6  # min(7, 6)
        assert r["sum"] == [3, 10]  # [1, 0] + [2, 10]
        assert r["gathered"] == [{"rank": 0, "n": 0}, {"rank": 1, "n": 5}]
        assert r["broadcast"] == [[1.0, 1.0, 1.0], [10.0] * 4]  # rank 0's values everywhere
        names = [name for name, _ in r["seen"]]
        assert names.count("broadcast") >= 2 and "all_reduce" in names and "all_gather" in names
        assert all(devices == [r["group_device"]] for _, devices in r["seen"]), r["seen"]


def test_nccl_groups_take_tensors_on_the_current_cuda_device():
    """NCCL rejects CPU tensors: a GPU worker's reductions are made on its own CUDA device."""
    assert group_device("nccl", cuda_index=3) == torch.device("cuda", 3)
    assert group_device("gloo") == torch.device("cpu")
    assert group_device("cpu:gloo,cuda:nccl") == torch.device("cpu")  # gloo carries the CPU tensors
    assert collective_device() == torch.device("cpu")  # no group in this process
    assert allreduce_min(4) == 4 and gather("x") == ["x"]
    assert allreduce_sum(torch.tensor([2, 5])).tolist() == [2, 5]
