"""Rank 0's training metrics: `metrics.jsonl` always, SwanLab when enabled, and a plot of them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from explicitlm.config import Config


class MetricsLogger:
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
