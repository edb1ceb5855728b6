"""OMCQ -> SFT records on Ray Data, streaming and in bounded memory, with every bad row accounted for.

1. Split (one process, vectorised): the input's top-level items are cut out as raw bytes without
   parsing them, a 64 MB window at a time, and written to Parquet shards with their position. A JSON
   array is split by a byte scanner that tracks strings and nesting depth; JSONL by lines. A file
   that ends mid-array keeps every complete item and reports the byte offset of the break.
2. Convert (Ray Data, parallel): `map_batches` decodes, validates and renders each item's targets.
3. Write (in order): good records to JSONL or Parquet, bad rows to the rejects file with position,
   reason and the raw text. Two runs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.data import RowError, iter_targets, parse_target

WINDOW = 64 << 20
SHARD_ROWS = 100_000
# Byte classes for the scanner.
_QUOTE, _BSLASH, _OPEN, _CLOSE, _COMMA = 1, 2, 3, 4, 5
_LUT = np.zeros(256, dtype=np.uint8)
_LUT[ord('"')] = _QUOTE
_LUT[ord("\\")] = _BSLASH
_LUT[[ord("{"), ord("[")]] = _OPEN
_LUT[[ord("}"), ord("]")]] = _CLOSE
_LUT[ord(",")] = _COMMA


class TruncatedInput(Exception):
    def __init__(self, offset: int, items: int):
        super().__init__(f"input ends mid-array: last complete item ends at byte {offset} (after {items} items)")
        self.offset = offset
        self.items = items


@dataclass
class _ScanState:
    in_string: bool = False
    depth: int = 0
    tail_backslashes: int = 0  # backslashes that ended the previous window
    closed: bool = False


def _scan_window(buf: bytes, base: int, st: _ScanState) -> list[int]:
    """Absolute offsets of the top-level separators (',' at depth 1, the closing ']') in buf.

    Vectorised: only the structural bytes are looked at, and strings, escapes and depth come from
    cumulative sums over them, so a 64 MB window takes a few numpy passes.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    pos = np.flatnonzero(_LUT[arr])  # (S,) the structural bytes
    kinds = _LUT[arr[pos]]
    quote = kinds == _QUOTE
    # A quote is escaped when an odd number of backslashes precedes it; such quotes are rare,
    # so their runs are counted one by one.
    qpos = pos[quote]
    maybe = qpos[(qpos > 0) & (arr[np.maximum(qpos - 1, 0)] == 92)] if len(qpos) else qpos
    if len(qpos) and qpos[0] == 0 and st.tail_backslashes % 2:
        maybe = np.union1d(maybe, [0])
    escaped = []
    for p in maybe.tolist():
        run, q = 0, p - 1
        while q >= 0 and buf[q] == 92:
            run += 1
            q -= 1
        if q < 0:
            run += st.tail_backslashes
        if run % 2:
            escaped.append(p)
    if escaped:
        quote &= ~np.isin(pos, escaped)
    # Inside a string when an odd number of unescaped quotes came before.
    parity = (np.cumsum(quote) - quote + int(st.in_string)) % 2 == 1  # (S,) state before each byte
    structural = ~parity & ~quote & (kinds >= _OPEN)
    sp, sk = pos[structural], kinds[structural]
    step = np.where(sk == _OPEN, 1, np.where(sk == _CLOSE, -1, 0))
    depth = st.depth + np.cumsum(step)  # (S',) depth after each byte
    sep_mask = ((sk == _COMMA) & (depth == 1)) | ((sk == _CLOSE) & (depth == 0))
    seps = (sp[sep_mask] + base).tolist()
    closing = np.flatnonzero((sk == _CLOSE) & (depth == 0))
    if len(closing):
        st.closed = True
        end = sp[closing[0]] + base
        seps = [x for x in seps if x <= end]
    st.in_string = bool((int(quote.sum()) + int(st.in_string)) % 2)
    st.depth = int(depth[-1]) if len(depth) else st.depth
    trailing = len(buf) - len(buf.rstrip(b"\\"))
    st.tail_backslashes = trailing + (st.tail_backslashes if trailing == len(buf) else 0)
    return seps


