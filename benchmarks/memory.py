"""Retrieval as the bank grows: the product-key index against what a user would pick instead.

    python benchmarks/memory.py [--sizes 65536,262144,1048576] [--batch 16]

Banks of N rows of words with a natural spread (a Zipf vocabulary for relation and object words,
two rare name words per row, as in fact sentences) and questions that name a row's subject with some
of its other words, plus words no row has. For each N, the same queries go through:
- ours: the index's candidates (product-key probe, int8 ranking on a CPU) and the rows listed under
  the question's rarest words (`explicitlm.postings`), scored exactly by TF-IDF cosine and coverage
  (the model's own code path), top 8;
- an exact dense scan of every key (one matrix product), then the same exact scoring;
- FAISS over the same keys: an exact flat index, and IVF (nlist = 4 sqrt(N)) with nprobe chosen so
  its candidates find the question's own row as often as ours do.
It reports time per batch, recall@1 of the question's own row, and the time of one edit (ours:
refresh the row's key and lists at once; FAISS IVF: remove and re-add the vector). The last line is one JSON
object with the figures and ratios against each baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from explicitlm.bank import MemoryBank
from explicitlm.config import ModelConfig
from explicitlm.index import ProductKeyIndex, lexical_keys, lexical_vectors
from explicitlm.postings import Postings
from explicitlm.retrieval import find_candidates, word_overlap

L, K, C = 16, ModelConfig.knowledge_dim, ModelConfig.candidates


def best_of(fn, repeat: int = 5) -> float:
    """Best of `repeat` runs: noise on a shared host only ever adds time."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_bank(n: int, g: torch.Generator) -> MemoryBank:
    """Rows of 8-12 words: 6-10 from a Zipf vocabulary of 200 K words, then two names of their own."""
    common = torch.multinomial(1.0 / torch.arange(1, 200_001).float(), n * 10, replacement=True, generator=g)
    words = torch.zeros(n, L, dtype=torch.long)
    words[:, :10] = common.view(n, 10) + 1
    words[:, 10] = torch.arange(n) * 2 + 1_000_001  # a row's own subject: two words no other row has
    words[:, 11] = torch.arange(n) * 2 + 1_000_002
    length = torch.randint(6, 11, (n,), generator=g)
    keep = torch.arange(L)[None, :] < length[:, None]
    keep[:, 10:12] = True
    words = words * keep
    return MemoryBank(words % 50_000, keep, words, [str(i) for i in range(n)], [""] * n, "bench", 0)


