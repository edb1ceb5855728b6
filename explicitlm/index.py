"""The product-key index: a search structure over the bank's row keys.

The index places every row in one cell of a product-key grid: two sub-key sets of about sqrt(N)
centroids each (k-means over the row keys, then over their residuals), scored additively. A query
reads the rows of its best top_cells x top_cells cells, then an exact cosine stage ranks those
candidates. Cells hold at most `max_cell_rows` rows (a full cell spills a row to its next-best cell),
so the work per query does not grow with N. Everything here is computed from the bank's keys and
can be rebuilt from them.

Letters: B queries, N rows, L tokens per row, V vocabulary, K retrieval dim, C cells (in
`positions`, candidate rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def row_vectors(
    token_ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
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
def assign_cells(
    keys: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, cap: int, tries: int = 4, chunk: int = 65536
) -> torch.Tensor:
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

    def __init__(
        self,
        keys: torch.Tensor,
        n_sub: int,
        max_cell_rows: int,
        seed: int = 0,
        centroids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
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
        pos_flat = torch.arange(total, device=device) + torch.repeat_interleave(
            starts - (torch.cumsum(counts, 0) - counts), counts
        )
        C = max(int(per_query.max()) if B else 0, 1)
        col = torch.arange(C, device=device)
        valid = col[None, :] < per_query[:, None]  # (B, C)
        first = torch.cumsum(per_query, 0) - per_query  # a query's rows are contiguous in the flat list
        pos = (
            take(pos_flat, (first[:, None] + col[None, :]).clamp_(max=max(total - 1, 0)))
            if total
            else torch.zeros(B, C, dtype=torch.long, device=device)
        )
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
    q8 = (
        (q / q.abs().amax(1, keepdim=True).clamp(min=1e-12) * 127).round().to(torch.int8)
    )  # a query's scale never changes its ranking
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
