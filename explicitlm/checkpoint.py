"""A training checkpoint: the adapter folder plus the optimizer, scheduler and the loop's position,
enough to resume exactly (nothing random in a step depends on a generator's state); loaded without
pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from explicitlm.adapter import save_adapter
from explicitlm.errors import UserError
from explicitlm.model import ExplicitLM

TRAIN_STATE = "train_state.pt"

# The training keys that make a run what it is: what each step computes, which questions it takes and
# how the learning rate moves. A checkpoint records them, and a run that resumes it must have the same.
# Where the run writes, how often it checkpoints, its evaluation and its workers' threads may change,
# and so may its length (epochs, max_steps: a run resumed with more steps goes on to them, its
# learning rate's decay stretched to the new end).
RUN_KEYS = (
    "learning_rate",
    "weight_decay",
    "prior_lr_scale",
    "batch_size",
    "accumulation_steps",
    "warmup_steps",
    "grad_clip",
    "retrieval_loss_weight",
    "option_loss_weight",
    "absent_rate",
    "others_absent_rate",
    "absent_target",
    "word_dropout",
    "others_null",
    "open_answer_share",
    "trainable_modules",
    "num_workers",
    "seed",
    "shuffle",
    "group_by_length",
)


def run_keys(training: Any) -> dict[str, Any]:
    """The `RUN_KEYS` of a `TrainingConfig`, as a checkpoint records them (a list as a set would be:
    sorted, so that the same modules named in another order are the same run)."""
    return {k: sorted(v) if isinstance(v := getattr(training, k), list) else v for k in RUN_KEYS}


def check_same_run(recorded: dict[str, Any] | None, training: Any, where: Path | str) -> None:
    """A UserError naming every run key whose value differs from the checkpoint's; a checkpoint written
    before checkpoints recorded them (recorded None) is taken as it is."""
    if recorded is None:
        return
    now = run_keys(training)
    changed = [
        f"training.{k}: {recorded[k]!r} there, {now[k]!r} now"
        for k in RUN_KEYS
        if k in recorded and recorded[k] != now[k]
    ]
    if changed:
        raise UserError(
            f"the checkpoint in {where} was written by a run with other training settings ({'; '.join(changed)}); "
            "set them back to resume it, or start a new run in a fresh training.output_dir (or from its weights "
            "with dataset.pretrained_sft_model_path)"
        )


def recorded_run(storage: Path) -> dict[str, Any] | None:
    """The run keys recorded by the checkpoint a rerun resumes from: Ray Train's latest in `storage`
    (the run's folder under its storage path), by its snapshot or else by name (they are timestamps).
    None where there is none, or it is unreadable, or it predates the record: the workers check again
    when they load it."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        found = sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir())
        name = found[-1] if found else None
    if name is None or not (storage / name / TRAIN_STATE).is_file():
        return None
    try:  # mapped, not read: the optimizer's state beside the record can weigh gigabytes
        return load_train_state(storage / name, mmap=True).get("run")
    except (OSError, RuntimeError):
        return None


def save_checkpoint(folder: Path, model: ExplicitLM, optimizer, scheduler, state: dict[str, Any]) -> None:
    save_adapter(model, folder)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
        },
        folder / TRAIN_STATE,
    )


def load_train_state(folder: Path, mmap: bool = False) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code.
    return torch.load(folder / TRAIN_STATE, weights_only=True, map_location="cpu", mmap=mmap)