def iter_items(path: str | Path, window: int = WINDOW) -> Iterator[tuple[int, bytes]]:
    """Raw top-level items of a JSON array or JSONL file as (position, bytes), never parsed here.

    Raises TruncatedInput after the last complete item when an array is not closed.
    """
    with open(path, "rb") as fh:
        first = fh.read(4096).lstrip()[:1]
        fh.seek(0)
        if first != b"[":
            for n, line in enumerate(fh):
                if line.strip():
                    yield n, line.strip()
            return
        # Skip to just after the opening bracket: the array's items are at depth 1 from there.
        lead = 0
        while True:
            c = fh.read(1)
            lead += 1
            if c == b"[" or not c:
                break
        st = _ScanState(depth=1)
        held = b""  # bytes of the unfinished item, starting at absolute offset held_at
        held_at = base = lead
        n, last_end = 0, lead
        while not st.closed:
            buf = fh.read(window)
            if not buf:
                break
            seps = _scan_window(buf, base, st)
            data = held + buf
            item_start = held_at
            for s in seps:
                item = data[item_start - held_at : s - held_at].strip()
                if item:
                    # JSON strings hold no raw newlines: folding them keeps one item per line.
                    yield n, item.replace(b"\n", b" ").replace(b"\r", b" ")
                    n += 1
                last_end = s
                item_start = s + 1
            held = data[item_start - held_at :]
            held_at = item_start
            base += len(buf)
        if not st.closed:
            raise TruncatedInput(last_end, n)


