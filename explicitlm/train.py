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
from explicitlm.checkpoint import check_same_run, load_train_state, run_keys, save_checkpoint
from explicitlm.data import collate, epoch_order, split_prompt
from explicitlm.distributed import allreduce_min, allreduce_sum, broadcast_, gather, train_context
from explicitlm.errors import UserError
from explicitlm.estimate import check_device_memory
from explicitlm.evaluation import evaluate_open, evaluate_records, merge_sums, summarize, summarize_open
from explicitlm.loading import backbone_dtype, build_model, config_from_dict
from explicitlm.model import ExplicitLM
from explicitlm.objective import encode_records, lm_loss, lr_lambda, option_first_tokens, option_loss
from explicitlm.pipeline import worker_inputs
from explicitlm.tracking import MetricsLogger, TrainProgress, quiet_process


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train the memory modules on this worker's shard; see the module docstring."""
    recipe = SFTRecipe(loop_config)
    recipe.setup()
    recipe.train()


PRIORS = ("lexical.weight", "lexical.bias", "null.bias")  # of each `MemoryGate`, and its x_ twins
ENCODE_CHUNK = 1024  # training records encoded per tokenizer call


def param_groups(trainable: dict[str, torch.nn.Parameter], lr: float, prior_scale: float) -> list[dict]:
    """AdamW's parameter groups: the readers' priors at `prior_scale` x `lr` apart from the rest (one
    group where the scale is 1, as checkpoints before it hold)."""
    if prior_scale == 1:
        return [{"params": list(trainable.values())}]
    prior = {n for n in trainable if n.split(".memory_gate.")[-1].removeprefix("x_") in PRIORS}
    return [
        {"params": [p for n, p in trainable.items() if n not in prior]},
        {"params": [p for n, p in trainable.items() if n in prior], "lr": lr * prior_scale},
    ]


