"""Training throughput: frozen-base SFT step vs full fine-tuning, and 1 vs 2 Ray Train workers.

    python benchmarks/train.py [--hidden 768 --layers 14] [--steps 12] [--skip-workers]

1. On a random-init Qwen3 of at least 100 M parameters: the time of one optimizer step of the
   frozen-base SFT (backbone frozen, memory modules at their default size) against one step of
   full fine-tuning of the bare backbone (every parameter trained, AdamW), same batch.
2. samples/s of `ray_jobs/sft.py` on the sample world with 1 and with 2 CPU workers, one torch
   thread each (measured inside the loop, after start-up).
The last line is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from explicitlm.adapter import set_trainable
from explicitlm.bank import MemoryBank
from explicitlm.base import tiny_qwen3_config
from explicitlm.index import bank_index
from explicitlm.model import ExplicitLM, MemorySettings
from explicitlm.objective import lm_loss

ROOT = Path(__file__).resolve().parent.parent


def step_time(model, params, batch, steps: int, explicit: bool) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        if explicit:
            out = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["query_mask"],
                batch["words"],
                target_rows=batch["gold"],
            )
            loss = lm_loss(out.logits, batch["input_ids"], batch["loss_mask"]) + out.retrieval_loss
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step allocates optimizer state
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def frozen_vs_full(hidden: int, layers: int, steps: int, batch_size: int, seq: int) -> dict:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    V = 8192
    cfg = tiny_qwen3_config(V, hidden, layers, intermediate_size=hidden * 3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (batch_size, seq), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "query_mask": (torch.arange(seq) < seq // 2).long().expand(batch_size, seq).clone(),
        "words": ids.clone(),  # stand-in word ids: one word per token
        "loss_mask": (torch.arange(seq) >= seq - 8).long().expand(batch_size, seq).clone(),
    }
    n_rows = 4096
    rows = [{"uuid": str(i), "text": ""} for i in range(n_rows)]
    bank_ids = torch.randint(10, V, (n_rows, 16), generator=g)
    bank = MemoryBank(
        bank_ids,
        torch.ones(n_rows, 16, dtype=torch.bool),
        bank_ids.clone(),  # stand-in word ids, as for the batch
        [r["uuid"] for r in rows],
        [r["text"] for r in rows],
        "bench",
        0,
    )
    batch["gold"] = torch.randint(0, n_rows, (batch_size,), generator=g)
    full = Qwen3ForCausalLM(cfg)
    n_params = sum(p.numel() for p in full.parameters())
    full.train()
    t_full = step_time(full, list(full.parameters()), batch, steps, explicit=False)
    del full
    backbone = Qwen3ForCausalLM(cfg)
    settings = MemorySettings()
    index = bank_index(bank, settings.knowledge_dim, 0, settings.max_cell_rows, settings.max_recent_rows)
    model = ExplicitLM(backbone, bank, settings, index)
    trainable = set_trainable(model)
    model.train()
    t_frozen = step_time(model, list(trainable.values()), batch, steps, explicit=True)
    tokens = batch_size * seq
    return {
        "backbone_params_m": round(n_params / 1e6, 1),
        "memory_params_m": round(sum(p.numel() for p in trainable.values()) / 1e6, 1),
        "full_step_s": round(t_full, 3),
        "frozen_step_s": round(t_frozen, 3),
        "full_tokens_per_s": round(tokens / t_full, 1),
        "frozen_tokens_per_s": round(tokens / t_frozen, 1),
        "frozen_over_full_time": round(t_frozen / t_full, 3),
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
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker-steps", type=int, default=40)
    p.add_argument("--skip-workers", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"frozen_vs_full": frozen_vs_full(args.hidden, args.layers, args.steps, args.batch, args.seq)}
    print(result["frozen_vs_full"], flush=True)
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
