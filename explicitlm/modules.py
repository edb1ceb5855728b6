"""The per-layer memory modules: the retrieval gate and the gated fusion.

`MemoryGate` scores a question's candidate rows: the lexical score every layer shares (how well the
row and the question share their rare words), plus a trained low-rank correction that maps the
layer's question states into the key space, times a trained temperature. It returns the top-k rows
with softmax weights, and in training a retrieval loss on the question's own row (known from its
uuid). `GatedMemoryFusion` is a SwiGLU over the hidden state and the retrieved memory, its output
zero-initialised so an untrained model gives exactly the backbone's logits.

Both keep float32 weights whatever the backbone's dtype: inputs are cast to the module's dtype and
outputs back to the residual stream's.

Letters: B batch, T tokens, D hidden size, K retrieval dim, k retrieved rows, C candidate rows,
F fusion width, r correction rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryGate(nn.Module):
    """Candidate rows -> top-k rows and weights: s = exp(log_scale) * (lexical + keys . U V x)."""

    def __init__(self, hidden_size: int, knowledge_dim: int, top_k: int, rank: int = 0):
        super().__init__()
        self.rank = rank
        if rank:
            self.query_down = nn.Linear(hidden_size, rank, bias=False)
            self.query_up = nn.Linear(rank, knowledge_dim)
            nn.init.zeros_(self.query_up.weight)  # untrained: the lexical ranking exactly
            nn.init.zeros_(self.query_up.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.top_k = top_k

    def correction(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B, D) pooled question states -> (B, K) query correction, or None without one."""
        if not self.rank:
            return None
        return self.query_up(self.query_down(pooled.to(self.query_up.weight.dtype)))

    def forward(
        self,
        pooled: torch.Tensor,
        lexical: torch.Tensor,
        keys: torch.Tensor,
        selectable: torch.Tensor,
        gold: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """pooled (B, D); lexical (B, C) scores; keys (B, C, K) of the candidates; selectable (B, C)
        candidates the top-k may take; gold (B,) the column of each question's own row (-1: unknown),
        given in training only -> top-k columns (B, k), weights (B, k), retrieval loss or None."""
        scores = lexical.float()
        corr = self.correction(pooled)
        if corr is not None:
            scores = scores + torch.bmm(keys.to(corr.dtype), corr.unsqueeze(-1)).squeeze(-1).float()  # (B, C)
        scores = self.log_scale.exp().float() * scores
        k = min(self.top_k, scores.shape[1])
        top, cols = scores.masked_fill(~selectable, -math.inf).topk(k, dim=1)  # (B, k)
        # A question with fewer candidates than k gets zero weight on the padding slots.
        weights = torch.softmax(top, dim=1).nan_to_num(0.0)
        loss = None
        if gold is not None and self.training:
            loss = self._retrieval_loss(scores, selectable, gold)
        return cols, weights, loss

    @staticmethod
    def _retrieval_loss(scores: torch.Tensor, selectable: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the question's own row against every other candidate, found or not."""
        known = gold >= 0  # (B,)
        if not known.any():
            # Keep every trainable tensor in the graph so DDP's reducer sees a gradient for it.
            return 0.0 * scores[torch.isfinite(scores)].sum()
        s, sel, g = scores[known], selectable[known], gold[known]
        cols = torch.arange(s.shape[1], device=s.device)
        logits = s.masked_fill(~(sel | (cols[None, :] == g[:, None])), -math.inf)
        return F.cross_entropy(logits, g)


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
        dtype = self.out_proj.weight.dtype
        memory = memory.float()
        memory = memory * torch.rsqrt(memory.pow(2).mean(-1, keepdim=True) + 1e-6)  # scale-free memory
        gate, up = (self.hidden_proj(h.to(dtype)) + self.memory_proj(memory.to(dtype))[:, None]).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up).to(h.dtype)
