"""OMCQ -> SFT records on Ray Data, streaming and in bounded memory, with every bad row accounted for.

1. Cut (the driver, vectorised, while Ray starts): the input is cut into byte ranges of whole items,
   about 4 MB each, without parsing them. A JSON array is cut at its top-level commas, found by a
   byte scanner that tracks strings and nesting depth; JSONL at newlines. A file that ends
   mid-array keeps every complete item and reports the byte offset of the break.
2. Convert (Ray Data, parallel): `map_batches` on a pool of actors reads its ranges from the file.
   The actors run on the driver's node, the one node sure to have the input file; on a cluster the
   records then travel to wherever they are needed as Ray Data blocks, never as paths.
   A range of good rows is parsed by Arrow's JSON reader and checked and rendered by compute
   kernels, all rows at once; a range with a bad row (or anything unusual) goes item by item
   through `parse_target`, which names each bad row's reason. Both give the same records.
3. Write (the driver, in order): records to JSONL or Parquet, bad rows to the rejects file with
   position, reason and the raw text. Two runs give byte-identical files.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from explicitlm.data import LABELS, PROMPT_SUFFIX, RowError, iter_targets, parse_target

WINDOW = 16 << 20
CHUNK_BYTES = 4 << 20
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


@dataclass
class Chunk:
    """Bytes [start, end) of the input hold `count` item slots, the first at position `first`."""

    start: int
    end: int
    first: int
    count: int


def plan_chunks(
    path: str | Path, max_items: int = 0, chunk_bytes: int = CHUNK_BYTES, window: int = WINDOW
) -> tuple[str, list[Chunk], TruncatedInput | None]:
    """Cut the input into byte ranges of whole items without parsing them: ('array' | 'lines', chunks, truncation).

    A JSON array is cut at its top-level commas (found by the byte scanner), JSONL at newlines.
    Each top-level slot or line is one position; blank ones are skipped by the converter.
    """
    with open(path, "rb") as fh:
        first = fh.read(4096).lstrip()[:1]
        fh.seek(0)
        if first != b"[":
            return "lines", _plan_lines(fh, max_items, chunk_bytes), None
        lead = fh.read(4096).index(b"[") + 1  # the array's items are at depth 1 from here
        fh.seek(lead)
        chunks: list[Chunk] = []
        st = _ScanState(depth=1)
        start, base, n, count = lead, lead, 0, 0  # current chunk: from start, `count` slots so far
        last_end = lead
        while not st.closed:
            buf = fh.read(window)
            if not buf:
                break
            seps = _scan_window(buf, base, st)
            base += len(buf)
            if max_items:
                seps = seps[: max_items - n - count]
            for sep in seps:  # a slot ends at each separator (the last one at the closing bracket)
                count += 1
                last_end = sep
                if sep + 1 - start >= chunk_bytes:
                    chunks.append(Chunk(start, sep, n, count))
                    n += count
                    start, count = sep + 1, 0
            if max_items and n + count >= max_items:
                break
        if count:
            chunks.append(Chunk(start, last_end, n, count))
        truncated = None if st.closed or (max_items and n + count >= max_items) else TruncatedInput(last_end, n + count)
        return "array", chunks, truncated


def _plan_lines(fh, max_items: int, chunk_bytes: int) -> list[Chunk]:
    chunks, offset, n = [], 0, 0
    while True:
        buf = fh.read(chunk_bytes)
        if not buf:
            break
        cut = buf.rfind(b"\n") + 1
        if cut == 0 or len(buf) < chunk_bytes:  # a line longer than a chunk, or the file's end
            rest = fh.readline() if len(buf) == chunk_bytes else b""
            buf, cut = buf + rest, len(buf) + len(rest)
        else:
            fh.seek(offset + cut)
        lines = buf[:cut].count(b"\n") + (0 if buf[:cut].endswith(b"\n") else 1)
        if max_items and n + lines >= max_items:
            keep = max_items - n
            ends = np.flatnonzero(np.frombuffer(buf[:cut], dtype=np.uint8) == 10)
            cut = int(ends[keep - 1]) + 1 if keep <= len(ends) else cut
            chunks.append(Chunk(offset, offset + cut, n, keep))
            break
        chunks.append(Chunk(offset, offset + cut, n, lines))
        offset += cut
        n += lines
    return chunks


def convert_chunks(batch: pa.Table, path: str, kind: str, fmt: str) -> pa.Table:
    """Ray Data map_batches: chunks of the input -> per chunk the output bytes, rejects and counts."""
    # A chunk makes ~10^5 small containers that all live until it is written: the cyclic collector
    # would rescan them again and again (it tripled the per-row cost), and they hold no cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _convert_chunks(batch, path, kind, fmt)
    finally:
        if gc_was_enabled:
            gc.enable()


class ChunkConverter:
    """`convert_chunks` for map_batches on an actor pool: each actor has its next chunk queued, so
    it never waits on the scheduler between chunks (as stateless tasks, the two workers sat idle
    for more than half of the run)."""

    def __init__(self, path: str, kind: str, fmt: str):
        self.path, self.kind, self.fmt = path, kind, fmt

    def __call__(self, batch: pa.Table) -> pa.Table:
        return convert_chunks(batch, self.path, self.kind, self.fmt)


def _convert_chunks(batch: pa.Table, path: str, kind: str, fmt: str) -> pa.Table:
    payloads, rejects, good, reasons, items = [], [], [], [], []
    with open(path, "rb") as fh:
        for c in batch.to_pylist():
            fh.seek(c["start"])
            data = fh.read(c["end"] - c["start"])
            table, bad, n = _arrow_records(data, kind, c["count"]), [], c["count"]
            if table is None:  # a bad row, or anything the columnar path does not vouch for
                records, bad, n = _convert_chunk(data, kind, c["first"], c["count"])
                table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
            items.append(n)
            if fmt == "jsonl":
                payloads.append(jsonl_bytes(table))
            else:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, RECORD_SCHEMA) as w:
                    w.write_table(table)
                payloads.append(sink.getvalue().to_pybytes())
            good_rows = table.num_rows
            rejects.append(
                b"".join(
                    orjson.dumps({"position": pos, "target": sub, "reason": reason, "raw": raw}) + b"\n"
                    for pos, sub, reason, raw in bad
                )
            )
            good.append(good_rows)
            reasons.append(json.dumps(Counter(_reason_key(r) for _, _, r, _ in bad)))
    return pa.table(
        {
            "payload": pa.array(payloads, pa.binary()),
            "rejects": pa.array(rejects, pa.binary()),
            "good": pa.array(good, pa.int64()),
            "reasons": reasons,
            "items": pa.array(items, pa.int64()),
        }
    )


def _convert_chunk(data: bytes, kind: str, first: int, count: int) -> tuple[list[dict], list[tuple], int]:
    """One chunk's slots -> (records, rejects as (position, target, reason, raw text), non-blank items)."""
    records: list[dict] = []
    bad: list[tuple] = []
    if kind == "array":
        try:  # the common case: the whole chunk is valid JSON, parsed in one call
            items = orjson.loads(b"[" + data + b"]")
        except orjson.JSONDecodeError:
            items = None
        if items is not None and len(items) == count:
            for i, item in enumerate(items):
                _convert_item(first + i, item, records, bad)
            return records, bad, len(items)
        slots = _split_slots(data)
    else:
        slots = data.split(b"\n")[:count]
    n = 0
    for i, raw in enumerate(slots):
        raw = raw.strip()
        if not raw:
            continue
        n += 1
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as u:
                bad.append((first + i, 0, f"invalid_utf8 at byte {u.start}", raw.decode("utf-8", "replace")))
            else:
                bad.append((first + i, 0, f"invalid_json: {e}", text))
            continue
        _convert_item(first + i, item, records, bad)
    return records, bad, n


