"""The memory bank ("knowledge cache") and its product-key index.

The bank is explicit text: every row keeps its uuid and sentence, tokenised to L ids with padding
masked out. It is stored as one Parquet file (no pickle) so an edit can replace it atomically.

The index places every row in one cell of a product-key grid: two sub-key sets of about sqrt(N)
centroids each (k-means over the row keys, then over their residuals), scored additively. A query reads the rows of its best
top_cells x top_cells cells, then an exact cosine stage ranks those candidates. Cells hold at most
`max_cell_rows` rows (a full cell spills a row to its next-best cell), so the work per query does
not grow with N.

Letters: N rows, L tokens per row, V vocabulary, D hidden size, K retrieval dim, C cells.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

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
        """Write the bank as one Parquet file, atomically (temp file + rename)."""
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
            hint = "; rebuild it with model.recompute_cache=true" if str(meta.get("format", "")).startswith("explicitlm-memory-bank/") else ""
            raise ValueError(f"{path} is not an ExplicitLM memory bank of format {BANK_FORMAT} (it has {meta.get('format')!r}){hint}")
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
            print(f"memory: database has more than model.knowledge_num={knowledge_num} rows; keeping the first {knowledge_num}")
            break
        rows.append(row)
    bank = MemoryBank.build(rows, tokenizer, knowledge_length)
    print(
        f"memory: built {len(bank)} rows of {knowledge_length} tokens from {database_init_path}; "
        f"{bank.truncated} sentences ({bank.truncated / max(len(bank), 1):.1%}) were longer and cut"
    )
    bank.save(cache_path)
    return bank


# --------------------------------------------------------------------------- product-key index


def row_vectors(token_ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor,
                token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of `table` rows over each memory row's real tokens, in one batched op.

    (N, L) ids -> (N, table dim). `token_weights` (V,) weighs tokens (IDF); None is a plain mean.
    embedding_bag never materialises the (N, L, dim) intermediate, so this runs on a million rows.
    """
    w = mask.to(table.dtype)  # (N, L)
    if token_weights is not None:
        w = w * token_weights.to(table.dtype)[token_ids]
    w = w / w.sum(1, keepdim=True).clamp(min=1e-6)
    return F.embedding_bag(token_ids, table, per_sample_weights=w, mode="sum")