def adamw(groups: list[dict], lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CPU and CUDA: one kernel over every tensor (about 6 ms a step for the tiny
    base's 3.6 M memory parameters on one CPU thread, against 23 ms for the per-tensor loop). A
    checkpoint written unfused resumes fused: loading would otherwise restore its groups' `fused`."""
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)

    def keep_fused(opt: torch.optim.Optimizer, state: dict) -> dict:
        state["param_groups"] = [{**g, "fused": fused or None} for g in state["param_groups"]]
        return state

    optimizer.register_load_state_dict_pre_hook(keep_fused)
    return optimizer


class SFTRecipe:
    """One worker's training run, read as a recipe: `setup` (model, data, optimizer, resume),
    `train` (epochs of optimizer steps, each `_step`), `_validate` and `save_checkpoint`."""

    def __init__(self, loop_config: dict[str, Any]):
        self.loop_config = loop_config
        self.cfg = config_from_dict(loop_config["config"])
        self.tc = self.cfg.training
        torch.set_num_threads(self.tc.torch_threads)
        self.rank, self.world, self.device, self.under_ray = train_context()
        if self.under_ray:  # this process is ours: no loading bars or library chatter
            quiet_process()
        self.progress = TrainProgress.for_rank(self.rank, loop_config.get("console"), self.under_ray)
        self.out_dir = Path(self.tc.output_dir)
        self.step, self.epoch, self.micro_done, self.best = 0, 0, 0, -1.0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, tc, device = self.cfg, self.tc, self.device
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        if device.type == "cuda" and self.loop_config.get("memory_estimate"):
            check_device_memory(self.loop_config["memory_estimate"], device)  # before loading: stop with the knob
        self.dtype = backbone_dtype(cfg.model.dtype, device)
        # The weights record the driver's bank path; the model loads this node's copy of it.
        self.load_cfg, self.adapter, self.copies = worker_inputs(cfg, self.loop_config)
        self.tokenizer, model = build_model(
            self.load_cfg, device, adapter=self.adapter, dtype=self.dtype, start_from=True
        )
        trainable = set_trainable(model, tc.trainable_modules)
        model.word_dropout, model.others_null = tc.word_dropout, tc.others_null
        self.params = list(trainable.values())
        self.progress.note(freeze_summary(model, trainable, tc.trainable_modules))
        if tc.gradient_checkpointing:
            checkpoint_activations(model.backbone)
        if self.world > 1:  # small: the memory modules only
            broadcast_([p.data for p in self.params], src=0)
        self._setup_data(model)
        if self.world > 1:
            import ray.train.torch

            model = ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"init_sync": False, "forward_sync_buffers": False}
            )
        self.model = model
        self.core: ExplicitLM = getattr(model, "module", model)
        self.optimizer = adamw(
            param_groups(trainable, tc.learning_rate, tc.prior_lr_scale), tc.learning_rate, tc.weight_decay, device
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(min(tc.warmup_steps, self.total_steps // 10 + 1), self.total_steps)
        )
        self._resume()
        self.logger = MetricsLogger(cfg, self.rank)
        if self.logger.run_dir:
            upload = (
                f"; upload it with `swanlab sync {self.logger.run_dir}`"
                if cfg.logging.swanlab_mode == "offline"
                else ""
            )
            self.progress.note(f"swanlab: {cfg.logging.swanlab_mode} run in {self.logger.run_dir}{upload}")
        # Recorded beside the weights so that `serve.weights` alone finds the backbone and the bank.
        self.provenance = {
            "backbone_path": cfg.model.qwen3_model_path,
            "bank_path": cfg.model.cache_path,
            "database_init_path": cfg.model.database_init_path,
        }
        # Memory modules keep float32 master weights; the matrix products run in bf16 on a GPU and
        # with a bf16 backbone (CPU autocast does bf16 too).
        amp = (device.type == "cuda" or self.dtype == torch.bfloat16) and torch.amp.is_autocast_available(device.type)
        self.autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=amp)
        self._t0, self._tokens, self._samples = time.time(), 0, 0
        # (LM, reading, exclusion, option loss) per micro-step since the last log
        self._window: list[tuple[torch.Tensor, ...]] = []
        # (questions drawn with their own row hidden, those of them with an option a visible row
        # rules out) since the last log: what training.absent_target=spread has to spread over
        self._hidden = torch.zeros(2, dtype=torch.long, device=device)

    def _setup_data(self, model: ExplicitLM) -> None:
        """This worker's training shard, encoded in both forms (after the options, and without
        them), and every validation row on exactly one worker."""
        cfg, tc, world = self.cfg, self.tc, self.world
        if self.under_ray:
            import ray.train

            train_rows = list(ray.train.get_dataset_shard("train").iter_rows())
            val_ds = ray.train.get_dataset_shard("val") if self.loop_config.get("has_val") else None
            val_rows = [r for r in val_ds.iter_rows() if r["idx"] % world == self.rank] if val_ds is not None else []
        else:
            train_rows, val_rows = self.loop_config["train_rows"], self.loop_config.get("val_rows", [])
        self.has_val = bool(self.loop_config.get("has_val", val_rows))
        train_rows.sort(key=lambda r: r["idx"])
        val_rows.sort(key=lambda r: r["idx"])
        if tc.max_eval_samples:
            val_rows = (
                [r for r in val_rows if r["idx"] < tc.max_eval_samples]
                if world > 1
                else val_rows[: tc.max_eval_samples]
            )
        self.val_rows = val_rows
        self.examples, self.targets, self.options, cut = [], [], [], 0
        for s in range(0, len(train_rows), ENCODE_CHUNK):
            rows = train_rows[s : s + ENCODE_CHUNK]
            forms = [encode_records(self.tokenizer, rows, cfg.model.max_seq_len, form) for form in (False, True)]
            firsts = option_first_tokens(self.tokenizer, rows, forms[0])
            for r, pair, first in zip(rows, zip(*forms), firsts, strict=True):
                if any(e.truncated for e in pair):  # the answer would be cut: report it, never train on half an answer
                    cut += 1
                    continue
                self.examples.append(pair)
                self.targets.append(model.bank.row_of(r.get("uuid") or ""))
                self.options.append((first, int(r["answer_index"])))
        cut_total = sum(gather(cut))
        if cut_total:
            self.progress.note(
                f"sft: {cut_total} training records skipped: their answer is beyond model.max_seq_len={cfg.model.max_seq_len}"
            )
        # Every worker must take the same number of steps (collectives and report() are barriers).
        micro_per_epoch = allreduce_min(len(self.examples) // tc.batch_size)
        self.steps_per_epoch = micro_per_epoch // tc.accumulation_steps
        self.total_steps = tc.max_steps or self.steps_per_epoch * tc.epochs
        if self.total_steps <= 0:
            raise ValueError(
                f"no training steps: {len(self.examples)} examples per worker, batch {tc.batch_size}, "
                f"accumulation {tc.accumulation_steps}"
            )

    def _resume(self) -> None:
        """From the latest checkpoint Ray Train holds for this run, if any; and one line per attempt."""
        checkpoint = None
        if self.under_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                try:
                    load_adapter_weights(self.core, d)
                except UserError as e:  # e.g. a run begun before a default changed (model.reader_encoder)
                    raise UserError(
                        f"the checkpoint in {self.out_dir} does not fit this run's model ({e}); to resume it, set "
                        "each model.* key named there to its adapter value, or start a new run in a fresh "
                        "training.output_dir"
                    ) from None
                state = load_train_state(Path(d))
            check_same_run(state.get("run"), self.tc, self.out_dir)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:  # the memory modules changed shape, or their parameter groups
                raise UserError(
                    f"the checkpoint in {self.out_dir} was written by another version of the memory modules "
                    f"or with another training.prior_lr_scale ({e}); start a new run in a fresh "
                    "training.output_dir, or from its weights with dataset.pretrained_sft_model_path"
                ) from None
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.micro_done, self.best = (
                state[k] for k in ("step", "epoch", "micro_done", "best")
            )
            self.progress.note(
                f"sft: resumed from the checkpoint at step {self.step} (epoch {self.epoch + 1}, micro-batch {self.micro_done})"
            )
        if self.rank == 0:  # where it started, on which node, device and process group
            self.out_dir.mkdir(parents=True, exist_ok=True)
            attempt = {
                "start_step": self.step,
                "time": time.time(),
                "device": str(self.device),
                "bank": self.load_cfg.model.cache_path,
                "adapter": self.adapter,
                "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            }
            if self.under_ray:
                import ray

                attempt.update(
                    node=ray.get_runtime_context().get_node_id(), driver_node=self.loop_config.get("driver_node")
                )
            with open(self.out_dir / "attempts.jsonl", "a") as fh:
                fh.write(json.dumps(attempt) + "\n")

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        tc = self.tc
        self.model.train()
        self._t0 = time.time()
        while self.step < self.total_steps:
            micro_total = self.steps_per_epoch * tc.accumulation_steps
            order = epoch_order(
                len(self.examples),
                micro_total,
                tc.batch_size,
                self._length,
                tc.seed,
                self.epoch,
                tc.shuffle,
                tc.group_by_length,
            )
            done = self.micro_done // tc.accumulation_steps
            epoch_steps = min(self.steps_per_epoch, self.total_steps - self.step + done)
            self.progress.epoch_start(self.epoch, -(-self.total_steps // self.steps_per_epoch), epoch_steps, done)
            while self.micro_done < micro_total and self.step < self.total_steps:
                micro = [
                    order[(self.micro_done + a) * tc.batch_size : (self.micro_done + a + 1) * tc.batch_size]
                    for a in range(tc.accumulation_steps)
                ]
                loss, tokens = self._step(micro)
                self.micro_done += tc.accumulation_steps
                self.step += 1
                self._tokens += tokens
                self.progress.step(
                    self.micro_done // tc.accumulation_steps, loss, self.scheduler.get_last_lr()[0], tokens, self.world
                )
                self._inject_fault()
                if self.step % self.cfg.logging.log_every == 0 or self.step == self.total_steps:
                    self._log()
                if (
                    self.step % tc.checkpoint_every == 0
                    and self.micro_done < micro_total
                    and self.step < self.total_steps
                ):
                    self._report({"step": self.step, "epoch": self.epoch}, with_checkpoint=True)
            self._end_epoch()
        self.logger.finish()
        for folder in self.copies:  # loaded long ago; a restart writes them again from the object store
            shutil.rmtree(folder, ignore_errors=True)

    def _length(self, i: int) -> tuple[int, ...]:
        """Example i's lengths in this epoch's form, as it is batched: its answer part's then its
        prompt's (the whole sequence's with gradient checkpointing), so a batch pads little."""
        form = self.examples[i][int(open_form(i, self.epoch, self.tc.open_answer_share, self.tc.seed))]
        if self.tc.gradient_checkpointing:
            return (len(form.input_ids),)
        return tuple(len(part.input_ids) for part in reversed(split_prompt(form)))

    def _step(self, micro_batches: list[list[int]]) -> tuple[torch.Tensor, int]:
        """One optimizer step over micro-batches of example indices -> (the last micro-batch's LM
        loss, still on the device: no host sync per step; the step's tokens). Only the final
        micro-step all-reduces gradients."""
        tc, device = self.tc, self.device
        tokens = 0
        for a, idx in enumerate(micro_batches):
            # Word dropout's masks depend only on where the run is, so a resumed run draws the ones it
            # would have drawn (on any device, for every worker): no generator state to checkpoint.
            where = f"word_dropout:{tc.seed}:{self.rank}:{self.step}:{a}"
            self.core.dropout_seed = random.Random(where).getrandbits(63)
            is_open = [open_form(i, self.epoch, tc.open_answer_share, tc.seed) for i in idx]
            forms = [self.examples[i][int(o)] for i, o in zip(idx, is_open)]
            pad = self.tokenizer.pad_token_id
            if tc.gradient_checkpointing:  # the whole sequence with gradients, its layers recomputed
                host = [collate(forms, pad)]
            else:  # the prompt without gradients, the answer with them
                host = [collate(list(p), pad) for p in zip(*map(split_prompt, forms))]
            tokens += sum(int(part["attention_mask"].sum()) for part in host)  # counted on the host
            parts = [{k: v.to(device) for k, v in part.items()} for part in host]
            gold = torch.tensor([self.targets[i] for i in idx], device=device)
            hide, hide_others = (
                torch.tensor([absent(i, self.epoch, rate, tc.seed, what) for i in idx], device=device)
                for rate, what in ((tc.absent_rate, "own"), (tc.others_absent_rate, "others"))
            )
            hide &= gold >= 0  # a question whose own row is unknown has none to hide
            options, right, option_tokens = self._options(idx, is_open)
            last = a == len(micro_batches) - 1
            sync = nullcontext() if (last or self.world == 1) else self.model.no_sync()
            with sync, self.autocast():
                if len(parts) == 1:
                    batch = parts[0]
                    out = self.model(
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["query_index"],
                        batch["words"],
                        batch["slots"],
                        target_rows=gold,
                        hide=hide,
                        logits_index=batch["loss_index"],
                        option_tokens=option_tokens,
                        hide_others=hide_others,
                    )
                else:
                    out = self.model(
                        prompt=parts[0],
                        answer=parts[1],
                        target_rows=gold,
                        hide=hide,
                        option_tokens=option_tokens,
                        hide_others=hide_others,
                    )
                batch = parts[-1]
                at = batch["loss_index"]
                # absent_target: no answer to teach where the fact is gone (spread_choices: only to
                # questions with options)
                spread = None if tc.absent_target == "answer" else hide
                if tc.absent_target == "spread_choices":
                    spread = hide & (options[:, 0] >= 0)
                loss = lm_loss(
                    out.logits, batch["input_ids"], at if spread is None else at.masked_fill(spread[:, None], -1)
                )
                zero = torch.zeros((), device=device)
                reading = out.retrieval_loss if out.retrieval_loss is not None else zero
                exclusion = out.exclusion_loss if out.exclusion_loss is not None else zero
                choice = option_loss(out.logits, batch["slots"], at, options, right, spread, out.ruled_out)
                total = loss + tc.retrieval_loss_weight * (reading + exclusion) + tc.option_loss_weight * choice
                (total / len(micro_batches)).backward()
            # To the host when logged, not every step.
            self._window.append(tuple(x.detach() for x in (loss, reading, exclusion, choice)))
            if out.ruled_out is not None:
                self._hidden += torch.stack([hide.sum(), (hide & (out.ruled_out >= 0).any(1)).sum()])
            self._samples += len(idx)
        self.core.dropout_seed = None  # a training forward outside the loop draws from torch's generator
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), tokens

    def _options(self, idx: list[int], is_open: list[bool]) -> tuple[torch.Tensor, ...]:
        """For the option loss, each multiple-choice question's options' first tokens (b, K) (-1: an
        open question) and its right option (b,); for the exclusion, every question's right option's
        first token then the wrong ones' that differ from it (b, 1 + K), whatever its form."""

        def padded(rows: list[list[int]]) -> torch.Tensor:
            width = max(map(len, rows), default=0) or 1
            return torch.tensor([r + [-1] * (width - len(r)) for r in rows], device=self.device)

        firsts = [self.options[i] for i in idx]
        options = padded([[] if o else ids for (ids, _), o in zip(firsts, is_open)])
        right = torch.tensor([r if ids and not o else 0 for (ids, r), o in zip(firsts, is_open)], device=self.device)
        named = [[ids[r]] + [t for t in ids if t != ids[r]] if ids else [] for ids, r in firsts]
        return options, right, padded(named)

    def _log(self) -> None:
        elapsed = time.time() - self._t0
        losses = torch.stack([torch.stack(pair) for pair in self._window]).mean(0).tolist()
        self._window = []
        hidden, ruled = allreduce_sum(self._hidden).tolist()  # every worker's questions, not rank 0's
        self._hidden.zero_()
        self.logger.log(
            {
                "loss": losses[0],
                "retrieval_loss": losses[1],
                "exclusion_loss": losses[2],
                "option_loss": losses[3],
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": self._tokens * self.world / max(elapsed, 1e-9),
                "samples_per_s": self._samples * self.world / max(elapsed, 1e-9),
                "epoch": self.epoch,
                **({"hidden_ruled_out": ruled / hidden} if hidden else {}),
                **peak_memory(self.device),
            },
            self.step,
        )

    def _inject_fault(self) -> None:
        """training.fail_at_step: the last worker exits once, for the recovery tests."""
        if not (self.tc.fail_at_step and self.step == self.tc.fail_at_step and self.rank == self.world - 1):
            return
        marker = self.out_dir / ".fault_injected"
        if not marker.exists():
            marker.write_text(str(self.step))
            time.sleep(3)  # give the controller time to register the checkpoints reported so far
            print(f"sft: fault injection: worker {self.rank} exits at step {self.step}")
            os._exit(1)

    def _end_epoch(self) -> None:
        """End of an epoch (or of the step budget): validate on every worker, report, save."""
        metrics: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        if self.has_val:
            t_val = time.time()
            metrics.update(self._validate())
            self.progress.validated(metrics, time.time() - t_val)
            acc = metrics.get("val_accuracy", -1.0)
            if self.rank == 0 and acc > self.best:
                self.best = acc
                save_adapter(
                    self.core, self.out_dir / "sft_best", {**self.provenance, "val_accuracy": acc, "step": self.step}
                )
        self.logger.log(metrics, self.step)
        self.epoch += 1
        self.micro_done = 0
        self._report(metrics, with_checkpoint=True)
        if self.rank == 0:
            save_adapter(
                self.core, self.out_dir / "sft_latest", {**self.provenance, "step": self.step, "epoch": self.epoch}
            )

    # ------------------------------------------------------------------ validation and checkpoints

    def _validate(self) -> dict[str, Any]:
        """Every validation row scored once, over all workers: with options, and (when training
        asks without them) generated."""
        cfg, tc = self.cfg, self.tc
        with self.autocast():
            sums = evaluate_records(self.core, self.tokenizer, self.val_rows, cfg.model.max_seq_len, tc.eval_batch_size)
            metrics = summarize(merge_sums(gather(sums)))
            if tc.open_answer_share > 0:
                sums = evaluate_open(
                    self.core, self.tokenizer, self.val_rows, cfg.model.max_seq_len, tc.eval_batch_size
                )
                metrics.update(summarize_open(merge_sums(gather(sums)), prefix="val_open_"))
        return metrics

    def _report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Barrier on every rank; rank 0 alone attaches the checkpoint."""
        if not self.under_ray:
            return
        import ray.train

        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if with_checkpoint and self.rank == 0:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                self.save_checkpoint(Path(tmp))
                ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(flat)

    def save_checkpoint(self, folder: Path) -> None:
        save_checkpoint(
            folder,
            self.core,
            self.optimizer,
            self.scheduler,
            {
                "step": self.step,
                "epoch": self.epoch,
                "micro_done": self.micro_done,
                "best": self.best,
                "run": run_keys(self.tc),
            },
        )


def _share(key: str) -> float:
    """A number in [0, 1) that depends only on key: the same choices in every run and after a resume."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def open_form(i: int, epoch: int, share: float, seed: int) -> bool:
    """Whether training example i is asked without options in this epoch."""
    return _share(f"open:{seed}:{epoch}:{i}") < share


def absent(i: int, epoch: int, rate: float, seed: int, what: str = "own") -> bool:
    """Whether training example i's own memory row ("own"), or its other facts' ("others"), are kept
    from the reader in this epoch: independent draws."""
    salt = "" if what == "own" else f"{what}:"
    return _share(f"absent:{salt}{seed}:{epoch}:{i}") < rate


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
