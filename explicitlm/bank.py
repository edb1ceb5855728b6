"""The memory bank ("knowledge cache"): data, not a search structure.

The bank is explicit text: every row keeps its uuid and sentence, tokenised to L ids with padding
masked out. It is stored as one Parquet file (no pickle) so an edit can replace it atomically. The
index over its keys (`explicitlm.index`) is rebuilt from it.

Letters: N rows, L tokens per row.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from explicitlm.readers import read_knowledge

BANK_FORMAT = "explicitlm-memory-bank/2"


def row_tokens(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of memory sentences as their words read inside a prompt: after a space.

    A sentence's first word is usually its subject, and a question names the subject mid-sentence
    (" Knesset"); a byte-level BPE gives "Knesset" at the start of a text another id. Tokenised
    bare, the subject's first word would match neither the question's query nor the words the
    memory values leave out.
    """
    return tokenizer([" " + t.lstrip() for t in texts], add_special_tokens=False)["input_ids"] if texts else []


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and rules: a bank is only valid for its tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class MemoryBank:
    token_ids: torch.Tensor  # (N, L) long, padded with pad_id
    mask: torch.Tensor  # (N, L) bool, True on real tokens
    uuids: list[str]
    texts: list[str]
    tokenizer_fingerprint: str
    pad_id: int
    truncated: int = 0
    version: int = 0
    _row_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._row_of = {u: i for i, u in enumerate(self.uuids) if u}

    def __len__(self) -> int:
        return len(self.uuids)

    @property
    def knowledge_length(self) -> int:
        return self.token_ids.shape[1]

    def row_of(self, uuid: str) -> int:
        """Row index of a uuid, -1 when the bank has no such row."""
        return self._row_of.get(uuid, -1)

    def row(self, i: int) -> dict[str, Any]:
        return {"uuid": self.uuids[i], "text": self.texts[i], "row": i}

    def search(self, fragment: str, limit: int = 20) -> list[dict[str, Any]]:
        needle = fragment.lower()
        hits = (i for i, t in enumerate(self.texts) if needle in t.lower())
        return [self.row(i) for _, i in zip(range(limit), hits)]

    @classmethod
    def build(cls, rows: list[dict[str, str]], tokenizer: Any, knowledge_length: int) -> MemoryBank:
        """Tokenise sentences to exactly L ids (cut or padded); count the sentences that were cut."""
        texts = [r["text"] for r in rows]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = row_tokens(tokenizer, texts)
        truncated = sum(len(x) > knowledge_length for x in ids)
        token_ids = torch.full((len(texts), knowledge_length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), knowledge_length), dtype=torch.bool)
        for i, x in enumerate(ids):
            x = x[:knowledge_length]
            token_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = True
        uuids = [r.get("uuid", "") or f"row-{i}" for i, r in enumerate(rows)]
        return cls(token_ids, mask, uuids, texts, tokenizer_fingerprint(tokenizer), pad_id, truncated)

    def set_row(self, i: int, text: str, tokenizer: Any) -> None:
        """Replace row i's text (i == len(self) appends) and re-tokenise it."""
        ids = row_tokens(tokenizer, [text])[0][: self.knowledge_length]
        row_ids = torch.full((1, self.knowledge_length), self.pad_id, dtype=torch.long)
        row_mask = torch.zeros((1, self.knowledge_length), dtype=torch.bool)
        row_ids[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        row_mask[0, : len(ids)] = True
        if i == self.token_ids.shape[0]:
            self.token_ids = torch.cat([self.token_ids, row_ids])
            self.mask = torch.cat([self.mask, row_mask])
            self.texts.append(text)
        else:
            self.token_ids[i] = row_ids[0]
            self.mask[i] = row_mask[0]
            self.texts[i] = text
        self.version += 1

    def add_row(self, uuid: str, text: str, tokenizer: Any) -> int:
        if uuid in self._row_of:
            raise KeyError(f"uuid {uuid} already in the bank")
        i = len(self)
        self.uuids.append(uuid)
        self._row_of[uuid] = i
        self.set_row(i, text, tokenizer)
        return i

    def save(self, path: str | Path) -> None:
        """Write the bank as one Parquet file, atomically (temp file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        L = self.knowledge_length
        ids = pa.FixedSizeListArray.from_arrays(pa.array(self.token_ids.reshape(-1).numpy().astype("int32")), L)
        msk = pa.FixedSizeListArray.from_arrays(pa.array(self.mask.reshape(-1).numpy()), L)
        meta = {
            "format": BANK_FORMAT,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "knowledge_length": L,
            "pad_id": self.pad_id,
            "truncated": self.truncated,
            "version": self.version,
        }
        table = pa.table({"uuid": self.uuids, "text": self.texts, "token_ids": ids, "mask": msk})
        table = table.replace_schema_metadata({"explicitlm": json.dumps(meta)})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"explicitlm")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != BANK_FORMAT:
            hint = (
                "; rebuild it with model.recompute_cache=true"
                if str(meta.get("format", "")).startswith("explicitlm-memory-bank/")
                else ""
            )
            raise ValueError(
                f"{path} is not an ExplicitLM memory bank of format {BANK_FORMAT} (it has {meta.get('format')!r}){hint}"
            )
        L = meta["knowledge_length"]
        ids = table.column("token_ids").combine_chunks().flatten().to_numpy()
        msk = table.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(
            token_ids=torch.from_numpy(ids.astype("int64")).reshape(-1, L),
            mask=torch.from_numpy(msk.copy()).reshape(-1, L),
            uuids=table.column("uuid").to_pylist(),
            texts=table.column("text").to_pylist(),
            tokenizer_fingerprint=meta["tokenizer_fingerprint"],
            pad_id=meta["pad_id"],
            truncated=meta.get("truncated", 0),
            version=meta.get("version", 0),
        )


def load_or_build_bank(
    cache_path: str | Path,
    database_init_path: str | Path,
    tokenizer: Any,
    knowledge_length: int,
    knowledge_num: int,
    recompute: bool = False,
) -> MemoryBank:
    """The reference's cache logic: build from the database when missing or asked, else load.

    A cached bank made with another tokenizer or row length is refused, never silently reused.
    """
    cache_path = Path(cache_path)
    if cache_path.exists() and not recompute:
        bank = MemoryBank.load(cache_path)
        fp = tokenizer_fingerprint(tokenizer)
        if bank.tokenizer_fingerprint != fp:
            raise ValueError(
                f"memory bank {cache_path} was built with another tokenizer ({bank.tokenizer_fingerprint} != {fp}); "
                "rebuild it with model.recompute_cache=true"
            )
        if bank.knowledge_length != knowledge_length:
            raise ValueError(
                f"memory bank {cache_path} has rows of {bank.knowledge_length} tokens but model.knowledge_length="
                f"{knowledge_length}; rebuild it with model.recompute_cache=true"
            )
        return bank
    if not database_init_path or not Path(database_init_path).exists():
        raise FileNotFoundError(
            f"no memory bank at {cache_path} and model.database_init_path={str(database_init_path)!r} does not exist"
        )
    rows = []
    for row in read_knowledge(database_init_path):
        if len(rows) >= knowledge_num:
            print(
                f"memory: database has more than model.knowledge_num={knowledge_num} rows; keeping the first {knowledge_num}"
            )
            break
        rows.append(row)
    bank = MemoryBank.build(rows, tokenizer, knowledge_length)
    print(
        f"memory: built {len(bank)} rows of {knowledge_length} tokens from {database_init_path}; "
        f"{bank.truncated} sentences ({bank.truncated / max(len(bank), 1):.1%}) were longer and cut"
    )
    bank.save(cache_path)
    return bank
