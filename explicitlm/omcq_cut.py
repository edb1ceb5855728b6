"""Cut an OMCQ file into byte ranges of whole items, without parsing them.

A JSON array is cut at its top-level commas, found by a vectorised byte scanner that tracks strings
and nesting depth; JSONL at newlines. Ranges are about `CHUNK_BYTES` each. A file that ends
mid-array keeps every complete item and reports the byte offset of the break (`TruncatedInput`).
`explicitlm.omcq_rows` converts the ranges; `explicitlm.convert` runs the whole on Ray Data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
