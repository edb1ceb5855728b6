"""The search structure over the bank: lexical keys and a product-key grid of cells.

A row's key is the IDF-weighted sum of its distinct words' vectors (`explicitlm.words`), centred
on the bank's mean key and normalised: a random projection of its TF-IDF vector, so a question's
key finds the rows that share its rare words. The keys are placed in the cells of a product-key
grid: two sub-key sets of ceil(sqrt(N)) centroids (k-means over the keys, then over their
residuals), scored additively. A query reads the rows of its best cells (or, for a small bank, all
rows) and ranks them approximately; the model scores the survivors exactly.

Everything here is the bank's, computed from it and cached beside its file (keyed by the bank's
content and the retrieval space), never stored in trained weights. An edit refreshes its row's key
at once and puts the row on a short side list that every query scans exactly, until the list is
laid out into the grid again.

Letters: B queries, N rows, L tokens per row, K retrieval dim, C candidate rows, P probed cells.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from explicitlm.bank import MemoryBank, WordCounts, first_in_row
from explicitlm.files import write_atomic
from explicitlm.words import WORDS_VERSION, word_vectors

INDEX_FORMAT = "explicitlm-index/1"
# Rows a probe ranks per probed cell: cells hold about one row each, their best several.
PROBE_BUDGET = 2


def lexical_vectors(
    words: torch.Tensor, counts: WordCounts, dim: int, seed: int, known_only: bool = False
) -> torch.Tensor:
    """(n, L) word ids -> (n, K) unit vectors: the IDF-weighted sum of each row's distinct words.

    Each token's word vector is computed where it stands (no table of the distinct words, whose size
    the host would have to learn): the path of a batch of questions. known_only drops words no bank
    row contains: they cannot match a key, only add noise.
    """
    first = first_in_row(words)
    if known_only:
        first &= counts.df_of(words) > 0
    w = counts.idf(words) * first  # (n, L)
    vectors = word_vectors(words.reshape(-1), dim, seed).view(*words.shape, dim)  # (n, L, K)
    return F.normalize((vectors * w[..., None]).sum(-2), dim=-1)


def lexical_keys(words: torch.Tensor, counts: WordCounts, dim: int, seed: int, chunk: int = 16384) -> torch.Tensor:
    """(N, L) word ids -> (N, K) float32 unit keys, uncentred, a chunk of rows at a time; each chunk's
    distinct words get their vectors once."""
    out = torch.empty(words.shape[0], dim, device=words.device)
    for start in range(0, words.shape[0], chunk):
        part = words[start : start + chunk]
        uniq, inverse = torch.unique(part, return_inverse=True)  # the chunk's words, once each
        w = counts.idf(uniq)[inverse] * first_in_row(part)  # (n, L)
        vec = F.embedding_bag(inverse, word_vectors(uniq, dim, seed), per_sample_weights=w, mode="sum")
        out[start : start + chunk] = F.normalize(vec, dim=-1)
    return out


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
def assign_cells(
    keys: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    cap: int,
    fill: torch.Tensor | None = None,
    tries: int = 4,
    chunk: int = 65536,
) -> torch.Tensor:
    """Place each row in a cell (i * n2 + j) of the product grid: (N, K) keys -> (N,) cell ids on the
    CPU, whatever the keys' device (the placement rounds are sequential bookkeeping).

    A cell's score for a vector x is x.c1[i] + x.c2[j], the same additive score a query uses. A row
    takes its best cell, or when that holds `cap` rows its next best of tries x tries; when all of
    those are full it joins its best cell anyway. The cap bounds the work per probed cell; it never
    sends a row where its own key would not look for it.
    """
    n1, n2 = c1.shape[0], c2.shape[0]
    t1, t2 = min(tries, n1), min(tries, n2)
    prefs = []
    for start in range(0, keys.shape[0], chunk):  # bounded memory: (chunk, n1) scores at a time
        k = keys[start : start + chunk].float()
        s1, i1 = (k @ c1.T).topk(t1, dim=1)  # (n, t1)
        s2, i2 = (k @ c2.T).topk(t2, dim=1)  # (n, t2)
        pair_score = (s1[:, :, None] + s2[:, None, :]).reshape(len(k), -1)  # (n, t1*t2)
        pair_cell = (i1[:, :, None] * n2 + i2[:, None, :]).reshape(len(k), -1)
        prefs.append(pair_cell.gather(1, pair_score.argsort(dim=1, descending=True)).cpu())
    prefs = torch.cat(prefs) if prefs else torch.zeros((0, t1 * t2), dtype=torch.long)  # (N, P)
    cell = torch.full((keys.shape[0],), -1, dtype=torch.long)
    fill = torch.zeros(n1 * n2, dtype=torch.long) if fill is None else fill.cpu().clone()
    for choice in range(prefs.shape[1]):
        todo = (cell < 0).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        want = prefs[todo, choice]  # (m,)
        order = torch.argsort(want, stable=True)
        want_sorted = want[order]
        # Rank of each row among the rows asking for the same cell in this round.
        rank = torch.arange(len(want_sorted)) - torch.searchsorted(want_sorted, want_sorted, right=False)
        ok = fill[want_sorted] + rank < cap
        cell[todo[order[ok]]] = want_sorted[ok]
        fill += torch.bincount(want_sorted[ok], minlength=n1 * n2)
    left = cell < 0
    cell[left] = prefs[left, 0]
    return cell


def n_sub_keys(n_rows: int) -> int:
    """Sub-keys per half: ceil(sqrt(N)), so the grid has at least N cells."""
    return max(2, math.isqrt(max(n_rows - 1, 0)) + 1)


@functools.lru_cache(maxsize=16)
def pair_shortlist(c1: int, c2: int, p: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) of two best-first lists of lengths c1, c2 that can be among the p best
    sums: at least (a + 1)(b + 1) - 1 pairs score as high as (a, b) does."""
    a = torch.arange(c1)[:, None].expand(c1, c2)
    b = torch.arange(c2)[None, :].expand(c1, c2)
    ok = (a + 1) * (b + 1) <= p
    return a[ok].to(device), b[ok].to(device)