def make_questions(bank: MemoryBank, rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A question per row: its subject, half of its other words, and three words no row has."""
    w = bank.word_ids[rows].clone()
    drop = torch.rand(w.shape, generator=g) < 0.5
    drop[:, 10:12] = False
    w[drop] = 0
    extra = torch.randint(5_000_000, 6_000_000, (len(rows), 3), generator=g)
    return torch.cat([w, extra], 1)  # (B, L + 3)


def exact_top(bank: MemoryBank, cand: torch.Tensor, valid: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """The model's exact stage over candidates: cosine + coverage, best row."""
    qs = question.sort(1).values
    m = ModelConfig()
    lexical, _ = word_overlap(bank, cand, qs, torch.zeros_like(qs), m.match_power, m.coverage_weight)
    return cand.gather(1, lexical.masked_fill(~valid, -1e9).argmax(1, keepdim=True)).squeeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="65536,262144,1048576")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queries", type=int, default=512, help="questions for the recall figures")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cfg = ModelConfig()
    results: dict = {"batch": args.batch, "knowledge_dim": K, "candidates": C, "sizes": {}}
    for n in [int(s) for s in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(n)
        bank = make_bank(n, g)
        t0 = time.perf_counter()
        raw = lexical_keys(bank.word_ids, bank.counts, K, 0)
        index = ProductKeyIndex.build(raw, cfg.max_cell_rows, 0, cfg.max_recent_rows)
        postings = Postings.build(bank.word_ids)
        build_s = time.perf_counter() - t0
        rows = torch.randint(0, n, (args.queries,), generator=g)
        question = make_questions(bank, rows, g)
        batch = question[: args.batch]

        def ours(q=batch):
            c = find_candidates(
                bank,
                index,
                q,
                torch.zeros_like(q),
                C,
                cfg.top_cells,
                cfg.probe_cells,
                0,
                cfg.match_power,
                cfg.coverage_weight,
                0,
                None,
                postings,
                cfg.posting_rows,
            )
            return c.rows.gather(1, c.lexical.masked_fill(~c.selectable, -1e9).argmax(1, keepdim=True)).squeeze(1)

        def scan(q=batch):
            qv = index.centred(lexical_vectors(q, bank.counts, K, 0, known_only=True))
            cand = (qv.to(torch.bfloat16) @ index.keys.T).float().topk(C, dim=1).indices
            return exact_top(bank, cand, torch.ones_like(cand, dtype=torch.bool), q)

        keys = index.keys.float().numpy()
        flat = faiss.IndexFlatIP(K)
        flat.add(keys)
        nlist = 4 * int(np.sqrt(n))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(K), K, nlist, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        ivf.train(keys[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
        ivf.add(keys)
        ivf_build_s = time.perf_counter() - t0

        def via_faiss(fi, q=batch):
            qv = index.centred(lexical_vectors(q, bank.counts, K, 0, known_only=True)).numpy()
            _, cand = fi.search(qv, C)
            cand = torch.from_numpy(cand).clamp(min=0)
            return exact_top(bank, cand, torch.ones_like(cand, dtype=torch.bool), q)

        def recall(fn) -> float:
            found = [fn(question[i : i + 64]) == rows[i : i + 64] for i in range(0, len(rows), 64)]
            return torch.cat(found).float().mean().item()

        r_ours = recall(ours)
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):  # the cheapest IVF that finds rows as well as ours
            ivf.nprobe = nprobe
            r_ivf = recall(lambda q: via_faiss(ivf, q))
            if r_ivf >= r_ours - 0.005:
                break
        entry = {
            "build_s": round(build_s, 1),
            "ivf_build_s": round(ivf_build_s, 1),
            "recall@1": {"ours": r_ours, "scan": recall(scan), "faiss_flat": recall(lambda q: via_faiss(flat, q)),
                         "faiss_ivf": r_ivf},
            "ivf_nprobe": nprobe,
            "ms": {"ours": 1000 * best_of(ours), "scan": 1000 * best_of(scan),
                   "faiss_flat": 1000 * best_of(lambda: via_faiss(flat)), "faiss_ivf": 1000 * best_of(lambda: via_faiss(ivf))},
        }  # fmt: skip
        entry["ms"] = {k: round(v, 2) for k, v in entry["ms"].items()}
        # ---- one edit: the row's new words take effect at once
        new_words = bank.word_ids[:1].clone()
        new_words[0, 10:12] = torch.tensor([7_000_001, 7_000_002])

        def edit_ours():
            index.update_row(0, lexical_vectors(new_words, bank.counts, K, 0)[0])
            postings.add(0, new_words[0])

        vec = keys[:1].copy()

        def edit_ivf():
            ivf.remove_ids(np.array([0], dtype=np.int64))
            ivf.add_with_ids(vec, np.array([0], dtype=np.int64))

        entry["edit_ms"] = {
            "ours": round(1000 * best_of(edit_ours), 3),
            "faiss_ivf": round(1000 * best_of(edit_ivf), 3),
        }
        entry["speedup"] = {
            k: round(entry["ms"][k] / entry["ms"]["ours"], 2) for k in ("scan", "faiss_flat", "faiss_ivf")
        }
        results["sizes"][n] = entry
        print(f"N={n}: {json.dumps(entry)}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
