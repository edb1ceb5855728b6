"""Frozen-base SFT of the memory modules on Ray Train.

    python ray_jobs/sft.py                                  # embedded default: tiny Qwen3, sample facts
    python ray_jobs/sft.py --config-name sft_omcq key=value ...
    ray job submit --working-dir . -- python ray_jobs/sft.py training.output_dir=/shared/run ...

Re-running with the same `training.output_dir` resumes from its latest checkpoint. Before any worker
starts, the job prints its memory estimate per GPU worker and stops if it cannot fit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from explicitlm.config import parse_cli


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(argv)  # config errors exit here, before any work
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from explicitlm.config import ConfigError
    from explicitlm.estimate import MemoryEstimateError, job_estimate
    from explicitlm.pipeline import ensure_bank, prepare, read_records_dataset, share_inputs, to_parquet_records
    from explicitlm.tracking import plot_metrics
    from explicitlm.train import train_loop_per_worker

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    try:
        cfg = prepare(cfg)
        bank = ensure_bank(cfg)
        estimate = job_estimate(cfg, len(bank))  # prints it; stops a config that cannot fit
    except (ConfigError, MemoryEstimateError) as e:
        print(f"{'config error' if isinstance(e, ConfigError) else 'memory'}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(cfg.training.output_dir)
    # Workers read no driver-local path: the records, the bank's files and a starting adapter's
    # travel through the object store; the backbone and output_dir are on storage every node reads.
    shared = share_inputs(cfg)
    train_path = to_parquet_records(cfg.dataset.sft_dataset_path, out)
    datasets = {"train": read_records_dataset(train_path)}
    if cfg.dataset.sft_val_dataset_path:
        datasets["val"] = read_records_dataset(to_parquet_records(cfg.dataset.sft_val_dataset_path, out))
    print(
        f"sft: {datasets['train'].count()} training records, "
        f"{datasets['val'].count() if 'val' in datasets else 0} validation records, {len(bank)} memory rows"
    )

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": asdict(cfg),
            "has_val": "val" in datasets,
            **shared,
            "memory_estimate": estimate.as_dict(),
            "driver_node": ray.get_runtime_context().get_node_id(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.training.num_workers,
            use_gpu=cfg.training.use_gpu,
            resources_per_worker={"GPU" if cfg.training.use_gpu else "CPU": 1, **cfg.training.worker_resources},
        ),
        datasets=datasets,
        # Validation is not split by Ray: each worker scores its own rows (idx % world), each once.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name="sft",
            storage_path=str(out / "ray_results"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.training.max_failures),
        ),
    )
    result = trainer.fit()
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        plot_metrics(metrics_path, out / "metrics.png")
    final = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val_") or k in ("step", "epoch")}
    summary = {
        "weights": str(out / "sft_latest"),
        "best": str(out / "sft_best"),
        "metrics": str(metrics_path),
        "plot": str(out / "metrics.png"),
        **final,
    }
    if cfg.eval.memory_checks and "val" in datasets and (out / "sft_latest").exists():
        from explicitlm.evaluation import memory_checks
        from explicitlm.readers import read_records

        val = read_records(to_parquet_records(cfg.dataset.sft_val_dataset_path, out))
        if cfg.training.max_eval_samples:
            val = val[: cfg.training.max_eval_samples]
        summary["memory_checks"] = memory_checks(cfg, str(out / "sft_latest"), val, bank)
    print("sft: done " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