# ---------------------------------------------------------------- the columnar path for clean chunks
#
# Most chunks hold only good rows. For those, Arrow's JSON reader parses the chunk and compute
# kernels check and render every row at once; the result is the same table the row-by-row path
# (`_convert_chunk`, `parse_target`) builds. Any doubt (a bad row, a field of another type, a
# duplicated key) returns None and the chunk goes row by row, which also names each bad row's
# reason. Arrow's utf8_trim_whitespace strips exactly the characters str.strip() strips (a test
# checks every one), and `jsonl_bytes` writes exactly what orjson writes.

_LABELS = pa.array(list(LABELS))


def _strings(targets: pa.StructArray, name: str, required: bool) -> pa.Array | None:
    """A target field as strings, stripped where required (as parse_target does), missing or null
    ones as "" where optional; None when the columnar path cannot vouch for it."""
    kind = targets.type.get_field_index(name)
    if kind < 0 or targets.type.field(kind).type == pa.null():
        return None if required else pa.array([""] * len(targets), pa.string())
    col = targets.field(kind)
    if col.type != pa.string():
        return None
    if col.null_count:
        if required:
            return None
        col = pc.fill_null(col, "")
    if not required:
        return col
    col = pc.utf8_trim_whitespace(col)  # the same characters as str.strip() (a test checks every one)
    return None if pc.any(pc.equal(pc.utf8_length(col), 0)).as_py() else col


