"""Where one batched answer's time goes: the backbone, and each part of the memory.

    python benchmarks/forward_profile.py --weights runs/default/sft_latest [--batch 32] [--repeat 5] [--threads 0]
    python benchmarks/forward_profile.py --shape 0.6B --batch 8 --repeat 3     # the real job's backbone shape
    python benchmarks/forward_profile.py --weights W --bank-rows 1048576        # the weights' bank grown first

Loads the weights as the server does and answers one batch of the sample world's questions with four
options (the scorer `/answer` uses), then the same questions without options (generation, at most
serve.max_new_tokens tokens), `--repeat` times each. The memory's parts are timed by wrapping the
functions the model calls, in this process only (CPU: every op is synchronous, so wall time is theirs):
- candidates: the index probe, the inverted lists and the TF-IDF cosine (`find_candidates`);
- row features: the read rows' tokens and word features (`row_tokens`);
- reader: every layer's reading and the answer slots' values (`ExplicitLM._read`);
- fusion: the memory written at the answer positions (the layer hooks, less the readings in them);
- backbone: the rest of the forward pass (the frozen Qwen3, KV cache, logits).
The same batch with the memory off (`serve.memory=false`) gives the bare backbone's time beside it.
Median milliseconds per batch over the repeats; the last line is one JSON object.

With `--bank-rows N` the weights' bank is first grown to N rows with generated distractor sentences,
as `serve.py --bank-rows` grows it (in a temporary folder, removed when the profile ends).

With `--shape` (a published Qwen3 size, e.g. 0.6B) the backbone is a random one of that shape (its
151,936-token vocabulary; the weights' tokenizer and bank) and the memory modules are untrained, with
the real job's reader, fusion and query settings (`configs/sft_omcq.yaml`): what the memory costs
beside a backbone of the real job's size, where the tiny one's figures say little. Time does not
depend on trained values with options, so only that part runs (generation's length does).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from explicitlm.estimate import QWEN3_SHAPES

TIMES: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t

    return wrapper


# The memory's shape and reading in the real job's config; the index's settings stay the weights' (its
# cache is keyed by them, and the candidate search does not depend on the backbone).
REAL_JOB_KEYS = ("top_k", "reader_dim", "reader_encoder", "query_from", "fusion_dim", "min_trust", "exclusion")


def at_shape(cfg, name: str, folder: Path):
    """cfg with a random Qwen3-{name}, written to `folder`, as its backbone (the weights' tokenizer)
    and the real job's memory settings."""
    from transformers import AutoTokenizer

    from explicitlm.config import load_config
    from explicitlm.estimate import qwen3_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or imported from elsewhere
    from gpu import write_backbone

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path)
    write_backbone(folder, qwen3_config(name), tokenizer, torch.device("cpu"))
    real = load_config("sft_omcq", [f"model.qwen3_model_path={folder}"]).model
    cfg.model.qwen3_model_path = str(folder)
    for key in REAL_JOB_KEYS:
        setattr(cfg.model, key, getattr(real, key))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="auto", help="as serve.dtype: auto (the server's choice), float32 or bfloat16")
    p.add_argument(
        "--shape",
        default="",
        choices=["", *QWEN3_SHAPES],
        help="a published Qwen3 size: random backbone, untrained memory",
    )
    p.add_argument("--bank-rows", type=int, default=0, help="grow the weights' bank to this many rows first")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import explicitlm.model as model_module
    from explicitlm.config import load_config
    from explicitlm.loading import build_model, fill_from_weights, serving_dtype
    from explicitlm.scoring import Question, generate_answers, score_questions
    from explicitlm.world import geography_facts, make_questions

    cfg = fill_from_weights(load_config(None, [f"serve.weights={args.weights}"]), args.weights)
    adapter = args.weights
    if args.shape:  # a backbone of gigabytes, removed when the profile ends
        scratch = tempfile.TemporaryDirectory(prefix="explicitlm-profile-")
        atexit.register(scratch.cleanup)
        cfg, adapter = at_shape(cfg, args.shape, Path(scratch.name) / "base"), ""
    if args.bank_rows:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve import grow_bank

        grown = tempfile.TemporaryDirectory(prefix="explicitlm-profile-bank-")
        atexit.register(grown.cleanup)
        bank = Path(grown.name) / "bank.parquet"
        grow_bank(cfg.model.cache_path, bank, args.bank_rows, cfg.model.qwen3_model_path)
        cfg.model.cache_path = str(bank)
    # As the server runs it: the backbone in serve.dtype, the memory modules under its autocast.
    dtype = serving_dtype(args.dtype, torch.device("cpu"))
    tokenizer, model = build_model(cfg, adapter=adapter, dtype=dtype)
    model.eval().hold_for_answers(dtype)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    model_module.find_candidates = timed("candidates", model_module.find_candidates)
    model_module.row_tokens = timed("row_features", model_module.row_tokens)
    model._read = timed("reader", model._read)
    hook = model._layer_hook
    model._layer_hook = timed("hooks", hook)  # the registered hooks call this attribute through partial
    for handle in model._hooks:
        handle.remove()
    model._hooks = [
        layer.register_forward_hook(
            functools.partial(lambda i, *a, **k: model._layer_hook(i, *a, **k), i), with_kwargs=True
        )
        for i, layer in enumerate(model_module.decoder_layers(model.backbone))
    ]
    targets = make_questions(geography_facts(), seed=1)[: args.batch]
    choice = [Question(t["question"], t["options"].split(",")) for t in targets]
    choice = [Question(q.question, [o.split(":", 1)[1] for o in q.options]) for q in choice]
    opened = [Question(q.question, []) for q in choice]

    def served(fn, *a, **k):
        with autocast:
            return fn(*a, **k)

    runs = {
        "with_options": lambda: served(
            score_questions, model, tokenizer, choice, cfg.model.max_seq_len, batch_size=4 * len(choice)
        ),
        "without_options": lambda: served(
            generate_answers,
            model,
            tokenizer,
            opened,
            cfg.model.max_seq_len,
            cfg.serve.max_new_tokens,
            batch_size=len(opened),
        ),
    }
    result = {"batch": args.batch, "threads": torch.get_num_threads(), "dtype": str(dtype), "ms_per_batch": {}}
    if args.bank_rows:
        result["bank_rows"] = len(model.bank)
    if args.shape:
        del runs["without_options"]
        result["shape"] = args.shape
    for name, run in runs.items():
        parts: dict[str, list[float]] = defaultdict(list)
        for memory in (True, False):
            model.memory_off = not memory
            run()  # warm-up
            for _ in range(args.repeat):
                TIMES.clear()
                t = time.perf_counter()
                run()
                total = time.perf_counter() - t
                if not memory:
                    parts["bare_backbone_total"].append(total)
                    continue
                reads_in_hooks = TIMES["reader"] if cfg.model.query_from != "embeddings" else 0.0
                parts["total"].append(total)
                parts["candidates"].append(TIMES["candidates"])
                parts["row_features"].append(TIMES["row_features"])
                parts["reader"].append(TIMES["reader"])
                parts["fusion"].append(TIMES["hooks"] - reads_in_hooks)
                memory_s = (
                    TIMES["candidates"] + TIMES["row_features"] + TIMES["reader"] + TIMES["hooks"] - reads_in_hooks
                )
                parts["backbone"].append(total - memory_s)
        model.memory_off = False
        ms = {k: round(1000 * statistics.median(v), 1) for k, v in parts.items()}
        ms["memory_over_bare"] = round(ms["total"] / ms["bare_backbone_total"], 2)
        result["ms_per_batch"][name] = ms
        print(f"{name}: {json.dumps(ms)}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
