"""The per-layer memory modules: the product-key retrieval gate and the gated fusion.

`MemoryGate` turns a layer's question states into a query, finds candidate rows through the
product-key index, reranks them exactly and returns the top-k with softmax weights (and, in training,
a retrieval loss). `GatedMemoryFusion` is a SwiGLU over the hidden state and the retrieved memory,
zero-initialised so an untrained model gives exactly the backbone's logits.

Letters: B batch, T tokens, D hidden size, K retrieval dim, k retrieved rows, C candidate rows,
F fusion width.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from explicitlm.index import ProductKeyIndex, rank_int8, take

# Candidates, best first, that the retrieval loss's exact stage contrasts the gold row with.
HARD_NEGATIVES = 64
# Candidates re-scored in float32 at inference after the bf16 ranking; the top-k come from these.
RERANK = 32


@functools.lru_cache(maxsize=16)
def pair_shortlist(c1: int, c2: int, p: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) of two best-first lists of lengths c1, c2 that can be among the p best
    sums: at least (a + 1)(b + 1) - 1 pairs score as high as (a, b) does."""
    a = torch.arange(c1)[:, None].expand(c1, c2)
    b = torch.arange(c2)[None, :].expand(c1, c2)
    ok = (a + 1) * (b + 1) <= p
    return a[ok].to(device), b[ok].to(device)


