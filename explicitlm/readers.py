"""One reader per file format, shared by every program: knowledge sentences (JSONL or the
reference's sentence array), converted SFT records (JSONL or Parquet), questions to evaluate (either
of those or raw OMCQ) and text for training a tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.errors import UserError


def read_knowledge(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield {"uuid","text"} from knowledge JSONL or the reference's sentence_trex_data.json array."""
    import ijson

    path = str(path)
    with open(path, "rb") as fh:
        first = fh.read(64).lstrip()[:1]
        fh.seek(0)
        if first == b"[":
            for item in ijson.items(fh, "item"):
                targets = item.get("target", [item]) if isinstance(item, dict) else []
                for t in targets if isinstance(targets, list) else [targets]:
                    text = t.get("text") or t.get("sentence")
                    if text:
                        yield {"uuid": str(t.get("uuid", "")), "text": str(text)}
        else:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text = row.get("text") or row.get("sentence")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{path}:{n}: knowledge row has no 'text'")
                yield {"uuid": str(row.get("uuid", "")), "text": text}


_PARQUET_MAGIC = b"PAR1"


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == _PARQUET_MAGIC


def question_format(path: str | Path) -> str:
    """'records' (converted SFT records: JSONL or Parquet) or 'omcq' (raw OMCQ items: one JSON array
    or JSONL), from the file's first bytes; anything else is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is a folder, not a file" if path.is_dir() else f"no such file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    if head.startswith(_PARQUET_MAGIC):
        return "records"
    text = head.lstrip()
    if not text:
        raise UserError(f"{path} is empty: no questions to read")
    if text.startswith(b"["):
        return "omcq"
    if text.startswith(b"{"):
        return "records" if b'"conversations"' in text.split(b"\n", 1)[0] else "omcq"
    raise UserError(f"{path} is neither JSON, JSONL nor Parquet (it starts with {head[:24]!r})")


_RECORD_KEYS = ("conversations", "options", "answer_index")


def check_parquet_records(path: str | Path) -> None:
    """A readable Parquet file with the columns of converted records, checked from its footer."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"cannot read {path} as Parquet (is it complete?): {e}") from None
    missing = [k for k in _RECORD_KEYS if k not in names]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} of converted records")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Converted SFT records (JSONL or Parquet) with a stable `idx` (their position)."""
    path = Path(path)
    if question_format(path) != "records":
        raise UserError(
            f"{path} holds OMCQ questions, not converted records: convert them first "
            f"(explicitlm-convert --input {path} --output {path.stem}.parquet)"
        )
    if _is_parquet(path):
        check_parquet_records(path)
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"cannot read {path} as Parquet (is it complete?): {e}") from None
    else:
        rows = []
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not JSON ({e.msg}): is the file complete?") from None
                missing = [k for k in _RECORD_KEYS if not isinstance(row, dict) or k not in row]
                if missing:
                    raise UserError(
                        f"{path} line {n} lacks {', '.join(missing)}: records written by explicitlm-convert have them "
                        "(convert the OMCQ source with it)"
                    )
                rows.append(row)
    for i, r in enumerate(rows):
        r["idx"] = i
    return rows


def load_questions(path: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Records from a converted SFT file (JSONL/Parquet) or raw OMCQ (JSON array or JSONL)."""
    from explicitlm.omcq_cut import plan_chunks
    from explicitlm.omcq_rows import _convert_chunk, _reason_key

    path = Path(path)
    if question_format(path) == "records":
        return read_records(path), Counter()
    kind, chunks, truncated = plan_chunks(path)
    if truncated is not None:
        raise UserError(
            f"{path} ends mid-array: its last complete item ends at byte {truncated.offset} (after {truncated.items} "
            "items); restore the file, or keep the complete items with explicitlm-convert"
        )
    records, rejected = [], Counter()
    with open(path, "rb") as fh:
        for c in chunks:
            fh.seek(c.start)
            good, bad, _ = _convert_chunk(fh.read(c.end - c.start), kind, c.first, c.count)
            for rec in good:
                rec["idx"] = len(records)
                records.append(rec)
            rejected.update(_reason_key(reason) for _, _, reason, _ in bad)
    return records, rejected


def read_texts(paths: Iterable[str]) -> Iterator[str]:
    """Lines of text files; for JSON/JSONL, every string value (questions, options, sentences)."""
    import ijson

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    for path in paths:
        with open(path, "rb") as fh:
            head = fh.read(1)
            fh.seek(0)
            if path.endswith(".json") and head == b"[":
                for item in ijson.items(fh, "item"):
                    yield from strings(item)
            elif path.endswith((".json", ".jsonl")):
                for line in fh:
                    if line.strip():
                        yield from strings(json.loads(line))
            else:
                for line in fh:
                    yield line.decode("utf-8", "replace").rstrip("\n")
