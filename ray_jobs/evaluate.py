"""Evaluate trained memory weights on an OMCQ or converted SFT file (the installed command
`explicitlm-evaluate`).

    python ray_jobs/evaluate.py eval.weights=runs/default/sft_latest eval.data=runs/default/data/val.parquet
    python ray_jobs/evaluate.py eval.weights=DIR eval.data=omcq.json model.cache_path=edited_bank.parquet \
        model.database_init_path=edited_knowledge.jsonl

The last line is one JSON object; --help lists the keys.
"""

from explicitlm.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