class MemoryGate(nn.Module):
    """Product-key retrieval: query -> coarse cells by sub-keys -> exact cosine rerank -> top-k.

    The query map is the keys' own projection P plus a trained low-rank correction, q = P x + U V x + b:
    retrieval starts where it already works (cosine of mean embeddings) and the correction has
    room to map a question's wording onto a sentence's, but not to memorise every training subject.
    """

    def __init__(
        self,
        hidden_size: int,
        key_projection: torch.Tensor,
        top_cells: int,
        probe_cells: int,
        top_k: int,
        rank: int = 32,
        scan_rows: int = 0,
    ):
        super().__init__()
        K = key_projection.shape[0]
        self.register_buffer("key_projection", key_projection.clone(), persistent=False)  # (K, D)
        self.query_down = nn.Linear(hidden_size, rank, bias=False)
        self.query_up = nn.Linear(rank, K)
        nn.init.zeros_(self.query_up.weight)
        nn.init.zeros_(self.query_up.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.top_cells = top_cells
        self.probe_cells = probe_cells
        self.top_k = top_k
        self.scan_rows = scan_rows  # banks up to this size are ranked whole, without the probe

    def query(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled question states -> (B, K) unit queries."""
        q = pooled @ self.key_projection.T + self.query_up(self.query_down(pooled))
        return F.normalize(q.float(), dim=-1)

    def forward(
        self,
        h: torch.Tensor,
        query_weights: torch.Tensor,
        index: ProductKeyIndex,
        target_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h (B, T, D) normalised hidden states, query_weights (B, T) zero off the question
        -> rows (B, k), weights (B, k), retrieval loss or None."""
        qw = query_weights.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * qw).sum(1) / qw.sum(1).clamp(min=1e-6)  # (B, D)
        q = self.query(pooled)  # (B, K)
        scale = self.log_scale.exp()
        # The sub-keys stay where k-means put them, with the rows they placed: a query routes well
        # for any row, seen in training or not, by landing near that row's key.
        s = (scale * q) @ index.sub.T  # (B, n1 + n2)
        s1, s2 = s[:, : index.n1], s[:, index.n1 :]  # (B, n1), (B, n2)
        n_rows = index.keys.shape[0]
        n = min(max(self.top_k, HARD_NEGATIVES if self.training else RERANK), n_rows)
        # Rank candidates approximately without a graph (bf16; int8 in a CPU probe), then score in
        # float32 with a graph only those that matter: the top-k the fusion reads (from a margin
        # of RERANK, so rounding in the ranking cannot change them) and, in training, the hardest
        # negatives of the retrieval loss. Easy negatives carry next to no gradient, and a float32
        # graph over thousands of candidates per query cost more than the rest of the gate.
        with torch.no_grad():
            if n_rows <= self.scan_rows:
                # A small bank is ranked whole: exact, and one matrix product is cheaper than a
                # probe that would gather a large share of the rows anyway.
                pos = (q.detach().to(torch.bfloat16) @ index.rank_keys.T).topk(n, dim=1, sorted=False).indices  # (B, n)
                cand, valid = take(index.order, pos), torch.ones_like(pos, dtype=torch.bool)
            else:
                cand, valid = self._probe(q.detach(), s, index, n)
        scores = scale * torch.bmm(take(index.keys, cand), q.unsqueeze(-1)).squeeze(-1)  # (B, n)
        scores = scores.masked_fill(~valid, -math.inf)
        order = scores.detach().argsort(dim=1, descending=True)  # exact float32 order, best first
        scores, cand = scores.gather(1, order), cand.gather(1, order)
        k = min(self.top_k, n)
        top, rows = scores[:, :k], cand[:, :k]  # (B, k)
        # A query with fewer valid candidates than k gets zero weight on the padding slots.
        weights = torch.softmax(top, dim=1).nan_to_num(0.0)
        rows = torch.where(torch.isfinite(top), rows, torch.zeros_like(rows))
        loss = None
        if target_rows is not None and self.training:
            loss = self._retrieval_loss(q, scale, s1, s2, scores, cand, index, target_rows)
        return rows, weights, loss

    def _probe(
        self, q: torch.Tensor, s: torch.Tensor, index: ProductKeyIndex, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The n best rows by approximate score (bf16 on a GPU, int8 on a CPU) among the rows of
        the query's best cells: (B, n) rows, valid. s (B, n1 + n2) are the query's sub-key scores,
        both sets side by side."""
        t, i = s.detach().view(len(s), 2, index.n1).topk(min(self.top_cells, index.n1), dim=2)  # (B, 2, c), best first
        (t1, t2), (i1, i2) = t.unbind(1), i.unbind(1)  # (B, c) each
        # Of the c x c shortlisted cells, read the probe_cells best by their additive score. With
        # both lists sorted, cell (a, b) is beaten by every (a' <= a, b' <= b), so only cells with
        # (a + 1)(b + 1) <= probe_cells can make the cut: far fewer pairs to select from.
        a, b = pair_shortlist(t1.shape[1], t2.shape[1], self.probe_cells, str(s.device))
        pair = t1.index_select(1, a) + t2.index_select(1, b)  # (B, M)
        best = pair.topk(min(self.probe_cells, pair.shape[1]), dim=1, sorted=False).indices  # (B, p)
        cells = i1.gather(1, take(a, best)) * index.n2 + i2.gather(1, take(b, best))  # (B, p)
        pos, valid = index.positions(cells)  # (B, C) positions in cell order, C about the rows of p cells
        if q.is_cuda:
            ranked = torch.bmm(take(index.rank_keys, pos), q.to(torch.bfloat16).unsqueeze(-1)).squeeze(-1)  # (B, C)
        else:
            ranked = rank_int8(index, pos, q)  # (B, C)
        keep = ranked.masked_fill(~valid, -math.inf).topk(min(n, pos.shape[1]), dim=1, sorted=False).indices
        return take(index.order, pos.gather(1, keep)), valid.gather(1, keep)  # (B, n), re-sorted by the caller

    def _retrieval_loss(self, q, scale, s1, s2, scores, cand, index, target_rows) -> torch.Tensor:
        known = target_rows >= 0  # (B,)
        if not known.any():
            # Keep every trainable tensor in the graph so DDP's reducer sees a gradient for it.
            return 0.0 * (s1.sum() + s2.sum() + scores[torch.isfinite(scores)].sum())
        q, s1, s2, scores, cand = q[known], s1[known], s2[known], scores[known], cand[known]
        gold = target_rows[known]  # (b,)
        gold_score = scale * (q * index.keys[gold]).sum(-1, keepdim=True)  # (b, 1)
        # Exact stage: the gold row against every other candidate, whether the coarse stage found it or not.
        logits = torch.cat([scores.masked_fill(cand == gold[:, None], -math.inf), gold_score], dim=1)
        exact = F.cross_entropy(logits, torch.full_like(gold, logits.shape[1] - 1))
        # Coarse stage: the query should rank the gold row's sub-keys first in each set.
        cell = index.cell[gold]
        coarse = F.cross_entropy(s1, cell // index.n2) + F.cross_entropy(s2, cell % index.n2)
        return exact + 0.5 * coarse


class GatedMemoryFusion(nn.Module):
    """SwiGLU over [hidden; memory]; the memory half is computed once per sequence, not per token."""

    def __init__(self, hidden_size: int, fusion_dim: int):
        super().__init__()
        self.hidden_proj = nn.Linear(hidden_size, 2 * fusion_dim, bias=False)
        self.memory_proj = nn.Linear(hidden_size, 2 * fusion_dim, bias=False)
        self.out_proj = nn.Linear(fusion_dim, hidden_size, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # untrained: exactly the backbone

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """h (B, T, D), memory (B, D) -> (B, T, D) to add to the residual stream."""
        memory = memory * torch.rsqrt(memory.pow(2).mean(-1, keepdim=True) + 1e-6)  # scale-free memory
        gate, up = (self.hidden_proj(h) + self.memory_proj(memory.to(h.dtype))[:, None]).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up)


def key_projection(hidden_size: int, knowledge_dim: int, seed: int) -> torch.Tensor:
    """(K, D): identity when K == D, else a seeded semi-orthogonal map (cosines roughly preserved)."""
    if knowledge_dim == hidden_size:
        return torch.eye(hidden_size)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(hidden_size, knowledge_dim), min(hidden_size, knowledge_dim), generator=g)
    qmat, _ = torch.linalg.qr(a)  # orthonormal columns
    return qmat.T[:knowledge_dim, :hidden_size] if knowledge_dim <= hidden_size else qmat[:knowledge_dim, :hidden_size]