def _arrow_records(data: bytes, kind: str, count: int) -> pa.Table | None:
    """A chunk of only good rows -> its records (RECORD_SCHEMA); None if any row needs a closer look."""
    if b"\x00" in data:
        return None
    if kind == "lines":  # one item per line: the lines become an array's items (a blank line does not parse)
        data = data[:-1].replace(b"\n", b",") if data.endswith(b"\n") else data.replace(b"\n", b",")
    wrapped = b'{"x":[' + data + b"]}"
    try:
        x = pj.read_json(
            pa.py_buffer(wrapped),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(wrapped) + 1),
            parse_options=pj.ParseOptions(newlines_in_values=True),
        ).column("x")
        x.validate(full=True)  # the reader does not check UTF-8
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError):
        return None
    items = x.chunk(0).flatten()
    if len(items) != count or not pa.types.is_struct(items.type) or items.null_count:
        return None
    ti = items.type.get_field_index("target")
    if ti < 0 or not pa.types.is_list(items.type.field(ti).type):
        return None
    target = items.field(ti)
    if (
        target.null_count
        or not pa.types.is_struct(target.type.value_type)
        or pc.any(pc.equal(pc.list_value_length(target), 0)).as_py()
    ):
        return None
    targets = target.flatten()
    if targets.null_count:
        return None
    cols = {
        name: _strings(targets, name, required)
        for name, required in [
            ("question", True),
            ("options", True),
            ("correct_answer", True),
            ("uuid", False),
            ("subject", False),
            ("predicate", False),
        ]
    }
    if any(v is None for v in cols.values()):
        return None
    options, answer = cols["options"], cols["correct_answer"]
    # Options: a new one starts where ",X:" follows (as _OPTION_SPLIT); each "X:text", labels A, B, C, ...
    parts = pc.split_pattern(pc.replace_substring_regex(options, r",([A-Z]):", "\x00\\1:"), "\x00")
    n_opts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    if (n_opts < 2).any() or (n_opts > len(LABELS)).any():
        return None
    flat = pc.utf8_trim_whitespace(parts.flatten())
    offsets = parts.offsets.to_numpy() - parts.offsets[0].as_py()
    slot = np.arange(len(flat)) - np.repeat(offsets[:-1], n_opts)  # each option's place in its list
    if not pc.all(
        pc.equal(
            pc.utf8_slice_codeunits(flat, 0, 2), pc.binary_join_element_wise(pc.take(_LABELS, pa.array(slot)), ":", "")
        )
    ).as_py():
        return None
    texts = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(flat, 2))
    if pc.any(pc.equal(pc.utf8_length(texts), 0)).as_py():
        return None
    # The answer "X:text" names an option by label, with that option's text.
    if not pc.all(pc.match_substring_regex(answer, "^[A-Z]:")).as_py():
        return None
    index = pc.index_in(pc.utf8_slice_codeunits(answer, 0, 1), value_set=_LABELS).to_numpy()
    if (index >= n_opts).any():
        return None
    answer_text = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(answer, 2))
    if not pc.all(pc.equal(pc.take(texts, pa.array(offsets[:-1] + index)), answer_text)).as_py():
        return None
    n = len(targets)
    user = pc.binary_join_element_wise(cols["question"], options, PROMPT_SUFFIX, "\n")
    content = pc.take(
        pa.concat_arrays([user, answer]), pa.array(np.stack([np.arange(n), np.arange(n) + n], 1).reshape(-1))
    )
    roles = pa.DictionaryArray.from_arrays(
        pa.array(np.tile([0, 1], n).astype(np.int32)), pa.array(["user", "assistant"])
    ).cast(pa.string())
    turn = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    conversations = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turn)
    opts = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), texts)
    return pa.Table.from_arrays(
        [
            conversations,
            cols["uuid"],
            cols["question"],
            opts,
            pa.array(index.astype(np.int64)),
            cols["subject"],
            cols["predicate"],
        ],
        schema=RECORD_SCHEMA,
    )


_ESCAPES = {92: ("\\", "\\\\"), 34: ('"', '\\"'), 10: ("\n", "\\n"), 13: ("\r", "\\r"), 9: ("\t", "\\t")}


