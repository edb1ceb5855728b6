"""The model process's resident memory under batches of every size: float32 against bfloat16, and
bfloat16 with oneDNN's primitive cache at the library's default against `serve.onednn_cache`.

    python benchmarks/serve_memory.py --weights runs/default/sft_latest [--passes 6] [--batches 60] [--cache 256]

Each variant runs in a process of its own (oneDNN reads its cache's capacity once, at its first
kernel): the server's own entry, `MemoryModel.answer`, takes a fixed sequence of `--batches` batches of
1-32 sample-world questions with four options each, `--passes` times. Per pass: the process's resident
set after it (RSS, MB) and milliseconds per question. The sequence is the same every pass, so what
grows after the first pass is not kernels for new shapes. Variants:
- float32: `serve.dtype=float32`;
- bfloat16, library cache: `serve.dtype=bfloat16`, ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 (oneDNN's default);
- bfloat16: `serve.dtype=bfloat16` and `serve.onednn_cache=--cache` (default: the key's default).
The last line is one JSON object: each variant's passes and, beside float32, its last pass's RSS and
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

from explicitlm.config import ServeConfig
from serving.service import ONEDNN_CACHE

LIBRARY_DEFAULT = 1024
VARIANTS = {
    "float32": ("float32", None),
    "bfloat16_library_cache": ("bfloat16", LIBRARY_DEFAULT),
    "bfloat16": ("bfloat16", None),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(weights: str, dtype: str, passes: int, batches: int, cache: int) -> dict:
    """One variant, in this process: its passes."""
    from explicitlm.config import load_config
    from explicitlm.loading import fill_from_weights
    from explicitlm.scoring import Question
    from explicitlm.world import geography_facts, make_questions
    from serving.service import MemoryModel

    overrides = [f"serve.weights={weights}", f"serve.dtype={dtype}", f"serve.onednn_cache={cache}"]
    cfg = fill_from_weights(load_config(None, overrides), weights)
    model = MemoryModel(cfg)  # the training bank read as it is: nothing here edits it
    pool = [
        Question(t["question"], [o.split(":", 1)[1] for o in t["options"].split(",")])
        for t in make_questions(geography_facts(), seed=1)
    ]
    rng = random.Random(0)
    sizes = [rng.randint(1, 32) for _ in range(batches)]
    starts = [rng.randint(0, len(pool) - size) for size in sizes]
    out = {"rss_mb_loaded": round(rss_mb(), 1), "rss_mb": [], "ms_per_question": []}
    for _ in range(passes):
        t = time.perf_counter()
        for size, start in zip(sizes, starts):
            model.answer(pool[start : start + size])
        out["ms_per_question"].append(round(1000 * (time.perf_counter() - t) / sum(sizes), 2))
        out["rss_mb"].append(round(rss_mb(), 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument(
        "--cache", type=int, default=ServeConfig.onednn_cache, help="serve.onednn_cache of the capped variant"
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.weights, args.child, args.passes, args.batches, args.cache)))
        return
    result = {"passes": args.passes, "batches": args.batches, "cache": args.cache, "variants": {}}
    for name, (dtype, capacity) in VARIANTS.items():
        env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE}
        if capacity is not None:
            env[ONEDNN_CACHE] = str(capacity)
        cmd = [sys.executable, __file__, "--weights", args.weights, "--child", dtype]
        cmd += ["--passes", str(args.passes), "--batches", str(args.batches), "--cache", str(args.cache)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{name} failed:\n{run.stderr[-4000:]}")
        result["variants"][name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(result['variants'][name])}", flush=True)
    base = result["variants"]["float32"]
    for v in result["variants"].values():
        v["rss_mb_over_float32"] = round(v["rss_mb"][-1] - base["rss_mb"][-1], 1)
        v["speed_over_float32"] = round(base["ms_per_question"][-1] / v["ms_per_question"][-1], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
