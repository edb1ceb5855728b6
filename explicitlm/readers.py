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

import pyarrow.parquet as pq


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


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Converted SFT records (JSONL or Parquet) with a stable `idx` (their position)."""
    path = Path(path)
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for i, r in enumerate(rows):
        r["idx"] = i
    return rows


def load_questions(path: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Records from a converted SFT file (JSONL/Parquet) or raw OMCQ (JSON array or JSONL)."""
    from explicitlm.convert import _convert_chunk, _reason_key, plan_chunks

    path = Path(path)
    if path.suffix == ".parquet":
        return read_records(path), Counter()
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"{") and b'"conversations"' in head.split(b"\n", 1)[0]:
        return read_records(path), Counter()
    kind, chunks, truncated = plan_chunks(path)
    if truncated is not None:
        raise truncated
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
