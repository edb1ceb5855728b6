"""Evaluate trained memory weights on an OMCQ or converted SFT file.

    python ray_jobs/evaluate.py eval.weights=runs/default/sft_latest eval.data=runs/default/data/val.parquet
    python ray_jobs/evaluate.py eval.weights=DIR eval.data=omcq.json model.cache_path=edited_bank.parquet \
        model.database_init_path=edited_knowledge.jsonl

The memory bank is the one the `model.*` keys name (default: the one recorded beside the weights),
so an edited bank can be evaluated. The last line is one JSON object: accuracy, n, accuracy per
predicate where the data names it, retrieval recall where uuids link questions to rows.
"""

from __future__ import annotations

import json
import sys

from explicitlm.config import parse_cli


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(argv)
    if not cfg.eval.data:
        print("config error: eval.data is required", file=sys.stderr)
        raise SystemExit(2)
    from explicitlm.evaluation import evaluate

    result = evaluate(cfg)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
