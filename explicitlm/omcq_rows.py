"""One range of OMCQ items -> chat-format SFT records and rejects, with each bad row's reason.

A range of good rows is parsed by Arrow's JSON reader and checked and rendered by compute kernels,
all rows at once; a range with a bad row (or anything unusual) goes item by item through
`parse_target`, which names each bad row's reason. Both give the same records, written as JSONL
bytes or an Arrow stream for `explicitlm.convert`'s writer.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from explicitlm.data import LABELS, PROMPT_SUFFIX, RowError, iter_targets, parse_target
from explicitlm.omcq_cut import _scan_window, _ScanState

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


def _reason_key(reason: str) -> str:
    return reason.split(":", 1)[0].split(" at ", 1)[0]