def inverse_document_frequency(token_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(V,) log((N + 1) / (df + 1)) over the bank's rows: words every sentence shares weigh little."""
    N, L = token_ids.shape
    # A token counts once per row: mark first occurrences after sorting each row.
    ids = torch.where(mask, token_ids, torch.full_like(token_ids, vocab_size))  # padding -> an extra bin
    srt = ids.sort(dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    df = torch.bincount(srt[first], minlength=vocab_size + 1)[:vocab_size].float()
    # A token no row contains cannot tell rows apart ("What", "?" of a question): weight 0.
    return torch.where(df > 0, torch.log((N + 1) / (df + 1)), torch.zeros_like(df))


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, sample: int = 65536) -> torch.Tensor:
    """Lloyd's k-means on a sample of the rows of x: (n, d) -> (k, d) centroids (k <= n)."""
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > sample:
        x = x[torch.randperm(x.shape[0], generator=g)[:sample]]
    k = min(k, x.shape[0])
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        # argmin |x - c|^2 == argmax (x.c - |c|^2 / 2)
        assign = (x @ centroids.T - 0.5 * centroids.pow(2).sum(1)).argmax(1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        # An empty cluster keeps its old centroid rather than collapsing to zero.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x @ centroids.T - 0.5 * centroids.pow(2).sum(1)).argmax(1)


@torch.no_grad()
def assign_cells(keys: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, cap: int, tries: int = 4, chunk: int = 65536) -> torch.Tensor:
    """Place each row in a cell (i * n2 + j) of the product grid, at most `cap` rows per cell.

    A cell's score for a vector x is x.c1[i] + x.c2[j], the same additive score a query uses. A row
    prefers its best cell; when that cell is full it takes its next-best of tries x tries pairs.
    Returns (N,) cell ids.
    """
    N = keys.shape[0]
    n1, n2 = c1.shape[0], c2.shape[0]
    t1, t2 = min(tries, n1), min(tries, n2)
    prefs = []
    for start in range(0, N, chunk):  # bounded memory: (chunk, n1) scores at a time
        k = keys[start : start + chunk]
        s1, i1 = (k @ c1.T).topk(t1, dim=1)  # (n, t1)
        s2, i2 = (k @ c2.T).topk(t2, dim=1)  # (n, t2)
        pair_score = (s1[:, :, None] + s2[:, None, :]).reshape(len(k), -1)  # (n, t1*t2)
        pair_cell = (i1[:, :, None] * n2 + i2[:, None, :]).reshape(len(k), -1)
        order = pair_score.argsort(dim=1, descending=True)
        prefs.append(pair_cell.gather(1, order))
    prefs = torch.cat(prefs) if prefs else torch.zeros((0, t1 * t2), dtype=torch.long)  # (N, P)
    n_cells = n1 * n2
    cell = torch.full((N,), -1, dtype=torch.long)
    fill = torch.zeros(n_cells, dtype=torch.long)
    for choice in range(prefs.shape[1]):
        todo = (cell < 0).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        want = prefs[todo, choice]  # (m,)
        order = torch.argsort(want, stable=True)
        want_sorted = want[order]
        # Rank of each row among the rows asking for the same cell in this round.
        first = torch.searchsorted(want_sorted, want_sorted, right=False)
        rank = torch.arange(len(want_sorted)) - first
        ok = fill[want_sorted] + rank < cap
        cell[todo[order[ok]]] = want_sorted[ok]
        fill += torch.bincount(want_sorted[ok], minlength=n_cells)
    left = (cell < 0).nonzero().squeeze(1)
    if len(left):  # the grid has at least `cap` x N slots, so the emptiest cells always have room
        free = torch.argsort(fill, stable=True)[: len(left)]
        cell[left] = free
    return cell


class ProductKeyIndex:
    """Row keys, the k-means sub-keys they were placed by, and the cells' rows in CSR form."""

    def __init__(self, keys: torch.Tensor, n_sub: int, max_cell_rows: int, seed: int = 0,
                 centroids: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.keys = F.normalize(keys.float(), dim=-1)  # (N, K)
        if centroids is None:
            # Sub-keys follow the content: k-means over the keys, then over what the first level
            # leaves unexplained, so key ~ sub1[i] + sub2[j] and a query scores cells additively.
            sub1 = kmeans(self.keys, n_sub, seed=seed)
            residual = self.keys - sub1[nearest(self.keys, sub1)]
            centroids = (sub1, kmeans(residual, n_sub, seed=seed + 1))
        # Fewer rows than sub-keys: repeat centroids so the grid keeps its n_sub x n_sub shape.
        self.sub1, self.sub2 = (c.float().repeat(math.ceil(n_sub / c.shape[0]), 1)[:n_sub] for c in centroids)
        self.sub = torch.cat([self.sub1, self.sub2])  # (2 n_sub, K): a query scores both sets in one product
        self.n1, self.n2 = n_sub, n_sub
        self.max_cell_rows = max_cell_rows
        self.cell = assign_cells(self.keys, self.sub1, self.sub2, max_cell_rows)  # (N,)
        self._rebuild_csr()

    def _rebuild_csr(self) -> None:
        self.order = torch.argsort(self.cell, stable=True)  # (N,) rows sorted by cell
        counts = torch.bincount(self.cell, minlength=self.n1 * self.n2)  # (C,)
        # Each cell's first position in cell order and its row count, side by side: one gather
        # (one cache line) per probed cell.
        self.span = torch.stack([torch.cumsum(counts, 0) - counts, counts], dim=1)  # (C, 2)
        self.width = int(counts.max()) if len(counts) else 1
        # Keys in cell order rank the candidates: a cell's rows sit side by side, and the few
        # candidates that survive are scored again from the float32 keys. bfloat16 for GPUs and
        # the whole-bank scan; int8 with a per-row scale (half the bytes of bf16 to gather, close to
        # its precision) for probes on a CPU, where gathering candidates' keys costs the most.
        ordered = take(self.keys, self.order)  # (N, K)
        self.rank_keys = ordered.to(torch.bfloat16)
        self.rank_scale = ordered.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
        self.rank_keys8 = (ordered / self.rank_scale[:, None]).round().to(torch.int8)  # (N, K)

    def update_row(self, i: int, key: torch.Tensor) -> None:
        """Refresh one row's key and cell after an edit (i == N appends)."""
        key = F.normalize(key, dim=-1)
        if i == self.keys.shape[0]:
            self.keys = torch.cat([self.keys, key[None]])
            self.cell = torch.cat([self.cell, torch.zeros(1, dtype=torch.long)])
        else:
            self.keys[i] = key
        fill = torch.bincount(self.cell, minlength=self.n1 * self.n2)
        fill[self.cell[i]] -= 1
        self.cell[i] = self._best_free(key, fill)
        self._rebuild_csr()

    def _best_free(self, key: torch.Tensor, fill: torch.Tensor) -> int:
        s = (self.sub1 @ key)[:, None] + (self.sub2 @ key)[None, :]  # (n1, n2)
        s = s.reshape(-1).masked_fill(fill >= self.max_cell_rows, -math.inf)
        return int(s.argmax())

    def positions(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given cells as positions in cell order (`order[pos]` is the row, `rank_keys[pos]`
        its key): (B, p) cell ids -> (B, C) positions and validity mask.

        C is the most rows any query's cells hold. Cells hold about one row each on average but up
        to max_cell_rows, so rows are gathered by count (CSR), not by padding every cell to the
        widest: that would be (B, p * max_cell_rows) slots, mostly empty.
        """
        B, p = cells.shape
        device = cells.device
        starts, counts = take(self.span, cells.flatten()).unbind(1)  # (B*p,) each
        per_query = counts.view(B, p).sum(1)  # (B,)
        total = int(per_query.sum())
        # Row r of the flat list belongs to some cell slot; its position is that cell's start plus
        # its rank within the cell, i.e. r - (rows before the slot) + start.
        pos_flat = torch.arange(total, device=device) + torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
        C = max(int(per_query.max()) if B else 0, 1)
        col = torch.arange(C, device=device)
        valid = col[None, :] < per_query[:, None]  # (B, C)
        first = torch.cumsum(per_query, 0) - per_query  # a query's rows are contiguous in the flat list
        pos = take(pos_flat, (first[:, None] + col[None, :]).clamp_(max=max(total - 1, 0))) if total else torch.zeros(B, C, dtype=torch.long, device=device)
        return pos, valid

    def candidates(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given cells: (B, p) cell ids -> (B, C) row ids and validity mask."""
        pos, valid = self.positions(cells)
        return take(self.order, pos), valid

    def to(self, device: torch.device | str) -> ProductKeyIndex:
        for name in ("keys", "rank_keys", "rank_keys8", "rank_scale", "sub1", "sub2", "sub", "cell", "order", "span"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def rank_int8(index: ProductKeyIndex, pos: torch.Tensor, q: torch.Tensor, group: int = 16) -> torch.Tensor:
    """Approximate scores of the candidates at positions pos (B, C) for queries q (B, K): int8 keys
    and queries, int32 products. torch._int_mm multiplies a group's candidates by all of its
    queries, (b C, K) x (K, b), and each query keeps its own block, so groups stay small."""
    q8 = (q / q.abs().amax(1, keepdim=True).clamp(min=1e-12) * 127).round().to(torch.int8)  # a query's scale never changes its ranking
    B, C = pos.shape
    out = []
    for j in range(0, B, group):
        p, b = pos[j : j + group], min(group, B - j)
        s = torch._int_mm(take(index.rank_keys8, p).view(b * C, -1), q8[j : j + group].T.contiguous())  # (b C, b)
        out.append(s.view(b, C, b).diagonal(dim1=0, dim2=2).T)  # (b, C): query i against its own candidates
    return torch.cat(out).float() * take(index.rank_scale, pos)  # (B, C)


def take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] along dim 0, for any shape of idx: index_select is an order of magnitude faster
    on CPU than advanced indexing, and retrieval gathers thousands of rows per query."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def n_sub_keys(n_rows: int) -> int:
    """Sub-keys per half: ceil(sqrt(N)), so the grid has at least N cells."""
    return max(2, math.isqrt(max(n_rows - 1, 0)) + 1)
