"""A training checkpoint: the adapter folder plus the optimizer, scheduler, RNG state and the loop's
position, enough to resume exactly; loaded without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from explicitlm.adapter import save_adapter
from explicitlm.model import ExplicitLM

TRAIN_STATE = "train_state.pt"


def save_checkpoint(folder: Path, model: ExplicitLM, optimizer, scheduler, state: dict[str, Any]) -> None:
    save_adapter(model, folder)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            **state,
        },
        folder / TRAIN_STATE,
    )


def load_train_state(folder: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code.
    return torch.load(folder / TRAIN_STATE, weights_only=True, map_location="cpu")