def split_to_shards(path: str | Path, out_dir: Path, max_items: int = 0, shard_rows: int = SHARD_ROWS) -> tuple[list[str], int, TruncatedInput | None]:
    """Write raw items to Parquet shards (pos, raw); return (shard paths, items, truncation or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, positions, raws, n = [], [], [], 0
    truncated = None

    def flush() -> None:
        if positions:
            p = out_dir / f"items-{len(shards):05d}.parquet"
            pq.write_table(pa.table({"pos": pa.array(positions, pa.int64()), "raw": pa.array(raws, pa.binary())}), p)
            shards.append(str(p))
            positions.clear()
            raws.clear()

    try:
        for pos, raw in iter_items(path):
            if max_items and n >= max_items:
                break
            positions.append(pos)
            raws.append(raw)
            n += 1
            if len(positions) >= shard_rows:
                flush()
    except TruncatedInput as e:
        truncated = e
    flush()
    return shards, n, truncated


def convert_batch(batch: pa.Table) -> pa.Table:
    """Ray Data map_batches: raw items -> one output row per target, good or rejected."""
    out_pos, out_sub, out_ok, out_json, out_reason = [], [], [], [], []
    for pos, raw in zip(batch.column("pos").to_pylist(), batch.column("raw").to_pylist()):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows = [(0, False, raw.decode("utf-8", "replace"), f"invalid_utf8 at byte {e.start}")]
        else:
            rows = _convert_item(text)
        for sub, ok, payload, reason in rows:
            out_pos.append(pos)
            out_sub.append(sub)
            out_ok.append(ok)
            out_json.append(payload)
            out_reason.append(reason)
    return pa.table({"pos": pa.array(out_pos, pa.int64()), "sub": pa.array(out_sub, pa.int32()),
                     "ok": out_ok, "json": out_json, "reason": out_reason})


def _convert_item(text: str) -> list[tuple[int, bool, str, str]]:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        return [(0, False, text, f"invalid_json: {e.msg}")]
    try:
        targets = iter_targets(item)
    except RowError as e:
        return [(0, False, text, e.reason)]
    rows = []
    for sub, target in enumerate(targets):
        try:
            rec = parse_target(target)
            rows.append((sub, True, json.dumps(rec, ensure_ascii=False), ""))
        except RowError as e:
            rows.append((sub, False, json.dumps(target, ensure_ascii=False), e.reason))
    return rows


@dataclass
class ConvertSummary:
    items: int = 0
    converted: int = 0
    rejected: Counter = field(default_factory=Counter)
    truncated_at: int | None = None
    seconds: float = 0.0
    output: str = ""
    rejects: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "items_in": self.items, "converted": self.converted, "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())), "truncated_at_byte": self.truncated_at,
            "seconds": round(self.seconds, 2), "rows_per_s": round(self.items / max(self.seconds, 1e-9), 1),
            "output": self.output, "rejects": self.rejects,
        }


def _reason_key(reason: str) -> str:
    return reason.split(":", 1)[0].split(" at ", 1)[0]


def convert(input_path: str | Path, output_path: str | Path, rejects_path: str | Path | None = None,
            max_samples: int = 0, fmt: str = "jsonl", progress: bool = True) -> ConvertSummary:
    """Convert an OMCQ file; see the module docstring. Needs a running (or startable) Ray."""
    import ray

    t0 = time.time()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = Path(rejects_path) if rejects_path else output_path.with_name(output_path.stem + ".rejects.jsonl")
    summary = ConvertSummary(output=str(output_path), rejects=str(rejects_path))
    tmp = Path(tempfile.mkdtemp(prefix="omcq-shards-", dir=output_path.parent))
    try:
        shards, summary.items, truncated = split_to_shards(input_path, tmp, max_samples)
        if truncated is not None:
            summary.truncated_at = truncated.offset
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output rows keep input order
        ctx.enable_progress_bars = progress
        writer = _Writer(output_path, rejects_path, fmt)
        if shards:
            ds = ray.data.read_parquet(shards).map_batches(convert_batch, batch_format="pyarrow", batch_size=4096)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write(batch, summary)
        writer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.seconds = time.time() - t0
    return summary


class _Writer:
    """Good rows to JSONL/Parquet, bad rows to the rejects JSONL, in arrival (= input) order."""

    def __init__(self, output: Path, rejects: Path, fmt: str):
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"--format must be jsonl or parquet, got {fmt}")
        self.fmt = fmt
        self.output = output
        self.tmp_out = output.with_name(f".{output.name}.tmp")
        self.tmp_rej = rejects.with_name(f".{rejects.name}.tmp")
        self.rejects = rejects
        self.rej = open(self.tmp_rej, "w", encoding="utf-8")
        self.out = open(self.tmp_out, "w", encoding="utf-8") if fmt == "jsonl" else None
        self.pq_writer = None
        self.idx = 0

    def write(self, batch: pa.Table, summary: ConvertSummary) -> None:
        cols = batch.to_pydict()
        good = []
        for pos, sub, ok, payload, reason in zip(cols["pos"], cols["sub"], cols["ok"], cols["json"], cols["reason"]):
            if ok:
                good.append(payload)
            else:
                summary.rejected[_reason_key(reason)] += 1
                self.rej.write(json.dumps({"position": pos, "target": sub, "reason": reason, "raw": payload}, ensure_ascii=False) + "\n")
        summary.converted += len(good)
        if self.out is not None:
            for payload in good:
                self.out.write(payload + "\n")
        elif good:
            recs = [json.loads(p) for p in good]
            for r in recs:
                r["idx"] = self.idx
                self.idx += 1
            table = pa.Table.from_pylist(recs, schema=SFT_SCHEMA)
            if self.pq_writer is None:
                self.pq_writer = pq.ParquetWriter(self.tmp_out, SFT_SCHEMA)
            self.pq_writer.write_table(table)

    def close(self) -> None:
        self.rej.close()
        if self.out is not None:
            self.out.close()
        elif self.pq_writer is not None:
            self.pq_writer.close()
        else:
            pq.write_table(SFT_SCHEMA.empty_table(), self.tmp_out)
        os.replace(self.tmp_out, self.output)
        os.replace(self.tmp_rej, self.rejects)


SFT_SCHEMA = pa.schema([
    ("conversations", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("uuid", pa.string()),
    ("question", pa.string()),
    ("options", pa.list_(pa.string())),
    ("answer_index", pa.int64()),
    ("subject", pa.string()),
    ("predicate", pa.string()),
    ("idx", pa.int64()),
])


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
