"""Convert OMCQ multiple-choice questions to chat-format SFT records on Ray Data (the installed
command `explicitlm-convert`).

    python ray_jobs/convert.py --input omcq.json --output sft.jsonl [--rejects bad.jsonl]
                               [--max-samples N] [--format jsonl|parquet]

Exit codes: 0 converted; 1 converted, but the input ends mid-array (the complete items are kept);
2 nothing usable or a wrong option. --help says more.
"""

from explicitlm.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
