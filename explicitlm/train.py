"""Frozen-base SFT: the per-worker training loop.

The loop runs inside Ray Train's `TorchTrainer` (one process per worker) and, unchanged, in a single
process for tests and benchmarks. Only the memory modules train. Gradients of the memory modules are
averaged by DDP, which wraps the model with `init_sync=False`: the frozen backbone is never broadcast,
and the (identically seeded) memory modules are broadcast from rank 0 explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from explicitlm.adapter import freeze_summary, load_adapter_weights, save_adapter, set_trainable
from explicitlm.checkpoint import load_train_state, save_checkpoint
from explicitlm.data import collate
from explicitlm.distributed import allreduce_min, broadcast_, gather, train_context
from explicitlm.estimate import check_device_memory
from explicitlm.evaluation import evaluate_records, merge_sums, summarize
from explicitlm.loading import backbone_dtype, build_model, config_from_dict
from explicitlm.model import ExplicitLM
from explicitlm.objective import encode_record, lm_loss, lr_lambda
from explicitlm.pipeline import worker_inputs
from explicitlm.scoring import predict_mask
from explicitlm.tracking import MetricsLogger, TrainProgress, quiet_process


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train the memory modules on this worker's shard; see the module docstring."""
    cfg = config_from_dict(loop_config["config"])
    tc = cfg.training
    torch.set_num_threads(tc.torch_threads)
    rank, world, device, under_ray = train_context()
    if under_ray:  # this process is ours: no loading bars or library chatter
        quiet_process()
    progress = TrainProgress.for_rank(rank, loop_config.get("console"), under_ray)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    out_dir = Path(tc.output_dir)

    if device.type == "cuda" and loop_config.get("memory_estimate"):
        check_device_memory(loop_config["memory_estimate"], device)  # before loading: stop with the knob to turn
    dtype = backbone_dtype(cfg.model.dtype, device)
    # The weights record the driver's bank path; the model loads this node's copy of it.
    load_cfg, adapter, copies = worker_inputs(cfg, loop_config)
    tokenizer, model = build_model(load_cfg, device, adapter=adapter, dtype=dtype, start_from=True)
    trainable = set_trainable(model, tc.trainable_modules)
    params = list(trainable.values())
    progress.note(freeze_summary(model, trainable, tc.trainable_modules))
    if tc.gradient_checkpointing:
        checkpoint_activations(model.backbone)
    if world > 1:  # small: the memory modules only
        broadcast_([p.data for p in params], src=0)

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
        val_rows = (
            [r for r in val_rows if r["idx"] < tc.max_eval_samples] if world > 1 else val_rows[: tc.max_eval_samples]
        )
    # Each record in both forms (after its options, and without them); `open_share` picks one per epoch.
    examples, targets, cut = [], [], 0
    for r in train_rows:
        pair = (
            encode_record(tokenizer, r, cfg.model.max_seq_len),
            encode_record(tokenizer, r, cfg.model.max_seq_len, True),
        )
        if pair[0].truncated or pair[1].truncated:  # the answer would be cut: report it, never train on half an answer
            cut += 1
            continue
        examples.append(pair)
        targets.append(model.bank.row_of(r.get("uuid") or ""))
    cut_total = sum(gather(cut))
    if cut_total:
        progress.note(
            f"sft: {cut_total} training records skipped: their answer is beyond model.max_seq_len={cfg.model.max_seq_len}"
        )
    # Every worker must take the same number of steps (collectives and report() are barriers).
    micro_per_epoch = allreduce_min(len(examples) // tc.batch_size)
    steps_per_epoch = micro_per_epoch // tc.accumulation_steps
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    if total_steps <= 0:
        raise ValueError(
            f"no training steps: {len(examples)} examples per worker, batch {tc.batch_size}, "
            f"accumulation {tc.accumulation_steps}"
        )

    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"init_sync": False, "forward_sync_buffers": False}
        )
    core: ExplicitLM = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(tc.warmup_steps, total_steps // 10 + 1), total_steps)
    )

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
        progress.note(f"sft: resumed from the checkpoint at step {step} (epoch {epoch + 1}, micro-batch {micro_done})")
    if rank == 0:  # one line per attempt: where it started, on which node, device and process group
        out_dir.mkdir(parents=True, exist_ok=True)
        attempt = {"start_step": step, "time": time.time(), "device": str(device), "bank": load_cfg.model.cache_path}
        attempt["adapter"] = adapter
        attempt["backend"] = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        if under_ray:
            import ray

            attempt.update(node=ray.get_runtime_context().get_node_id(), driver_node=loop_config.get("driver_node"))
        with open(out_dir / "attempts.jsonl", "a") as fh:
            fh.write(json.dumps(attempt) + "\n")

    logger = MetricsLogger(cfg, rank)
    if logger.run_dir:
        upload = f"; upload it with `swanlab sync {logger.run_dir}`" if cfg.logging.swanlab_mode == "offline" else ""
        progress.note(f"swanlab: {cfg.logging.swanlab_mode} run in {logger.run_dir}{upload}")
    # Recorded beside the weights so that `serve.weights` alone finds the backbone and the bank.
    provenance = {
        "backbone_path": cfg.model.qwen3_model_path,
        "bank_path": cfg.model.cache_path,
        "database_init_path": cfg.model.database_init_path,
    }
    # Memory modules keep float32 master weights; the matrix products run in bf16 on a GPU and
    # with a bf16 backbone (CPU autocast does bf16 too).
    use_amp = (device.type == "cuda" or dtype == torch.bfloat16) and torch.amp.is_autocast_available(device.type)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_amp)
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
                save_checkpoint(
                    Path(tmp),
                    core,
                    optimizer,
                    scheduler,
                    {"step": step, "epoch": epoch, "micro_done": micro_done, "best": best},
                )
                ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(flat)

    def evaluate() -> dict[str, Any]:
        with autocast():
            sums = evaluate_records(core, tokenizer, val_rows, cfg.model.max_seq_len, tc.eval_batch_size)
        return summarize(merge_sums(gather(sums)))

    t0, tokens, samples, window_loss, window_ret, n_window = time.time(), 0, 0, 0.0, 0.0, 0
    while step < total_steps:
        order = list(range(len(examples)))
        if tc.shuffle:
            random.Random(tc.seed * 1000 + epoch).shuffle(order)
        micro_total = steps_per_epoch * tc.accumulation_steps
        epoch_steps = min(steps_per_epoch, total_steps - step + micro_done // tc.accumulation_steps)
        progress.epoch_start(
            epoch, -(-total_steps // steps_per_epoch), epoch_steps, micro_done // tc.accumulation_steps
        )
        step_tokens = 0
        while micro_done < micro_total and step < total_steps:
            for a in range(tc.accumulation_steps):
                idx = order[(micro_done + a) * tc.batch_size : (micro_done + a + 1) * tc.batch_size]
                forms = [examples[i][int(open_form(i, epoch, tc.open_answer_share, tc.seed))] for i in idx]
                batch = {k: v.to(device) for k, v in collate(forms, tokenizer.pad_token_id).items()}
                gold = torch.tensor([targets[i] for i in idx], device=device)
                hide = torch.tensor([absent(i, epoch, tc.absent_rate, tc.seed) for i in idx], device=device)
                last = a == tc.accumulation_steps - 1
                # Only the final micro-step of an optimizer step all-reduces gradients.
                sync = nullcontext() if (last or world == 1) else model.no_sync()
                with sync, autocast():
                    out = model(
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["query_index"],
                        batch["words"],
                        batch["slots"],
                        target_rows=gold,
                        hide=hide,
                        logits_mask=predict_mask(batch["loss_mask"]),
                    )
                    loss = lm_loss(out.logits, batch["input_ids"], batch["loss_mask"])
                    total = loss + (
                        tc.retrieval_loss_weight * out.retrieval_loss if out.retrieval_loss is not None else 0.0
                    )
                    (total / tc.accumulation_steps).backward()
                window_loss += loss.item()
                window_ret += out.retrieval_loss.item() if out.retrieval_loss is not None else 0.0
                n_window += 1
                step_tokens += int(batch["attention_mask"].sum())
                samples += len(idx)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_done += tc.accumulation_steps
            step += 1
            tokens += step_tokens
            progress.step(
                micro_done // tc.accumulation_steps, loss.item(), scheduler.get_last_lr()[0], step_tokens, world
            )
            step_tokens = 0
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
                logger.log(
                    {
                        "loss": window_loss / n_window,
                        "retrieval_loss": window_ret / n_window,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens * world / max(elapsed, 1e-9),
                        "samples_per_s": samples * world / max(elapsed, 1e-9),
                        "epoch": epoch,
                        **peak_memory(device),
                    },
                    step,
                )
                window_loss, window_ret, n_window = 0.0, 0.0, 0
            if step % tc.checkpoint_every == 0 and micro_done < micro_total and step < total_steps:
                report({"step": step, "epoch": epoch}, with_checkpoint=True)
        # ---- end of epoch (or of the step budget): evaluate on every worker, gather, report
        metrics: dict[str, Any] = {"step": step, "epoch": epoch}
        if has_val:
            t_val = time.time()
            metrics.update(evaluate())
            progress.validated(metrics, time.time() - t_val)
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
    logger.finish()
    for folder in copies:  # loaded long ago; a restart writes them again from the object store
        shutil.rmtree(folder, ignore_errors=True)


def _share(key: str) -> float:
    """A number in [0, 1) that depends only on key: the same choices in every run and after a resume."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def open_form(i: int, epoch: int, share: float, seed: int) -> bool:
    """Whether training example i is asked without options in this epoch."""
    return _share(f"open:{seed}:{epoch}:{i}") < share


def absent(i: int, epoch: int, rate: float, seed: int) -> bool:
    """Whether training example i's own memory row is kept from the reader in this epoch."""
    return _share(f"absent:{seed}:{epoch}:{i}") < rate


def checkpoint_activations(backbone: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' own, non-reentrant).

    transformers checkpoints a layer's `forward`, not its `__call__`: the memory hooks on each
    layer's output run once, outside what is recomputed, so retrieval runs once per forward and
    each retrieval loss is counted once (tests/test_checkpointing.py checks both)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # the name since transformers 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embeddings' output require a gradient, which only reentrant
    # checkpointing needs: it would back-propagate through layer 0 for nothing.
    backbone.disable_input_require_grads()


def peak_memory(device: torch.device) -> dict[str, float]:
    """The most GPU memory this worker's tensors have held so far, in GB (what the estimate predicts)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)}
