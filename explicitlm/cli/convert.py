"""Convert OMCQ multiple-choice questions to chat-format SFT records on Ray Data.

    explicitlm-convert --input omcq.json --output sft.jsonl [--rejects bad.jsonl]
                       [--max-samples N] [--format jsonl|parquet]

Input: the reference format (one JSON array, streamed, never loaded whole) or JSONL of the same
items. Bad rows go to the rejects file with their position and reason; the good ones are converted.
Exit codes: 0 converted; 1 converted, but the input ends mid-array (every complete item is kept and
the byte offset of the break reported); 2 nothing usable (a missing or empty input, every row
rejected) or a wrong option. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from explicitlm.cli import command
from explicitlm.errors import UserError

NAME = "explicitlm-convert"
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own mistakes: one line and exit 2 like every other
        raise UserError(f"{message} (--help lists the options)")


def output_format(output: str, fmt: str | None) -> str:
    """The output's format: --format, else its extension; the two must agree."""
    ext = Path(output).suffix.lower()
    implied = _FORMATS.get(ext)
    if fmt is None:
        return implied or "jsonl"
    if implied is not None and implied != fmt:
        better = Path(output).with_suffix(".parquet" if fmt == "parquet" else ".jsonl")
        raise UserError(
            f"--format {fmt} but --output {output} names a {implied} file: write to {better}, or drop --format"
        )
    return fmt


def check_input(path: Path) -> None:
    if not path.exists():
        raise UserError(f"no such input file: {path}")
    if path.is_dir():
        raise UserError(f"--input {path} is a folder: give the OMCQ file (JSON array or JSONL)")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip()
    if not head:
        raise UserError(f"--input {path} is empty: nothing to convert")
    if head.startswith(b"PAR1"):
        raise UserError(f"--input {path} is Parquet: the input is OMCQ as a JSON array or JSONL")
    if head.startswith(b"{") and b'"conversations"' in head.split(b"\n", 1)[0]:
        raise UserError(f"--input {path} holds converted records already: give the training programs it as it is")


def _no_rows(summary: dict[str, Any], path: Path) -> UserError:
    if summary["truncated_at_byte"] is not None and not summary["items_in"]:
        return UserError(f"{path} ends mid-array before its first complete item: restore the file")
    if not summary["items_in"]:
        return UserError(f"{path} holds no questions (an empty array or only blank lines)")
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["rejected_by_reason"].items())
    hint = ""
    if set(summary["rejected_by_reason"]) & {"missing_target", "not_an_object"}:
        hint = '; OMCQ items look like {"target":[{"question","options","correct_answer","uuid"}]}'
    return UserError(
        f"no usable question in {path}: all {summary['items_in']:,} items rejected ({reasons}){hint}; "
        f"each with its reason in {summary['rejects']}"
    )


def run(argv: list[str] | None = None) -> int:
    p = _Parser(prog=NAME, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="OMCQ questions: one JSON array (the reference format) or JSONL")
    p.add_argument("--output", required=True, help="converted records (.jsonl or .parquet)")
    p.add_argument(
        "--rejects", default=None, help="bad rows with their reasons; default: OUTPUT's name + .rejects.jsonl"
    )
    p.add_argument("--max-samples", type=int, default=0, help="convert at most this many input items (0: all)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default=None, help="default: from the output's extension")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    args = p.parse_args(argv)
    source = Path(args.input)
    fmt = output_format(args.output, args.format)
    check_input(source)

    from explicitlm.convert import convert

    summary = convert(source, args.output, args.rejects, args.max_samples, fmt, progress=not args.no_progress)
    s = summary.as_dict()
    if not s["converted"]:
        raise _no_rows(s, source)
    reasons = ", ".join(f"{k}: {v:,}" for k, v in s["rejected_by_reason"].items())
    print(
        f"convert: {s['items_in']:,} items in, {s['converted']:,} converted, {s['rejected']:,} rejected"
        + (f" ({reasons})" if reasons else "")
    )
    print(
        f"convert: {s['rows_per_s']:,.0f} items/s after a {s['startup_seconds']:.1f} s start-up (Ray, and the cut "
        f"of the input into ranges); {s['seconds']:.1f} s in all"
    )
    print(f"convert: records -> {s['output']}; rejects -> {s['rejects']}")
    if summary.truncated_at is not None:
        print(
            f"{NAME}: input {source} is truncated: it ends mid-array, its last complete item at byte "
            f"{summary.truncated_at}; every complete item was converted",
            file=sys.stderr,
        )
    print(json.dumps(s))
    return 1 if summary.truncated_at is not None else 0


def main(argv: list[str] | None = None) -> int:
    return command(NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
