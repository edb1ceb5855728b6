"""Frozen-base SFT of the memory modules on Ray Train.

    explicitlm-sft                                  # embedded default: tiny Qwen3, sample facts
    explicitlm-sft --config-name sft_omcq key=value ...
    ray job submit --working-dir . -- python ray_jobs/sft.py training.output_dir=/shared/run ...

Re-running with the same `training.output_dir` resumes from its latest checkpoint. Before any worker
starts, the job prints its memory estimate per GPU worker and stops if it cannot fit. The console shows
one progress bar per epoch (loss, lr, tokens/s, ETA) and each epoch's validation once, then a short
table; the last line is one JSON object with everything in the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from explicitlm.cli import command
from explicitlm.cli.options import Program, load_cli
from explicitlm.config import Config
from explicitlm.errors import UserError

RUN_NAME = "sft"  # Ray Train's run, and its folder under {output_dir}/ray_results
PROGRAM = Program(
    "explicitlm-sft",
    "Train the memory modules of a frozen Qwen3 on Ray Train, then check that the knowledge lives in "
    "the memory. With no keys: the embedded default (a tiny Qwen3 and real geography facts, built "
    "under training.output_dir).",
    keys=("model", "dataset", "training", "logging", "eval.batch_size", "eval.memory_checks", "eval.device"),
)


def check_paths(cfg: Config) -> None:
    """The files and folders the config names, before Ray starts or anything is built."""
    from explicitlm.loading import check_backbone, check_weights
    from explicitlm.readers import question_format

    if cfg.model.qwen3_model_path:
        check_backbone(cfg.model.qwen3_model_path)
    for key in ("sft_dataset_path", "sft_val_dataset_path"):
        path = getattr(cfg.dataset, key)
        if path:
            try:
                question_format(path)
            except UserError as e:
                raise UserError(f"dataset.{key}: {e}") from None
    if cfg.dataset.pretrained_sft_model_path:
        check_weights(cfg.dataset.pretrained_sft_model_path)
    knowledge = cfg.model.database_init_path
    if knowledge and not Path(knowledge).is_file():
        raise UserError(f"model.database_init_path={knowledge} is not a file: give the knowledge sentences")


def check_inputs(cfg: Config) -> None:
    """Expected mistakes found on the driver once the inputs are prepared, before any worker starts."""
    from explicitlm.loading import check_backbone
    from explicitlm.tracking import joined_cluster

    m, t = cfg.model, cfg.training
    check_backbone(m.qwen3_model_path)
    if (m.recompute_cache or not Path(m.cache_path).exists()) and not Path(m.database_init_path or "").is_file():
        raise UserError(
            f"no memory bank at {m.cache_path} and model.database_init_path={m.database_init_path!r} is not a file: "
            'give the knowledge sentences (JSONL {"uuid","text"} or sentence_trex_data.json)'
        )
    if t.use_gpu and not joined_cluster():  # a cluster's autoscaler may add GPU nodes; one machine cannot
        import ray

        if not ray.cluster_resources().get("GPU"):
            raise UserError("training.use_gpu=true but this machine's Ray has no GPU: drop it, or submit to a cluster")
    if cfg.eval.memory_checks and cfg.eval.device == "cuda":  # the closing checks run here, on the driver
        from explicitlm.loading import resolve_device

        resolve_device("cuda", "eval.device")


def _final_metrics(metrics_path: Path) -> dict[str, Any]:
    """The last validation rank 0 wrote (with its per-relation accuracy, which Ray's report drops)."""
    last: dict[str, Any] = {}
    if metrics_path.exists():
        for line in open(metrics_path):
            row = json.loads(line)
            if "val_accuracy" in row:
                last = row
    return {k: v for k, v in last.items() if k.startswith("val_")}


def _table(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("weights", f"{summary['weights']} (best by validation: {summary['best']})")]
    if "val_accuracy" in summary:
        rows += [
            ("held-out questions", f"{summary['val_n']:,}"),
            ("option accuracy", f"{summary['val_accuracy']:.3f}"),
        ]
        if "val_recall@1" in summary:
            rows.append(("retrieval recall@1", f"{summary['val_recall@1']:.3f} (mean over layers)"))
        rows.append(("layers that read memory", f"{summary['val_memory_read']:.3f}"))
        per = summary.get("val_per_predicate") or {}
        if per:
            rows.append(("per relation", ", ".join(f"{k} {v:.2f}" for k, v in per.items())))
    checks = summary.get("memory_checks") or {}
    if checks:

        def rule(key: str) -> str:  # the no-training word rule beside the model, where it was scored
            return f"; word rule {checks[key]:.3f}" if key in checks else ""

        rows += [
            ("memory checks: bare backbone", f"{checks['bare_accuracy']:.3f}"),
            ("  word rule, no training", f"{checks['rule_accuracy']:.3f}" if "rule_accuracy" in checks else "-"),
            (
                "  own rows removed",
                f"{checks['without_own_rows_accuracy']:.3f} (layers that read memory "
                f"{checks['without_own_rows_memory_read']:.3f}){rule('rule_without_own_rows_accuracy')}",
            ),
        ]
        if "edit_following" in checks:
            rows.append(
                ("  own rows edited: answers follow", f"{checks['edit_following']:.3f}{rule('rule_edit_following')}")
            )
    return rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The main job; returns the summary that its last line prints."""
    cfg = load_cli(argv, PROGRAM)  # config errors stop here, before any work
    check_paths(cfg)
    t0 = time.time()
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from explicitlm.checkpoint import check_same_run, recorded_run
    from explicitlm.estimate import job_estimate
    from explicitlm.pipeline import ensure_bank, prepare, read_records_dataset, share_inputs, to_parquet_records
    from explicitlm.tracking import (
        TrainingConsole,
        plot_metrics,
        print_table,
        progress_board,
        question_bar,
        start_ray,
    )
    from explicitlm.train import train_loop_per_worker

    ray_started_here = not ray.is_initialized()
    started = start_ray()
    if started:
        print(started)
    cfg = prepare(cfg)
    out = Path(cfg.training.output_dir)
    storage = out / "ray_results"  # Ray Train's checkpoints
    # A resume with other settings stops here, once, not in every worker at every retry.
    check_same_run(recorded_run(storage / RUN_NAME), cfg.training, out)
    check_inputs(cfg)
    bank = ensure_bank(cfg)
    estimate = job_estimate(cfg, len(bank))  # prints it; stops a config that cannot fit
    # Workers read no driver-local path: the records, the bank's files and a starting adapter's
    # travel through the object store; the backbone and output_dir are on storage every node reads.
    shared = share_inputs(cfg)
    datasets = {"train": read_records_dataset(to_parquet_records(cfg.dataset.sft_dataset_path, out))}
    if cfg.dataset.sft_val_dataset_path:
        datasets["val"] = read_records_dataset(to_parquet_records(cfg.dataset.sft_val_dataset_path, out))
    tc = cfg.training
    n_train, n_val = datasets["train"].count(), datasets["val"].count() if "val" in datasets else 0
    if n_train // tc.num_workers < tc.batch_size * tc.accumulation_steps:
        raise UserError(
            f"{n_train} training questions are too few for one step of training.batch_size={tc.batch_size} "
            f"x accumulation_steps={tc.accumulation_steps} on each of training.num_workers={tc.num_workers}: lower them"
        )
    print(
        f"sft: {n_train:,} training and {n_val:,} validation questions, {len(bank):,} memory rows; "
        f"{tc.num_workers} {'GPU' if tc.use_gpu else 'CPU'} workers, output in {out}"
    )

    board = progress_board()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": asdict(cfg),
            "has_val": "val" in datasets,
            "console": board,
            **shared,
            "memory_estimate": estimate.as_dict(),
            "driver_node": ray.get_runtime_context().get_node_id(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"GPU" if tc.use_gpu else "CPU": 1, **tc.worker_resources},
        ),
        datasets=datasets,
        # Validation is not split by Ray: each worker scores its own rows (idx % world), each once.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            # Ray Train's own INFO lines (each report of each rank, each checkpoint) stay in its logs.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    with TrainingConsole().follow(board):
        result = trainer.fit()
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        plot_metrics(metrics_path, out / "metrics.png")
    summary: dict[str, Any] = {
        "weights": str(out / "sft_latest"),
        "best": str(out / "sft_best"),
        "metrics": str(metrics_path),
        "plot": str(out / "metrics.png"),
        **{k: v for k, v in (result.metrics or {}).items() if k in ("step", "epoch")},
        **_final_metrics(metrics_path),
    }
    if cfg.eval.memory_checks and "val" in datasets and (out / "sft_latest").exists():
        from explicitlm.evaluation import memory_checks
        from explicitlm.readers import read_records

        val = read_records(to_parquet_records(cfg.dataset.sft_val_dataset_path, out))
        if tc.max_eval_samples:
            val = val[: tc.max_eval_samples]
        print(f"sft: memory checks on {len(val):,} held-out questions (bare backbone, own rows removed, edited)")
        with question_bar("memory checks", 3 * len(val)) as tick:
            summary["memory_checks"] = memory_checks(cfg, str(out / "sft_latest"), val, bank, tick)
    summary["seconds"] = round(time.time() - t0, 1)
    minutes, seconds = divmod(round(summary["seconds"]), 60)
    print(f"sft: done in {minutes} min {seconds} s")
    print_table(_table(summary))
    if ray_started_here:
        ray.shutdown()  # before the last line: nothing of Ray's may follow it
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    return command(PROGRAM.name, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
