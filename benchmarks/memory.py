"""Memory read and retrieval cost as the bank grows.

    python benchmarks/memory.py [--sizes 16384,65536,262144,1048576] [--batch 16]

1. Memory read of one training step (every layer's candidate vectors, scores and top-k values)
   against a baseline written like the reference: candidate row vectors embedded from their tokens
   per step, 32 rows at a time, in a Python loop. Both score the same candidates, at N = 65,536
   and N = 1,048,576.
2. Retrieval (query -> product-key cells -> exact rerank -> top-k) as N grows from 16 K to 1 M,
   with a dense scan over all keys beside it.
The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from explicitlm.index import ProductKeyIndex, inverse_document_frequency, n_sub_keys, row_vectors
from explicitlm.model import MemorySettings
from explicitlm.modules import MemoryGate, key_projection

V, D, K, L, LAYERS = 8192, 256, 128, 16, 4


def timeit(fn, repeat: int = 7) -> float:
    """Best of `repeat` runs. On this shared host a run's speed drifts by tens of percent within a
    minute; noise only ever adds time, so the best run is the steadiest estimate (as `timeit` advises)."""
    return timeit_pair(fn, lambda: None, repeat)[0]


def timeit_pair(fa, fb, repeat: int = 7) -> tuple[float, float]:
    """Best times of fa and fb (see `timeit`), measured alternately so both see the same machine."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(ta), min(tb)


def make_bank(n: int, g: torch.Generator):
    ids = torch.randint(10, V, (n, L), generator=g)
    lengths = torch.randint(6, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return ids, mask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="16384,65536,262144,1048576")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-cells", type=int, default=0, help="default: model.top_cells")
    p.add_argument("--probe-cells", type=int, default=0, help="default: model.probe_cells")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, D, generator=g) * 0.02
    proj = key_projection(D, K, 0)
    ms = MemorySettings()  # the default retrieval breadth, unless asked otherwise
    ms.top_cells = args.top_cells or ms.top_cells
    ms.probe_cells = args.probe_cells or ms.probe_cells
    gate = MemoryGate(D, proj, ms.top_cells, ms.probe_cells, ms.top_k, scan_rows=ms.scan_rows).eval()
    results = {
        "sizes": {},
        "batch": args.batch,
        "layers": LAYERS,
        "dim": D,
        "knowledge_dim": K,
        "top_cells": ms.top_cells,
        "probe_cells": ms.probe_cells,
        "max_cell_rows": ms.max_cell_rows,
    }
    for n in [int(s) for s in args.sizes.split(",")]:
        ids, mask = make_bank(n, g)
        t0 = time.perf_counter()
        idf = inverse_document_frequency(ids, mask, V)
        keys = row_vectors(ids, mask, E @ proj.T, idf)  # one batched op: (N, K)
        keys = keys - keys.mean(0)
        build_keys = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = ProductKeyIndex(keys, n_sub_keys(n), max_cell_rows=ms.max_cell_rows)
        build_index = time.perf_counter() - t0
        h = torch.randn(args.batch, 24, D, generator=g)
        qw = torch.ones(args.batch, 24)

        def retrieve():
            with torch.no_grad():
                return gate(h, qw, index)

        def dense():
            with torch.no_grad():
                q = gate.query(h.mean(1))
                return (q @ index.keys.T).topk(8, dim=1)

        rows, weights, _ = retrieve()

        # ---- memory read of one step: candidates' vectors, scores, top-k values, for every layer
        pooled = h.mean(1)
        q = gate.query(pooled)
        t1, i1 = (q @ index.sub1.T).topk(ms.top_cells, dim=1)
        t2, i2 = (q @ index.sub2.T).topk(ms.top_cells, dim=1)
        best = (t1[:, :, None] + t2[:, None, :]).flatten(1).topk(ms.probe_cells, dim=1).indices
        cells = (i1[:, :, None] * index.n2 + i2[:, None, :]).flatten(1).gather(1, best)
        cand, valid = index.candidates(cells)

        def ours():  # the model's own code path: gate, then the top-k rows' values
            with torch.no_grad():
                for _ in range(LAYERS):
                    r, w, _ = gate(h, qw, index)
                    row_vectors(ids[r].reshape(-1, L), mask[r].reshape(-1, L), E, idf)

        table = E @ proj.T

        def reference_like():
            with torch.no_grad():
                for _ in range(LAYERS):
                    flat = cand[valid]  # the same real candidates the model scores
                    vecs = []
                    for start in range(0, len(flat), 32):  # 32 rows at a time, embedded every step
                        chunk = flat[start : start + 32]
                        emb = table[ids[chunk]]  # (32, L, K)
                        m = mask[chunk].unsqueeze(-1).float()
                        vecs.append(F.normalize((emb * m).sum(1) / m.sum(1), dim=-1))
                    kv = torch.zeros(*cand.shape, K)
                    kv[valid] = torch.cat(vecs)
                    s = torch.einsum("bk,bck->bc", q, kv).masked_fill(~valid, -math.inf)
                    top = s.topk(8, dim=1).indices
                    r = cand.gather(1, top)
                    vals = []
                    for start in range(0, r.numel(), 32):
                        chunk = r.flatten()[start : start + 32]
                        vals.append(E[ids[chunk]].mean(1))
                    torch.cat(vals)

        entry = {
            "build_keys_s": round(build_keys, 3),
            "build_index_s": round(build_index, 3),
            "candidates_per_query": int(valid.sum(1).float().mean()),
            "retrieval_ms": round(1000 * timeit(retrieve), 3),
            "dense_scan_ms": round(1000 * timeit(dense), 3),
        }
        if n in (65536, 1048576):
            t_ours, t_ref = timeit_pair(ours, reference_like)
            entry["memory_read_ms"] = round(1000 * t_ours, 3)
            entry["reference_like_read_ms"] = round(1000 * t_ref, 3)
            entry["read_speedup"] = round(entry["reference_like_read_ms"] / entry["memory_read_ms"], 1)
        results["sizes"][n] = entry
        print(f"N={n}: {entry}", flush=True)
    sizes = sorted(results["sizes"])
    first, last = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
    results["retrieval_growth"] = round(last["retrieval_ms"] / first["retrieval_ms"], 2)
    results["dense_growth"] = round(last["dense_scan_ms"] / first["dense_scan_ms"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
