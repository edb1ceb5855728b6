"""Frozen-base SFT: the per-worker training loop, evaluation and checkpoints.

The loop runs inside Ray Train's `TorchTrainer` (one process per worker) and, unchanged, in a single
process for tests and benchmarks. Only the memory modules train. Gradients of the memory modules are
averaged by DDP, which wraps the model with `init_sync=False`: the frozen backbone is never broadcast,
and the (identically seeded) memory modules are broadcast from rank 0 explicitly.

Letters: B batch, T tokens.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from explicitlm.config import Config
from explicitlm.data import LABELS, Encoded, collate, encode
from explicitlm.memory import MemoryBank
from explicitlm.model import (
    ExplicitLM,
    MemorySettings,
    adapter_index_state,
    load_adapter_weights,
    read_adapter,
    save_adapter,
    set_trainable,
)
from explicitlm.scoring import Question, predict_mask, score_questions

TRAIN_STATE = "train_state.pt"


def config_from_dict(d: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def load_backbone(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Tokenizer and causal LM from a local folder: the tiny base and a real Qwen3 alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    backbone.eval()
    return tokenizer, backbone


def build_model(cfg: Config, device: torch.device | str = "cpu", adapter: str = "", bank: MemoryBank | None = None):
    """Backbone + memory bank (+ trained memory weights) -> (tokenizer, ExplicitLM) on `device`."""
    tokenizer, backbone = load_backbone(cfg.model.qwen3_model_path)
    bank = MemoryBank.load(cfg.model.cache_path) if bank is None else bank
    settings = MemorySettings.from_model_config(cfg.model, seed=cfg.training.seed)
    index_state = None
    if adapter:
        _, tensors = read_adapter(adapter)
        index_state = adapter_index_state(tensors)
    model = ExplicitLM(backbone, bank, settings, index_state)
    if adapter:
        load_adapter_weights(model, adapter)
    return tokenizer, model.to(device)


# ---------------------------------------------------------------------- records -> examples


def record_question(rec: dict[str, Any]) -> Question:
    return Question(rec["question"], list(rec["options"]), rec["conversations"][0]["content"])


def encode_record(tokenizer: Any, rec: dict[str, Any], max_seq_len: int) -> Encoded:
    """A converted SFT record -> the training sequence of its correct answer."""
    i = int(rec["answer_index"])
    return encode(tokenizer, rec["conversations"][0]["content"], rec["question"], LABELS[i], rec["options"][i], max_seq_len)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens.

    logits (B, T, V) for every position, or (M, V) at the positions `predict_mask(loss_mask)` marks;
    input_ids and loss_mask (B, T).
    """
    if logits.dim() == 2:
        targets = input_ids[:, 1:][loss_mask[:, 1:].bool()]  # (M,)
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = loss_mask[:, 1:].float()
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine to 10%, both counted in optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------- evaluation


def evaluate_records(model: ExplicitLM, tokenizer: Any, records: list[dict[str, Any]], max_seq_len: int,
                     batch_size: int = 32) -> dict[str, Any]:
    """Sums (not means) so that shards from several workers add up: each row counted once."""
    sums: dict[str, Any] = {"n": 0, "correct": 0, "nll": 0.0, "with_gold": 0, "r1": 0.0, "rk": 0.0,
                            "read": 0.0, "truncated": 0, "per_predicate": {}}
    per_q = max(1, batch_size // 4)
    for start in range(0, len(records), per_q):
        chunk = records[start : start + per_q]
        scored = score_questions(model, tokenizer, [record_question(r) for r in chunk], max_seq_len, batch_size)
        for rec, s in zip(chunk, scored):
            gold = int(rec["answer_index"])
            ok = int(s.index == gold)
            sums["n"] += 1
            sums["correct"] += ok
            sums["nll"] += -s.scores[gold] if s.scores[gold] > -1e8 else 0.0
            sums["truncated"] += int(s.truncated)
            # The share of layers that read memory (their rows matched the question well enough).
            sums["read"] += sum(s.used) / max(len(s.used), 1)
            pred = rec.get("predicate") or ""
            if pred:
                c = sums["per_predicate"].setdefault(pred, [0, 0])
                c[0] += ok
                c[1] += 1
            row = model.bank.row_of(rec.get("uuid") or "")
            if row >= 0 and s.memory:
                sums["with_gold"] += 1
                sums["r1"] += sum(layer[0][0] == row for layer in s.memory) / len(s.memory)
                sums["rk"] += sum(any(r == row for r, _ in layer) for layer in s.memory) / len(s.memory)
    return sums


def merge_sums(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"per_predicate": {}}
    for p in parts:
        for k, v in p.items():
            if k == "per_predicate":
                for pred, (c, n) in v.items():
                    t = total["per_predicate"].setdefault(pred, [0, 0])
                    t[0] += c
                    t[1] += n
            else:
                total[k] = total.get(k, 0) + v
    return total


def summarize(sums: dict[str, Any], prefix: str = "val_") -> dict[str, Any]:
    n = max(sums.get("n", 0), 1)
    g = max(sums.get("with_gold", 0), 1)
    out = {
        f"{prefix}accuracy": sums.get("correct", 0) / n,
        f"{prefix}loss": sums.get("nll", 0.0) / n,
        f"{prefix}n": sums.get("n", 0),
        f"{prefix}truncated": sums.get("truncated", 0),
        f"{prefix}memory_read": sums.get("read", 0.0) / n,
    }
    if sums.get("with_gold"):
        out[f"{prefix}recall@1"] = sums["r1"] / g
        out[f"{prefix}recall@k"] = sums["rk"] / g
    out[f"{prefix}per_predicate"] = {p: c / t for p, (c, t) in sorted(sums.get("per_predicate", {}).items())}
    return out


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, model: ExplicitLM, optimizer, scheduler, state: dict[str, Any]) -> None:
    save_adapter(model, folder)
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        **state,
    }, folder / TRAIN_STATE)


