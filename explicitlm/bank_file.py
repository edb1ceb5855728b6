"""The memory bank's file: one Parquet table, its schema, and rewriting a few rows of it.

Columns: uuid, text, and per row L token ids (int32), mask (bool) and word ids (int64) as
fixed-size lists; the schema metadata key "explicitlm" holds the bank's format, tokenizer
fingerprint, L, pad id, count of cut sentences and version (the last edit it contains).

This module needs no torch, so a serving bank's file can be rewritten from its edits in a small
child process (`python -m explicitlm.bank_file patch BANK SINCE`, the changed rows as an Arrow stream on
stdin, at nice 19) that leaves the server's CPU and interpreter lock alone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.errors import UserError
from explicitlm.files import write_atomic

BANK_FORMAT = "explicitlm-memory-bank/3"
OLDER_FORMATS = ("explicitlm-memory-bank/2",)
META_KEY = b"explicitlm"


def to_table(
    uuids: list[str],
    texts: list[str],
    token_ids: np.ndarray,
    mask: np.ndarray,
    word_ids: np.ndarray,
    meta: dict[str, Any],
) -> pa.Table:
    """The bank's rows as a table; the (N, L) arrays become fixed-size lists of L."""
    L = meta["knowledge_length"]

    def column(a: np.ndarray, dtype: str) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).astype(dtype, copy=False)), L)

    table = pa.table(
        {
            "uuid": pa.array(uuids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "token_ids": column(token_ids, "int32"),
            "mask": column(mask, "bool"),
            "word_ids": column(word_ids, "int64"),
        }
    )
    return table.replace_schema_metadata({META_KEY: json.dumps({"format": BANK_FORMAT, **meta})})


def read(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """The table and its metadata ({} when it has none)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"cannot read memory bank {path}: {e}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table, json.loads(raw) if raw else {}


def write(path: str | Path, table: pa.Table) -> None:
    """Write atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def patch(path: str | Path, changes: pa.Table, since: int) -> int:
    """Rewrite the bank file with the rows in `changes` (a column "row" with their indices, then the
    bank's columns, and the metadata the new file gets): a row index below the file's length replaces
    that row, the others are appended and must continue the file without a gap. The changes are
    those of the edits after version `since`: the file must hold at least that version (a file that
    holds some of them already is rewritten to the same rows). Returns the new number of rows."""
    base, meta = read(path)
    if meta.get("format") != BANK_FORMAT:
        raise UserError(f"{path} is not a memory bank of format {BANK_FORMAT}; it cannot be patched")
    new_meta = json.loads(changes.schema.metadata[META_KEY])
    if not since <= meta.get("version", 0) <= new_meta["version"]:
        raise ValueError(
            f"{path} holds version {meta.get('version', 0)}; the changes take version {since} "
            f"to {new_meta['version']}: the file is not the one they were made for"
        )
    rows = changes.column("row").to_numpy()
    n = base.num_rows
    n_new = max(n, int(rows.max()) + 1) if len(rows) else n
    if (rows < 0).any() or len(np.unique(rows)) != len(rows) or (rows >= n).sum() != n_new - n:
        raise ValueError(f"the changed rows of {path} are negative, repeat a row or leave a gap after row {n - 1}")
    index = np.arange(n_new)
    index[rows] = n + np.arange(len(rows))
    schema = base.schema.remove_metadata()
    update = changes.drop_columns(["row"]).replace_schema_metadata(None).cast(schema)
    merged = pa.concat_tables([base.replace_schema_metadata(None), update])
    write(path, merged.take(pa.array(index)).replace_schema_metadata(changes.schema.metadata))
    return n_new


def background() -> None:
    """Run at the lowest priority (nice 19): the server's requests go first, and the rewrite still
    moves while they keep the CPU busy. The process stays in the server's session, since with
    autogroup scheduling a session of its own would have a fair share of the CPU whatever its nice
    value, but leaves the server's process group, so a Ctrl-C meant for the server does not cut the
    rewrite short."""
    try:
        os.setpgid(0, 0)  # done by Popen already from Python 3.11
        os.nice(19)
    except OSError:  # not allowed here: a rewrite at normal priority is still a correct one
        pass


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "patch":
        print("usage: python -m explicitlm.bank_file patch BANK SINCE_VERSION < changes.arrows", file=sys.stderr)
        return 2
    background()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped: the temporary file is removed
    with pa.ipc.open_stream(sys.stdin.buffer) as reader:
        changes = reader.read_all()
    patch(argv[1], changes, int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
