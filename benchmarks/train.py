"""Training throughput: the memory's training step against the bare frozen backbone, and 1 vs 2 workers.

    python benchmarks/train.py [--hidden 768 --layers 14] [--steps 12] [--batch 8] [--scan-rows 0] [--skip-workers]

1. On a random-init Qwen3 of about 117 M parameters (the project's tokenizer) and the sample world's
   questions and bank: one optimizer step of the training recipe itself (`SFTRecipe._step`:
   retrieval, the reader, fusion, the prompt without gradients and the answer with them, half the
   questions without options) against, on the same examples, the bare frozen backbone's forward and
   backward (gradients through every layer to its inputs, no memory; logits at the answer only, as
   the recipe computes them); the same split as the recipe's (the prompt without gradients, the
   answer from its cache with them); and its forward alone. Median of `--steps` steps, after one
   warm-up. `--scan-rows 0` (the default) sends the sample bank's 3,987 rows through the path a big
   bank takes (the index's probe, the inverted lists' fixed-shape reads, the exact stage), not the
   whole-bank ranking that `model.scan_rows` gives banks this small.
2. samples/s of `ray_jobs/sft.py` on the sample world with 1 and with 2 CPU workers, one torch
   thread each (measured inside the loop, after start-up).
The last line is one JSON object with the figures and ratios; the floor: the step with memory costs at
most 1.3x the bare backbone's forward and backward (both ways of running it are reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def memory_vs_bare(hidden: int, layers: int, steps: int, batch_size: int, threads: int, scan_rows: int) -> dict:
    from explicitlm.bank import load_or_build_bank
    from explicitlm.base import make_base
    from explicitlm.config import load_config
    from explicitlm.data import collate, parse_target, split_prompt
    from explicitlm.objective import lm_loss
    from explicitlm.train import SFTRecipe, open_form
    from explicitlm.world import write_world

    d = Path(tempfile.mkdtemp(prefix="explicitlm-train-bench-"))
    base = make_base(d / "base", hidden_size=hidden, num_layers=layers)
    world = write_world(d / "data")
    bank = d / "knowledge_cache.parquet"
    from transformers import AutoTokenizer

    load_or_build_bank(bank, world["knowledge"], AutoTokenizer.from_pretrained(base), 16, 10**7)
    records = [parse_target(item["target"][0]) for item in json.load(open(world["omcq"]))]
    for i, r in enumerate(records):
        r["idx"] = i
    cfg = load_config(
        None,
        [
            f"model.qwen3_model_path={base}",
            f"model.cache_path={bank}",
            f"model.database_init_path={world['knowledge']}",
            f"training.output_dir={d / 'run'}",
            "logging.swanlab_mode=disabled",
            f"training.batch_size={batch_size}",
            "training.accumulation_steps=1",
            f"training.torch_threads={threads}",
            f"model.scan_rows={scan_rows}",
        ],
    )
    recipe = SFTRecipe({"config": asdict(cfg), "train_rows": records})
    recipe.setup()
    backbone = recipe.core.backbone
    n_params = sum(p.numel() for p in backbone.parameters())
    n_memory = sum(p.numel() for p in recipe.params)
    batches = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(steps + 1)]

    def timed(fn) -> float:
        times = []
        for i, idx in enumerate(batches):
            t = time.perf_counter()
            fn(idx)
            if i:  # the first step allocates optimizer state and warms the allocator
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    def bare(idx: list[int], backward: bool) -> None:
        forms = [
            recipe.examples[i][int(open_form(i, 0, cfg.training.open_answer_share, cfg.training.seed))] for i in idx
        ]
        b = collate(forms, recipe.tokenizer.pad_token_id)
        with torch.set_grad_enabled(backward):
            embeds = backbone.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(backward)
            hidden_states = backbone.model(inputs_embeds=embeds, attention_mask=b["attention_mask"]).last_hidden_state
            at = b["loss_index"]
            logits = backbone.lm_head(
                hidden_states.gather(1, at.clamp(min=0)[..., None].expand(-1, -1, hidden_states.shape[-1]))
            )
            loss = lm_loss(logits, b["input_ids"], at)
            if backward:
                loss.backward()

    def bare_split(idx: list[int]) -> None:
        """The bare backbone trained as the recipe trains: the prompt without gradients into a KV
        cache, the answer from it with gradients (to its input embeddings: nothing else trains)."""
        forms = [
            recipe.examples[i][int(open_form(i, 0, cfg.training.open_answer_share, cfg.training.seed))] for i in idx
        ]
        prompt, answer = (collate(list(p), recipe.tokenizer.pad_token_id) for p in zip(*map(split_prompt, forms)))
        with torch.no_grad():
            cache = backbone.model(
                input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=True
            ).cache
        ids, past = answer["input_ids"], prompt["attention_mask"]
        embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
        positions = past.sum(1)[:, None] + torch.arange(ids.shape[1])
        hidden_states = backbone.model(
            inputs_embeds=embeds,
            attention_mask=torch.cat([past, answer["attention_mask"]], 1),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        at = answer["loss_index"]
        picked = hidden_states.gather(1, at.clamp(min=0)[..., None].expand(-1, -1, hidden_states.shape[-1]))
        lm_loss(backbone.lm_head(picked), ids, at).backward()

    t_memory = timed(lambda idx: recipe._step([idx]))
    t_bare = timed(lambda idx: bare(idx, True))
    t_bare_split = timed(bare_split)
    t_forward = timed(lambda idx: bare(idx, False))
    return {
        "backbone_params_m": round(n_params / 1e6, 1),
        "memory_params_m": round(n_memory / 1e6, 2),
        "bank_rows": len(recipe.core.bank),
        "scan_rows": scan_rows,
        "batch_size": batch_size,
        "memory_step_s": round(t_memory, 4),
        "bare_forward_backward_s": round(t_bare, 4),
        "bare_split_s": round(t_bare_split, 4),
        "bare_forward_s": round(t_forward, 4),
        "memory_over_bare_forward_backward": round(t_memory / t_bare, 3),
        "memory_over_bare_split": round(t_memory / t_bare_split, 3),
        "memory_over_bare_forward": round(t_memory / t_forward, 3),
    }


def workers(n: int, steps: int, out: Path) -> float:
    cmd = [
        sys.executable,
        "ray_jobs/sft.py",
        f"training.output_dir={out}",
        f"training.num_workers={n}",
        "training.torch_threads=1",
        f"training.max_steps={steps}",
        "training.epochs=1",
        "training.max_eval_samples=1",
        "logging.swanlab_mode=disabled",
        f"logging.log_every={steps}",
        "training.checkpoint_every=100000",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r["samples_per_s"] for r in rows if "samples_per_s" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker-steps", type=int, default=40)
    p.add_argument("--scan-rows", type=int, default=0)
    p.add_argument("--skip-workers", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "memory_vs_bare": memory_vs_bare(args.hidden, args.layers, args.steps, args.batch, args.threads, args.scan_rows)
    }
    print(result["memory_vs_bare"], flush=True)
    if not args.skip_workers:
        with tempfile.TemporaryDirectory() as d:
            # Both runs share the embedded default's base and data: build them once.
            base = Path(d) / "shared"
            subprocess.run(
                [
                    sys.executable,
                    "ray_jobs/sft.py",
                    f"training.output_dir={base}",
                    "training.max_steps=1",
                    "training.max_eval_samples=1",
                    "logging.swanlab_mode=disabled",
                    "training.num_workers=1",
                ],
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n in (1, 2):
                run = Path(d) / f"w{n}"
                run.mkdir()
                for name in ("base", "data", "knowledge_cache.parquet"):
                    (run / name).symlink_to(base / name)
                result[f"samples_per_s_{n}_worker"] = round(workers(n, args.worker_steps, run), 2)
        result["worker_speedup"] = round(result["samples_per_s_2_worker"] / result["samples_per_s_1_worker"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