def load_train_state(folder: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code.
    return torch.load(folder / TRAIN_STATE, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------------- the loop


class _Logger:
    """Rank 0's metrics: metrics.jsonl always, SwanLab when enabled."""

    def __init__(self, cfg: Config, rank: int):
        self.rank = rank
        self.path = Path(cfg.training.output_dir) / "metrics.jsonl"
        self.swan = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.logging.swanlab_mode != "disabled":
            import swanlab

            self.swan = swanlab.init(
                project=cfg.logging.project,
                name=cfg.logging.run_name or None,
                mode=cfg.logging.swanlab_mode,
                log_dir=str(Path(cfg.training.output_dir) / "swanlog"),
                config=json.loads(json.dumps(asdict(cfg))),
                reinit=True,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.swan is not None:
            import swanlab

            swanlab.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.swan is not None:
            import swanlab

            swanlab.finish()


def _train_context():
    """(rank, world, device, report fn, checkpoint) under Ray Train, or a single-process stand-in."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        import ray.train.torch

        return rank, world, ray.train.torch.get_device(), True
    except Exception:  # not inside a Ray Train worker
        return 0, 1, torch.device("cpu"), False


def _allreduce_min(value: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train the memory modules on this worker's shard; see the module docstring."""
    cfg = config_from_dict(loop_config["config"])
    tc = cfg.training
    torch.set_num_threads(tc.torch_threads)
    rank, world, device, under_ray = _train_context()
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    out_dir = Path(tc.output_dir)

    tokenizer, model = build_model(cfg, device, adapter=cfg.dataset.pretrained_sft_model_path)
    trainable = set_trainable(model, tc.trainable_modules)
    params = list(trainable.values())
    if world > 1:
        for p in params:  # small: the memory modules only
            dist.broadcast(p.data, src=0)

    # ---- data: this worker's training shard, every validation row on exactly one worker
    if under_ray:
        import ray.train

        train_rows = list(ray.train.get_dataset_shard("train").iter_rows())
        val_ds = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None
        val_rows = [r for r in val_ds.iter_rows() if r["idx"] % world == rank] if val_ds is not None else []
    else:
        train_rows, val_rows = loop_config["train_rows"], loop_config.get("val_rows", [])
    has_val = bool(loop_config.get("has_val", val_rows))
    train_rows.sort(key=lambda r: r["idx"])
    val_rows.sort(key=lambda r: r["idx"])
    if tc.max_eval_samples:
        val_rows = [r for r in val_rows if r["idx"] < tc.max_eval_samples] if world > 1 else val_rows[: tc.max_eval_samples]
    examples, targets, cut = [], [], 0
    for r in train_rows:
        e = encode_record(tokenizer, r, cfg.model.max_seq_len)
        if e.truncated:  # the answer would be cut: report it, never train on half an answer
            cut += 1
            continue
        examples.append(e)
        targets.append(model.bank.row_of(r.get("uuid") or ""))
    cut_total = sum(_gather(cut))
    if rank == 0 and cut_total:
        print(f"sft: {cut_total} training records skipped: answer beyond model.max_seq_len={cfg.model.max_seq_len}")
    # Every worker must take the same number of steps (collectives and report() are barriers).
    micro_per_epoch = _allreduce_min(len(examples) // tc.batch_size)
    steps_per_epoch = micro_per_epoch // tc.accumulation_steps
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    if total_steps <= 0:
        raise ValueError(f"no training steps: {len(examples)} examples per worker, batch {tc.batch_size}, "
                         f"accumulation {tc.accumulation_steps}")

    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"init_sync": False, "broadcast_buffers": False}
        )
    core: ExplicitLM = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(min(tc.warmup_steps, total_steps // 10 + 1), total_steps))

    step, epoch, micro_done, best = 0, 0, 0, -1.0
    checkpoint = None
    if under_ray:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_adapter_weights(core, d)
            state = load_train_state(Path(d))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, epoch, micro_done, best = state["step"], state["epoch"], state["micro_done"], state["best"]
        if rank == 0:
            print(f"sft: resumed from checkpoint at step {step} (epoch {epoch}, micro-batch {micro_done})")
    if rank == 0:  # one line per attempt: where it started
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "attempts.jsonl", "a") as fh:
            fh.write(json.dumps({"start_step": step, "time": time.time()}) + "\n")

    logger = _Logger(cfg, rank)
    # Recorded beside the weights so that `serve.weights` alone finds the backbone and the bank.
    provenance = {"backbone_path": cfg.model.qwen3_model_path, "bank_path": cfg.model.cache_path,
                  "database_init_path": cfg.model.database_init_path}
    use_amp = device.type == "cuda"
    model.train()

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Barrier on every rank; rank 0 alone attaches the checkpoint."""
        if not under_ray:
            return
        import ray.train

        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if with_checkpoint and rank == 0:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), core, optimizer, scheduler,
                                {"step": step, "epoch": epoch, "micro_done": micro_done, "best": best})
                ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(flat)

    def evaluate() -> dict[str, Any]:
        sums = evaluate_records(core, tokenizer, val_rows, cfg.model.max_seq_len, tc.eval_batch_size)
        return summarize(merge_sums(_gather(sums)))

    t0, tokens, samples, window_loss, window_ret, n_window = time.time(), 0, 0, 0.0, 0.0, 0
    while step < total_steps:
        order = list(range(len(examples)))
        if tc.shuffle:
            random.Random(tc.seed * 1000 + epoch).shuffle(order)
        micro_total = steps_per_epoch * tc.accumulation_steps
        while micro_done < micro_total and step < total_steps:
            for a in range(tc.accumulation_steps):
                idx = order[(micro_done + a) * tc.batch_size : (micro_done + a + 1) * tc.batch_size]
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
                gold = torch.tensor([targets[i] for i in idx], device=device)
                last = a == tc.accumulation_steps - 1
                # Only the final micro-step of an optimizer step all-reduces gradients.
                sync = nullcontext() if (last or world == 1) else model.no_sync()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = model(batch["input_ids"], batch["attention_mask"], batch["query_mask"], gold,
                                question_mask=batch["question_mask"], logits_mask=predict_mask(batch["loss_mask"]))
                    loss = lm_loss(out.logits, batch["input_ids"], batch["loss_mask"])
                    total = loss + (tc.retrieval_loss_weight * out.retrieval_loss if out.retrieval_loss is not None else 0.0)
                    (total / tc.accumulation_steps).backward()
                window_loss += loss.item()
                window_ret += out.retrieval_loss.item() if out.retrieval_loss is not None else 0.0
                n_window += 1
                tokens += int(batch["attention_mask"].sum())
                samples += len(idx)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_done += tc.accumulation_steps
            step += 1
            if tc.fail_at_step and step == tc.fail_at_step and rank == world - 1:
                marker = out_dir / ".fault_injected"
                if not marker.exists():
                    marker.write_text(str(step))
                    # Give the controller time to register the checkpoints reported so far.
                    time.sleep(3)
                    print(f"sft: fault injection: worker {rank} exits at step {step}")
                    os._exit(1)
            if step % cfg.logging.log_every == 0 or step == total_steps:
                elapsed = time.time() - t0
                logger.log({
                    "loss": window_loss / n_window, "retrieval_loss": window_ret / n_window,
                    "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens * world / max(elapsed, 1e-9),
                    "samples_per_s": samples * world / max(elapsed, 1e-9),
                    "epoch": epoch,
                }, step)
                window_loss, window_ret, n_window = 0.0, 0.0, 0
            if step % tc.checkpoint_every == 0 and micro_done < micro_total and step < total_steps:
                report({"step": step, "epoch": epoch}, with_checkpoint=True)
        # ---- end of epoch (or of the step budget): evaluate on every worker, gather, report
        metrics: dict[str, Any] = {"step": step, "epoch": epoch}
        if has_val:
            metrics.update(evaluate())
            acc = metrics.get("val_accuracy", -1.0)
            if rank == 0 and acc > best:
                best = acc
                save_adapter(core, out_dir / "sft_best", {**provenance, "val_accuracy": acc, "step": step})
        logger.log(metrics, step)
        epoch += 1
        micro_done = 0
        report(metrics, with_checkpoint=True)
        if rank == 0:
            save_adapter(core, out_dir / "sft_latest", {**provenance, "step": step, "epoch": epoch})
            print("sft: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    logger.finish()


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training loss and validation accuracy over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", label="val accuracy", color="tab:red")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