def _string_bytes(col: pa.Array) -> np.ndarray:
    """The UTF-8 bytes of a string array's values, back to back, without a copy."""
    _, offsets, values = col.buffers()[:3]
    off = np.frombuffer(offsets, dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    return (
        np.frombuffer(values, dtype=np.uint8)[int(off[0]) : int(off[-1])]
        if values is not None
        else np.zeros(0, np.uint8)
    )


def _json_str(col: pa.Array) -> pa.Array | None:
    """Strings escaped as orjson escapes them; None if one holds a control character orjson
    writes as \\uXXXX (rare: the caller falls back to orjson itself)."""
    raw = _string_bytes(col)
    low = set(np.unique(raw[raw < 32]).tolist())
    if low - {9, 10, 13}:
        return None
    present = low | ({34} if (raw == 34).any() else set()) | ({92} if (raw == 92).any() else set())
    for byte, (plain, escaped) in _ESCAPES.items():  # backslashes first
        if byte in present:
            col = pc.replace_substring(col, plain, escaped)
    return col


def jsonl_bytes(table: pa.Table) -> bytes:
    """Records (RECORD_SCHEMA) -> JSONL, byte for byte what orjson.dumps writes for each row's dict."""
    if not table.num_rows:
        return b""
    t = table.combine_chunks()
    n = t.num_rows
    conv = t.column("conversations").chunk(0)
    turns = conv.flatten()
    opts = t.column("options").chunk(0)
    two_turns = (np.diff(conv.offsets.to_numpy()) == 2).all() and pc.all(
        pc.equal(turns.field("role"), pc.take(pa.array(["user", "assistant"]), pa.array(np.tile([0, 1], n))))
    ).as_py()
    cols = {
        "content": turns.field("content"),
        "options": opts.flatten(),
        **{k: t.column(k).chunk(0) for k in ("uuid", "question", "subject", "predicate")},
    }
    escaped = {k: _json_str(v) for k, v in cols.items()}
    if not two_turns or any(v is None for v in escaped.values()):
        return b"".join(orjson.dumps(r) + b"\n" for r in t.to_pylist())  # rare: orjson's own escapes
    content = escaped["content"]
    user, assistant = (
        pc.take(content, pa.array(np.arange(0, 2 * n, 2))),
        pc.take(content, pa.array(np.arange(1, 2 * n, 2))),
    )
    options = pc.binary_join(pa.ListArray.from_arrays(opts.offsets, escaped["options"]), '","')
    lines = pc.binary_join_element_wise(
        '{"conversations":[{"role":"user","content":"',
        user,
        '"},{"role":"assistant","content":"',
        assistant,
        '"}],"uuid":"',
        escaped["uuid"],
        '","question":"',
        escaped["question"],
        '","options":["',
        options,
        '"],"answer_index":',
        pc.cast(t.column("answer_index").chunk(0), pa.string()),
        ',"subject":"',
        escaped["subject"],
        '","predicate":"',
        escaped["predicate"],
        '"}\n',
        "",
    )
    return _string_bytes(lines).tobytes()  # the lines sit back to back in the values buffer


def _split_slots(data: bytes) -> list[bytes]:
    """A chunk's top-level slots, exactly (strings, escapes, nesting), for chunks with a bad item."""
    seps = _scan_window(data, 0, _ScanState(depth=1))
    bounds = [-1, *seps, len(data)]
    return [data[a + 1 : b] for a, b in zip(bounds, bounds[1:])]


def _convert_item(pos: int, item: Any, records: list[dict], bad: list[tuple]) -> None:
    try:
        targets = iter_targets(item)
    except RowError as e:
        bad.append((pos, 0, e.reason, orjson.dumps(item).decode()))
        return
    for sub, target in enumerate(targets):
        try:
            records.append(parse_target(target))
        except RowError as e:
            bad.append((pos, sub, e.reason, orjson.dumps(target).decode()))


@dataclass
class ConvertSummary:
    items: int = 0
    converted: int = 0
    rejected: Counter = field(default_factory=Counter)
    truncated_at: int | None = None
    seconds: float = 0.0
    output: str = ""
    rejects: str = ""
    # Start-up: Ray's start (or connection) and the cut of the input, which overlap; the rate counts
    # the time after it (the actor pool's start, the conversion, the writes).
    startup_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "items_in": self.items,
            "converted": self.converted,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "truncated_at_byte": self.truncated_at,
            "seconds": round(self.seconds, 2),
            "startup_seconds": round(self.startup_seconds, 2),
            "rows_per_s": round(self.items / max(self.seconds - self.startup_seconds, 1e-9), 1),
            "output": self.output,
            "rejects": self.rejects,
        }


def _reason_key(reason: str) -> str:
    return reason.split(":", 1)[0].split(" at ", 1)[0]


