"""Convert OMCQ multiple-choice questions to chat-format SFT records on Ray Data.

    python ray_jobs/convert.py --input omcq.json --output sft.jsonl [--rejects bad.jsonl]
                               [--max-samples N] [--format jsonl|parquet]

Input: the reference format (one JSON array, streamed, never loaded whole) or JSONL of the same
items. Bad rows go to the rejects file with their position and reason; the good ones are still
converted and the exit code is 0. A truncated file keeps every complete row, reports the byte
offset of the break and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explicitlm.convert import convert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--rejects", default=None, help="default: OUTPUT's name + .rejects.jsonl")
    p.add_argument("--max-samples", type=int, default=0, help="convert at most this many input items (0: all)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default=None, help="default: from the output's extension")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    fmt = args.format or ("parquet" if args.output.endswith(".parquet") else "jsonl")
    if not Path(args.input).exists():
        print(f"convert: no such input file: {args.input}", file=sys.stderr)
        return 2
    summary = convert(args.input, args.output, args.rejects, args.max_samples, fmt, progress=not args.no_progress)
    s = summary.as_dict()
    print(
        f"convert: {s['items_in']} items in, {s['converted']} converted, {s['rejected']} rejected "
        f"{s['rejected_by_reason']}, {s['rows_per_s']} items/s"
    )
    print(f"convert: records -> {s['output']}; rejects -> {s['rejects']}")
    if summary.truncated_at is not None:
        print(
            f"convert: input is truncated: the last complete item ends at byte {summary.truncated_at}", file=sys.stderr
        )
    print(json.dumps(s))
    return 1 if summary.truncated_at is not None else 0


if __name__ == "__main__":
    sys.exit(main())
