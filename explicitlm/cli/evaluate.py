"""Evaluate trained memory weights on an OMCQ or converted SFT file.

    explicitlm-evaluate eval.weights=runs/default/sft_latest eval.data=runs/default/data/val.parquet
    explicitlm-evaluate eval.weights=DIR eval.data=omcq.json model.cache_path=edited_bank.parquet
    explicitlm-evaluate eval.weights=DIR eval.data=val.parquet eval.mode=open   # answers generated

The memory bank is the one the `model.*` keys name (default: the one recorded beside the weights),
so an edited bank can be evaluated. A progress bar counts the questions; a short table follows; the
last line is one JSON object: accuracy, n, accuracy per predicate where the data names it, retrieval
recall where uuids link questions to rows. With eval.mode=open: exact match, token F1, and the share
of answers that name what another row says.
"""

from __future__ import annotations

import json
import time
from typing import Any

from explicitlm.cli import command
from explicitlm.cli.options import Program, load_cli

PROGRAM = Program(
    "explicitlm-evaluate",
    "Score trained memory weights on questions against a memory bank, with their options or without.",
    keys=("eval", "model", "training.torch_threads"),
    required=("eval.data",),
)


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            "questions",
            f"{result['n']:,}"
            + (f" ({sum(result['rejected'].values()):,} rows rejected)" if result["rejected"] else ""),
        ),
    ]
    if result["mode"] == "open":
        rows += [
            ("exact match", f"{result['exact_match']:.3f}"),
            ("token F1", f"{result['token_f1']:.3f}"),
            ("answers naming another row's", f"{result['other_row_answers']:.3f}"),
        ]
    else:
        rows.append(("option accuracy", f"{result['accuracy']:.3f}"))
    if "recall@1" in result:
        rows.append(("retrieval recall@1", f"{result['recall@1']:.3f} (@k {result['recall@k']:.3f})"))
    rows.append(("layers that trust memory", f"{result['memory_read']:.3f}"))
    if result.get("per_predicate"):
        rows.append(("per relation", ", ".join(f"{k} {v:.2f}" for k, v in result["per_predicate"].items())))
    return rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_cli(argv, PROGRAM)
    t0 = time.time()
    from explicitlm.evaluation import evaluate
    from explicitlm.readers import question_format
    from explicitlm.tracking import print_table, question_bar, quiet_process

    quiet_process()
    question_format(cfg.eval.data)  # a missing, empty or unreadable file: before the model loads
    if cfg.eval.num_gpus > 0:
        result = on_gpu_worker(cfg)
    else:
        with question_bar("evaluate") as tick:
            result = evaluate(cfg, progress=tick)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"evaluate: {cfg.eval.weights or 'untrained memory'} on {cfg.eval.data}, {result['bank_rows']:,} memory rows")
    print_table(table(result))
    print(json.dumps(result))
    return result


def on_gpu_worker(cfg) -> dict[str, Any]:
    """The evaluation in a Ray task holding `eval.num_gpus` GPUs (a cluster's GPU worker, when the job
    runs on its CPU head); its device is then the task's GPU (eval.device auto or cuda)."""
    from dataclasses import replace

    import ray

    from explicitlm.errors import UserError
    from explicitlm.evaluation import evaluate
    from explicitlm.pipeline import absolute_path
    from explicitlm.tracking import joined_cluster, start_ray

    started_here = not ray.is_initialized()
    started = start_ray()
    if started:
        print(started)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.eval.num_gpus:
            if not joined_cluster():  # one machine's Ray cannot add GPUs: waiting would be forever
                raise UserError(
                    f"eval.num_gpus={cfg.eval.num_gpus:g} but this machine's Ray has {gpus:g} GPUs: "
                    "drop it, or submit to a cluster"
                )
            print(f"evaluate: the cluster has {gpus:g} GPUs now; the task waits for its autoscaler to add a GPU node")
        # The task may run on another node, from another folder: every path as this process reads it.
        m, e = cfg.model, cfg.eval
        cfg = replace(
            cfg,
            eval=replace(e, data=absolute_path(e.data), weights=absolute_path(e.weights)),
            model=replace(
                m,
                qwen3_model_path=absolute_path(m.qwen3_model_path),
                cache_path=absolute_path(m.cache_path),
                database_init_path=absolute_path(m.database_init_path),
            ),
        )
        print(f"evaluate: in a Ray task holding {cfg.eval.num_gpus:g} GPU(s)")
        return ray.get(ray.remote(num_gpus=cfg.eval.num_gpus, max_retries=0)(evaluate).remote(cfg))
    finally:
        if started_here:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return command(PROGRAM.name, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