def convert(
    input_path: str | Path,
    output_path: str | Path,
    rejects_path: str | Path | None = None,
    max_samples: int = 0,
    fmt: str = "jsonl",
    progress: bool = True,
) -> ConvertSummary:
    """Convert an OMCQ file; see the module docstring. Needs a running (or startable) Ray."""
    import ray

    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--format must be jsonl or parquet, got {fmt}")
    t0 = time.time()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = Path(rejects_path) if rejects_path else output_path.with_name(output_path.stem + ".rejects.jsonl")
    summary = ConvertSummary(output=str(output_path), rejects=str(rejects_path))
    # The cut runs while Ray starts: both mostly wait (numpy passes, process start-up).
    with ThreadPoolExecutor(1) as pool:
        planned = pool.submit(plan_chunks, input_path, max_samples)
        from explicitlm.tracking import start_ray

        start_ray(log_to_driver=False, include_dashboard=False)  # a local run: no dashboard processes
        kind, chunks, truncated = planned.result()
    summary.startup_seconds = time.time() - t0
    if truncated is not None:
        summary.truncated_at = truncated.offset
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows keep input order
    ctx.enable_progress_bars = False  # Ray Data's bars are per operator; this one counts items
    bar = _items_bar(sum(c.count for c in chunks), progress)
    writer = _Writer(output_path, rejects_path, fmt)
    try:
        if chunks:
            node, cpus = _driver_node()
            ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks)).map_batches(
                ChunkConverter,
                fn_constructor_kwargs={"path": str(Path(input_path).resolve()), "kind": kind, "fmt": fmt},
                batch_format="pyarrow",
                batch_size=1,
                concurrency=max(1, min(len(chunks), cpus)),
                label_selector=node,
                # A conversion takes seconds to run again; a restarted actor could not always get
                # its constructor arguments back (Ray logs that as an error line for every pool).
                max_restarts=0,
            )
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                before = summary.items
                writer.write(batch, summary)
                if bar is not None:
                    bar.update(summary.items - before)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.time() - t0
    return summary


def _driver_node() -> tuple[dict[str, str], int]:
    """A label selector that keeps tasks on this (the driver's) node, and that node's CPUs."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), 1)
    return {"ray.io/node-id": node_id}, int(cpus)


def _items_bar(total: int, enabled: bool):
    """The converter's one progress bar: input items written, on a terminal only."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="convert", unit=" items", unit_scale=True, dynamic_ncols=True)


class _Writer:
    """Chunks' records to JSONL/Parquet and rejects to JSONL, in arrival (= input) order; atomic."""

    def __init__(self, output: Path, rejects: Path, fmt: str):
        self.fmt, self.output, self.rejects = fmt, output, rejects
        self.tmp_out = output.with_name(f".{output.name}.tmp")
        self.tmp_rej = rejects.with_name(f".{rejects.name}.tmp")
        self.rej = open(self.tmp_rej, "wb")
        self.out = open(self.tmp_out, "wb") if fmt == "jsonl" else None
        self.pq_writer = None
        self.idx = 0

    def write(self, batch: pa.Table, summary: ConvertSummary) -> None:
        cols = batch.select(["good", "reasons", "items"]).to_pydict()
        # Payloads go to the file as Arrow buffers, without a copy into Python bytes.
        payloads, rejected = (
            [v.as_buffer() or b"" for chunk in batch.column(name).chunks for v in chunk]
            for name in ("payload", "rejects")
        )
        for payload, rejects, good, reasons, items in zip(
            payloads, rejected, cols["good"], cols["reasons"], cols["items"]
        ):
            summary.items += items
            self.rej.write(rejects)
            summary.rejected.update(json.loads(reasons))
            summary.converted += good
            if self.out is not None:
                self.out.write(payload)
            elif good:
                table = pa.ipc.open_stream(payload).read_all()  # pa.Buffer reads without a copy
                table = table.append_column("idx", pa.array(np.arange(self.idx, self.idx + good), pa.int64()))
                self.idx += good
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

    def discard(self) -> None:
        for fh in (self.rej, self.out):
            if fh is not None:
                fh.close()
        if self.pq_writer is not None:
            self.pq_writer.close()
        for p in (self.tmp_out, self.tmp_rej):
            p.unlink(missing_ok=True)


SFT_SCHEMA = pa.schema(
    [
        ("conversations", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("uuid", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("answer_index", pa.int64()),
        ("subject", pa.string()),
        ("predicate", pa.string()),
        ("idx", pa.int64()),
    ]
)
RECORD_SCHEMA = pa.schema([f for f in SFT_SCHEMA if f.name != "idx"])  # what workers send; the writer numbers rows