def take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] along dim 0, for any shape of idx: index_select is an order of magnitude faster
    on CPU than advanced indexing, and retrieval gathers thousands of rows per query."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def quantize_int8(x: torch.Tensor, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) -> int8 codes (n, K) and per-row scales (n,): half the bytes of bf16 to gather."""
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[0], device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        scale[start : start + chunk] = part.abs().amax(1).clamp(min=1e-12) / 127
        codes[start : start + chunk] = (part / scale[start : start + chunk, None]).round().to(torch.int8)
    return codes, scale


class ProductKeyIndex:
    """Keys (row order), the k-means sub-keys and cells they were laid out by, and the cells' rows
    in CSR form; rows edited since the layout are scanned exactly instead.

    max_recent: rows kept on the side list before the grid is laid out again.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        key_mean: torch.Tensor,
        sub1: torch.Tensor,
        sub2: torch.Tensor,
        cell: torch.Tensor,
        max_cell_rows: int,
        max_recent: int = 4096,
    ):
        self.keys = keys.to(torch.bfloat16)  # (N, K) centred unit keys, row order
        self.key_mean = key_mean.float()  # (K,)
        self.sub1, self.sub2 = sub1.float(), sub2.float()  # (n1, K), (n2, K)
        self.sub = torch.cat([self.sub1, self.sub2])  # both sets scored in one product
        self.n1, self.n2 = sub1.shape[0], sub2.shape[0]
        self.cell = cell  # (N,)
        self.max_cell_rows, self.max_recent = max_cell_rows, max_recent
        self.recent = cell.new_zeros(0)  # (R,) rows edited since the layout
        self.stale = torch.zeros(len(cell), dtype=torch.bool, device=cell.device)  # (N,)
        self.layouts = 0
        self._layout()

    @classmethod
    def build(cls, raw_keys: torch.Tensor, max_cell_rows: int, seed: int = 0, max_recent: int = 4096):
        """Centre the keys and lay them out: sub-keys by k-means, then cells. Consumes raw_keys
        (float32, centred in place, so a million rows need one copy of their keys, not three)."""
        keys, K = raw_keys, raw_keys.shape[1]
        key_mean = keys.mean(0) if len(keys) else keys.new_zeros(K)
        for start in range(0, len(keys), 1 << 16):
            chunk = keys[start : start + (1 << 16)]
            chunk.copy_(F.normalize(chunk - key_mean, dim=-1))
        n_sub = n_sub_keys(len(keys))
        g = torch.Generator().manual_seed(seed)
        sample = keys[torch.randperm(len(keys), generator=g)[: 1 << 16]] if len(keys) else torch.zeros(1, K)
        # Sub-keys follow the content: k-means over the keys, then over what the first level
        # leaves unexplained, so key ~ sub1[i] + sub2[j] and a query scores cells additively.
        sub1 = kmeans(sample, n_sub, seed=seed)
        sub2 = kmeans(sample - sub1[nearest(sample, sub1)], n_sub, seed=seed + 1)
        # Fewer rows than sub-keys: repeat centroids so the grid keeps its n_sub x n_sub shape.
        sub1, sub2 = (c.repeat(math.ceil(n_sub / c.shape[0]), 1)[:n_sub] for c in (sub1, sub2))
        cell = assign_cells(keys, sub1, sub2, max_cell_rows)
        return cls(keys, key_mean, sub1, sub2, cell, max_cell_rows, max_recent)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def centred(self, raw: torch.Tensor) -> torch.Tensor:
        return F.normalize(raw.float() - self.key_mean.to(raw.device), dim=-1)

    def _layout(self) -> None:
        """Cells' rows in CSR form and their keys in cell order, for probes to gather by cell."""
        self.order = torch.argsort(self.cell, stable=True)  # (N,) rows sorted by cell
        counts = torch.bincount(self.cell, minlength=self.n1 * self.n2)
        # Each cell's first position in cell order and its row count, side by side: one gather
        # (one cache line) per probed cell.
        self.span = torch.stack([torch.cumsum(counts, 0) - counts, counts], dim=1)  # (cells, 2)
        ordered = take(self.keys, self.order)  # (N, K)
        # bf16 for GPUs; int8 with a per-row scale for CPUs, where gathering keys costs the most.
        if self.device.type == "cpu":
            self.rank_keys8, self.rank_scale = quantize_int8(ordered)
            self.rank_keys = None
        else:
            self.rank_keys, self.rank_keys8, self.rank_scale = ordered, None, None
        self.recent = self.cell.new_zeros(0)
        self.stale = torch.zeros(len(self.cell), dtype=torch.bool, device=self.cell.device)
        self.layouts += 1

    def update_row(self, i: int, raw_key: torch.Tensor) -> None:
        """A row's key after an edit (i == N appends): current at once through the side list."""
        key = self.centred(raw_key.to(self.device)).to(torch.bfloat16)
        if i == len(self):
            self.keys = torch.cat([self.keys, key[None]])
            self.cell = torch.cat([self.cell, self.cell.new_full((1,), -1)])
            self.stale = torch.cat([self.stale, self.stale.new_ones(1)])
        else:
            self.keys[i] = key
            self.stale[i] = True
        self.recent = torch.cat([self.recent, self.recent.new_full((1,), i)]).unique()
        if len(self.recent) > self.max_recent:
            self.relayout()

    def relayout(self) -> None:
        """Place the rows of the side list into cells and rebuild the CSR form (O(N log N))."""
        rows = self.recent
        keep = torch.ones(len(self), dtype=torch.bool, device=self.device)
        keep[rows] = False
        fill = torch.bincount(self.cell[keep], minlength=self.n1 * self.n2).cpu()
        cells = assign_cells(take(self.keys, rows).cpu(), self.sub1.cpu(), self.sub2.cpu(), self.max_cell_rows, fill)
        self.cell[rows] = cells.to(self.device)
        self._layout()

    def to(self, device: torch.device | str) -> ProductKeyIndex:
        for name in ("keys", "key_mean", "sub1", "sub2", "sub", "cell", "recent", "stale", "order", "span"):
            setattr(self, name, getattr(self, name).to(device))
        ordered = take(self.keys, self.order)
        if self.device.type == "cpu":
            self.rank_keys8, self.rank_scale = quantize_int8(ordered)
            self.rank_keys = None
        else:
            self.rank_keys, self.rank_keys8, self.rank_scale = ordered, None, None
        return self

    # ------------------------------------------------------------------ search

    @torch.no_grad()
    def ranks_whole(self, scan_rows: int) -> bool:
        """Whether `candidates` ranks every row by its key (a bank of at most scan_rows rows)."""
        return len(self) <= scan_rows

    def candidates(self, q: torch.Tensor, n: int, top_cells: int, probe_cells: int, scan_rows: int):
        """The n rows with the highest approximate scores for queries q (B, K), uncentred like the raw
        keys: (B, n) rows and a validity mask (a small bank may have fewer than n rows).

        Banks up to scan_rows rows are ranked whole: exact, and one matrix product is cheaper than a
        probe that would gather a large share of the rows anyway.
        """
        q = self.centred(q)  # the bank's common direction (its template words) out of both sides
        N = len(self)
        n = min(n, N)
        if N == 0:
            empty = torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
            return empty, empty.bool()
        if self.ranks_whole(scan_rows):
            rows = (q.to(torch.bfloat16) @ self.keys.T).float().topk(n, dim=1).indices  # (B, n)
            return rows, torch.ones_like(rows, dtype=torch.bool)
        rows, valid, score = self._probe(q, n, top_cells, probe_cells)
        if len(self.recent):  # edited rows: their cells are out of date, scan them exactly
            recent = self.recent[None].expand(len(q), -1)  # (B, R)
            rs = (q.to(torch.bfloat16) @ take(self.keys, self.recent).T).float()  # (B, R)
            rows, valid, score = (
                torch.cat([rows, recent], 1),
                torch.cat([valid, torch.ones_like(recent, dtype=torch.bool)], 1),
                torch.cat([score, rs], 1),
            )
            best = score.masked_fill(~valid, -math.inf).topk(min(n, score.shape[1]), dim=1).indices
            rows, valid = rows.gather(1, best), valid.gather(1, best)
        return rows, valid

    def _probe(self, q: torch.Tensor, n: int, top_cells: int, probe_cells: int):
        """(B, n) rows of the query's best cells by approximate score, their validity and scores."""
        s = q.float() @ self.sub.T  # (B, n1 + n2)
        t, i = s.view(len(s), 2, self.n1).topk(min(top_cells, self.n1), dim=2)  # (B, 2, c), best first
        (t1, t2), (i1, i2) = t.unbind(1), i.unbind(1)  # (B, c) each
        # Of the c x c shortlisted cells, read the probe_cells best by their additive score. With
        # both lists sorted, cell (a, b) is beaten by every (a' <= a, b' <= b), so only cells with
        # (a + 1)(b + 1) <= probe_cells can make the cut: far fewer pairs to select from.
        a, b = pair_shortlist(t1.shape[1], t2.shape[1], probe_cells, str(s.device))
        pair = t1.index_select(1, a) + t2.index_select(1, b)  # (B, M)
        # Best first, so that a probe whose cells hold more rows than its budget loses its worst cells.
        best = pair.topk(min(probe_cells, pair.shape[1]), dim=1).indices  # (B, P)
        cells = i1.gather(1, take(a, best)) * self.n2 + i2.gather(1, take(b, best))  # (B, P)
        pos, valid = self.positions(cells, PROBE_BUDGET * best.shape[1])  # (B, C) positions in cell order
        if self.rank_keys is not None:
            ranked = torch.bmm(take(self.rank_keys, pos), q.to(torch.bfloat16).unsqueeze(-1)).squeeze(-1).float()
        else:
            ranked = rank_int8(self.rank_keys8, self.rank_scale, pos, q)  # (B, C)
        rows = take(self.order, pos)
        valid = valid & ~take(self.stale, rows)
        top = ranked.masked_fill(~valid, -math.inf).topk(min(n, pos.shape[1]), dim=1).indices
        return rows.gather(1, top), valid.gather(1, top), ranked.gather(1, top)

    def positions(self, cells: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the given cells as positions in cell order (`order[pos]` is the row): (B, P) cell
        ids, best first -> (B, C) positions and validity mask, C = budget.

        Cells hold about one row each on average, so rows are gathered by count (CSR), not by padding
        every cell to the widest; the budget is fixed, so no count goes to the host, and a query
        whose cells hold more rows than that keeps those of its best cells.
        """
        B, P = cells.shape
        starts, counts = take(self.span, cells).unbind(-1)  # (B, P) each
        ends = torch.cumsum(counts, 1)  # (B, P): rows in the first p + 1 cells
        j = torch.arange(budget, device=cells.device).repeat(B, 1)  # (B, C)
        slot = torch.searchsorted(ends, j, right=True).clamp_(max=P - 1)  # (B, C) the cell holding row j
        # Row j of a query's list is its cell's start plus its rank in the cell.
        pos = starts.gather(1, slot) + j - (ends.gather(1, slot) - counts.gather(1, slot))
        valid = j < ends[:, -1:]
        return pos.clamp_(0, max(len(self.order) - 1, 0)), valid

    # ------------------------------------------------------------------ cache

    def save(self, path: str | Path, meta: dict) -> None:
        """Keys, sub-keys, cells and mean beside the bank (safetensors + JSON), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "keys": self.keys,
            "key_mean": self.key_mean,
            "sub1": self.sub1,
            "sub2": self.sub2,
            "cell": self.cell,
        }
        write_atomic(
            path,
            lambda tmp: save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                tmp,
                metadata={"explicitlm": json.dumps({"format": INDEX_FORMAT, **meta})},
            ),
        )

    @classmethod
    def load(cls, path: str | Path, meta: dict, max_cell_rows: int, max_recent: int) -> ProductKeyIndex | None:
        """The cached index when its metadata equals meta (same bank content and retrieval space), else None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                saved = json.loads((fh.metadata() or {}).get("explicitlm", "{}"))
            if saved != {"format": INDEX_FORMAT, **meta}:
                return None
            t = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            return None
        if t["cell"].numel() and int(t["cell"].max()) >= t["sub1"].shape[0] * t["sub2"].shape[0]:
            return None
        return cls(t["keys"], t["key_mean"], t["sub1"], t["sub2"], t["cell"], max_cell_rows, max_recent)


def rank_int8(keys8: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Approximate scores of the candidates at positions pos (B, C) for queries q (B, K): int8 keys
    gathered (a quarter of float32's bytes, where gathering costs the most), widened, and multiplied
    by each query, times the rows' scales."""
    keys = take(keys8, pos).to(q.dtype)  # (B, C, K)
    return torch.bmm(keys, q.unsqueeze(-1)).squeeze(-1) * take(scale, pos)  # (B, C) approximate q . key


def index_cache_path(bank_path: str | Path) -> Path:
    """Where a bank file's index is cached: beside it, under a name that starts with the bank's."""
    return Path(f"{bank_path}.index.safetensors")


def bank_index(
    bank: MemoryBank, dim: int, seed: int, max_cell_rows: int, max_recent: int, cache: str | Path | None = None
) -> ProductKeyIndex:
    """The index of this bank in this retrieval space: from the cache when it was built for the same
    content, dimension, seed and word normalisation, else computed (and cached)."""
    meta = {"bank": bank.fingerprint(), "rows": len(bank), "dim": dim, "seed": seed, "words": WORDS_VERSION}
    if cache is not None:
        index = ProductKeyIndex.load(cache, meta, max_cell_rows, max_recent)
        if index is not None:
            return index
    raw = lexical_keys(bank.word_ids, bank.counts, dim, seed)
    index = ProductKeyIndex.build(raw, max_cell_rows, seed, max_recent)
    if cache is not None:
        try:
            index.save(cache, meta)
        except OSError as e:  # a read-only folder: the index works, it is just not cached
            print(f"memory: could not cache the index at {cache}: {e}")
    return index
