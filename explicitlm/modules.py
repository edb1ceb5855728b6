"""The per-layer memory modules: the reader (`memory_gate`) and the fusion (`gated_memory_fusion`).

`MemoryGate` reads a question against its candidate rows and decides, with trained parameters,
which row answers it, whether any does, and where in that row the answer is. It is a decomposable
attention model (attend, compare, aggregate): every row token is aligned softly with the question's
tokens and every question token with the row's; a small MLP compares each token with what it aligned
to; the comparisons are summed into a score per row. Word statistics are inputs, not the decision:
each token carries whether its word occurs on the other side and how rare it is. A learned null score
competes with the rows in one softmax, so "no row answers this" is a choice the reader makes. Start
and end scores over each row's tokens mark the answer's span. A second softmax, over its own null and
the same rows, picks a row whose span the answer is *not*: another fact about the question's subject
("X died in Toronto." read for "Where was X born?"), whose object is then written down rather than up.

`GatedMemoryFusion` is a SwiGLU over a position's hidden state and the memory token that position
should produce, and a second one over the hidden state and the token the answer should not be; their
outputs are zero-initialised so an untrained model gives exactly the backbone's logits.

Both keep float32 weights whatever the backbone's dtype (a model that only answers may hold them in
its autocast dtype: `ExplicitLM.hold_for_answers`). Outside autocast their inputs are cast to the
weights' dtype; under it each product casts its own (the reader leaves them as they come), and
outputs go back to the residual stream's dtype.

Letters: B questions, T question tokens, D hidden size, d reader width, R candidate rows, L tokens
per row, F lexical features per row, S answer slots, f fusion width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per row token: its word occurs in the question, its IDF (scaled to 0-1), both, is a word at all,
# starts a word, position in the row (0-1). Per question token: its word occurs in the row, IDF,
# both, is a word. Per row: TF-IDF cosine, the share of the question's IDF mass the row contains,
# the share of the row's that the question contains.
ROW_TOKEN_FEATURES = 6
QUESTION_TOKEN_FEATURES = 4
ROW_FEATURES = 3


@dataclass
class Reading:
    """One layer's reading of its candidate rows."""

    scores: torch.Tensor  # (B, 1 + R) null first, then each row; -inf where a row is padding
    start: torch.Tensor  # (B, R, L) logits of the answer's first token; -inf off the row
    end: torch.Tensor  # (B, R, L) logits of its last token
    exclusion: torch.Tensor  # (B, 1 + R) null first, then each row as naming what the answer is not


class MemoryGate(nn.Module):
    """Question tokens (B, T, D) and candidate rows' tokens (B, R, L, D) -> a `Reading`."""

    def __init__(self, hidden_size: int, dim: int, encoder: int = 0):
        super().__init__()
        self.dim = dim
        self.q_proj = nn.Linear(hidden_size, dim)
        # A question's words are many and a linear map of the backbone's states gives few of them a
        # code of their own; an MLP beside it (zero-initialised: untrained, the projection alone) can.
        self.q_encoder = (
            nn.Sequential(nn.Linear(hidden_size, encoder), nn.GELU(), nn.Linear(encoder, dim)) if encoder else None
        )
        self.r_proj = nn.Linear(hidden_size, dim)
        self.q_feat = nn.Linear(QUESTION_TOKEN_FEATURES, dim, bias=False)
        self.r_feat = nn.Linear(ROW_TOKEN_FEATURES, dim, bias=False)
        self.compare_q = nn.Linear(3 * dim, dim)
        self.compare_r = nn.Linear(3 * dim, dim)
        # Neighbouring row tokens: a span's ends depend on what stands beside them.
        self.context = nn.Conv1d(dim, dim, 3, padding=1)
        self.q_head = nn.Linear(dim, 1)  # each question token's evidence
        self.r_head = nn.Linear(dim, 3)  # each row token's evidence, start and end
        self.lexical = nn.Linear(ROW_FEATURES, 1)
        self.null = nn.Linear(dim, 1)
        # The exclusion's own evidence per row token and question token, word statistics and null.
        self.x_head = nn.Linear(dim, 1)
        self.xq_head = nn.Linear(dim, 1)
        self.x_lexical = nn.Linear(ROW_FEATURES, 1)
        self.x_null = nn.Linear(dim, 1)
        zeroed = (self.q_head, self.r_head, self.null, self.x_head, self.xq_head, self.x_null)
        for head in (*zeroed, *([self.q_encoder[-1]] if self.q_encoder is not None else [])):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        # Untrained, rows rank by their TF-IDF cosine with the question: where lexical retrieval is.
        # Reading starts nearly shut (null 5); exclusion starts open, so its fusion gets a gradient.
        with torch.no_grad():
            for lexical in (self.lexical, self.x_lexical):
                lexical.weight.zero_()
                lexical.weight[0, 0] = 10.0
                lexical.bias.zero_()
            self.null.bias.fill_(5.0)

    def forward(
        self,
        q_states: torch.Tensor,
        q_mask: torch.Tensor,
        q_feats: torch.Tensor,
        r_states: torch.Tensor,
        r_mask: torch.Tensor,
        r_feats: torch.Tensor,
        lexical: torch.Tensor,
        valid: torch.Tensor,
    ) -> Reading:
        """q_states (B, T, D), q_mask (B, T) the question's tokens, q_feats (B, R, T, 4); r_states
        (B, R, L, D), r_mask (B, R, L) real tokens, r_feats (B, R, L, 6); lexical (B, R, 3); valid
        (B, R) rows that are not padding."""
        dtype = self.q_proj.weight.dtype
        autocast = torch.is_autocast_enabled(q_states.device.type)

        def own(x: torch.Tensor) -> torch.Tensor:
            """Under autocast each projection casts its input itself; outside it, the weights' dtype."""
            return x if autocast else x.to(dtype)

        qh = self.q_proj(own(q_states))  # (B, T, d)
        if self.q_encoder is not None:
            qh = qh + self.q_encoder(own(q_states))
        rh = self.r_proj(own(r_states))  # (B, R, L, d)
        qf = qh[:, None] + self.q_feat(own(q_feats))  # (B, R, T, d)
        rf = rh + self.r_feat(own(r_feats))  # (B, R, L, d)
        # Row tokens last: each softmax then runs over L or T with the other dimension contiguous.
        # Softmaxes in float32: exact to more digits and, on a CPU, several times faster than in bf16.
        sim = torch.matmul(qf, rf.transpose(-1, -2)).float() * (1 / math.sqrt(self.dim))  # (B, R, T, L)
        q_ok = q_mask.bool()[:, None, :, None]  # (B, 1, T, 1)
        r_ok = r_mask.bool()  # (B, R, L)
        r_ok_t = r_ok[:, :, None, :]  # (B, R, 1, L)
        # Attend: what in the question each row token aligns with, and the reverse. A question or
        # row with no tokens aligns with nothing (softmax over nothing gives zeros, not NaN).
        # Back to the states' dtype for the products (autocast would cast them; weights held in bf16
        # without it would not).
        to_q = (torch.softmax(sim.masked_fill(~q_ok, -1e4), 2) * q_ok).to(qf.dtype)  # (B, R, T, L)
        to_r = (torch.softmax(sim.masked_fill(~r_ok_t, -1e4), -1) * r_ok_t).to(rf.dtype)  # (B, R, T, L)
        beta = torch.matmul(to_q.transpose(-1, -2), qf)  # (B, R, L, d)
        alpha = torch.matmul(to_r, rf)  # (B, R, T, d)
        # Compare each token with what it aligned to.
        vr = F.gelu(self.compare_r(torch.cat([rf, beta, rf * beta], -1)))  # (B, R, L, d)
        vq = F.gelu(self.compare_q(torch.cat([qf, alpha, qf * alpha], -1)))  # (B, R, T, d)
        B, R, L, d = vr.shape
        vr = vr + F.gelu(neighbours(self.context, vr * r_ok[..., None]))
        # Aggregate: a row's score sums its tokens' and the question's tokens' evidence.
        evidence, start, end = self.r_head(vr).unbind(-1)  # (B, R, L) each
        q_evidence = self.q_head(vq).squeeze(-1)  # (B, R, T)
        x_evidence = self.x_head(vr).squeeze(-1)  # (B, R, L)
        x_q_evidence = self.xq_head(vq).squeeze(-1)  # (B, R, T)
        q_ok_rows = q_mask[:, None, :]  # (B, 1, T)
        lexical = own(lexical)
        row = (evidence * r_ok).sum(-1) + (q_evidence * q_ok_rows).sum(-1) + self.lexical(lexical).squeeze(-1)
        x_row = (x_evidence * r_ok).sum(-1) + (x_q_evidence * q_ok_rows).sum(-1) + self.x_lexical(lexical).squeeze(-1)
        pooled = own((qh * q_mask[..., None]).sum(1) / q_mask.sum(1, keepdim=True).clamp(min=1))  # (B, d)
        scores, exclusion = (
            torch.cat([null(pooled), r.masked_fill(~valid, -math.inf)], 1).float()  # (B, 1 + R)
            for null, r in ((self.null, row), (self.x_null, x_row))
        )
        off = ~r_ok
        return Reading(scores, start.float().masked_fill(off, -1e4), end.float().masked_fill(off, -1e4), exclusion)


def neighbours(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A width-3 `conv` (padding 1) along each row's tokens of x (B, R, L, d) -> (B, R, L, d'): each
    token beside its left and right neighbours (zeros past the ends), times the three taps in one
    product (the convolution's arithmetic, without the layout copies a Conv1d over (B R, d, L) makes)."""
    padded = F.pad(x, (0, 0, 1, 1))  # (B, R, L + 2, d)
    around = torch.cat([padded[..., :-2, :], x, padded[..., 2:, :]], -1)  # (B, R, L, 3 d)
    return F.linear(around, conv.weight.permute(0, 2, 1).flatten(1), conv.bias)


def reading_loss(reading: Reading, target: torch.Tensor, span: torch.Tensor, others_null: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the right choice among null and the rows, and of the answer's span in its row.

    target (B,): 0 no row answers, 1 + c row c, -1 unknown (no loss); span (B, 2) the answer's first
    and last token in the target row, -1 where it does not occur there. With others_null, plus that
    weight times the cross-entropy of the null among the null and every row but the own: what a
    question whose own row is hidden teaches, taught by every question, so that a row about the
    subject that does not answer scores below the null and not only below the own row."""
    # Masked means, not boolean selection: no host sync, and every trainable tensor stays in the
    # graph (DDP's reducer needs a gradient for each) even when a batch has nothing to learn from.
    known = (target >= 0).float()
    choice = F.cross_entropy(reading.scores, target.clamp(min=0), reduction="none")  # (B,)
    if others_null:
        own = F.one_hot(target.clamp(min=0), reading.scores.shape[1]).bool() & (target > 0)[:, None]  # (B, 1 + R)
        rest = -torch.log_softmax(reading.scores.masked_fill(own, -math.inf), 1)[:, 0]  # (B,)
        choice = choice + others_null * rest
    loss = (choice * known).sum() / known.sum().clamp(min=1)
    located = ((target > 0) & (span[:, 0] >= 0)).float()  # (B,)
    row = (target - 1).clamp(min=0)[:, None, None].expand(-1, 1, reading.start.shape[2])  # (B, 1, L)
    ends = span.clamp(min=0)
    spans = sum(
        F.cross_entropy(logits.gather(1, row).squeeze(1), ends[:, i], reduction="none")
        for i, logits in enumerate((reading.start, reading.end))
    )  # (B,)
    return loss + (spans * located).sum() / located.sum().clamp(min=1)


def exclusion_loss(reading: Reading, named: torch.Tensor) -> torch.Tensor:
    """-log of the exclusion's weight on the rows that name a wrong option, or on its null where none
    does. named (B, R): the row names a wrong option and not the right one; a question whose options
    are unknown has no row named and learns the null."""
    p = torch.log_softmax(reading.exclusion, 1)  # (B, 1 + R)
    target = torch.cat([~named.any(1, keepdim=True), named], 1)  # (B, 1 + R)
    return -torch.logsumexp(p.masked_fill(~target, -1e4), 1).mean()


def exclusion_width(fusion_dim: int) -> int:
    """The exclusion SwiGLU's width beside the reading one's."""
    return max(fusion_dim // 4, 1)


class GatedMemoryFusion(nn.Module):
    """SwiGLUs over [hidden; memory token] and [hidden; excluded token] at the answer's positions.

    The memory tokens' half of each SwiGLU's input projection depends only on the question's reading,
    not on the position: `memory_terms` computes it once per question and answer slot, and `forward`
    adds the hidden states' half at each position (a continuation or a generated token shares it)."""

    def __init__(self, hidden_size: int, fusion_dim: int):
        super().__init__()
        self.hidden_proj = nn.Linear(hidden_size, 2 * fusion_dim, bias=False)
        self.memory_proj = nn.Linear(hidden_size, 2 * fusion_dim, bias=False)
        self.out_proj = nn.Linear(fusion_dim, hidden_size, bias=False)
        # Writing one token down is a narrower job than writing the answer: a quarter of the width.
        x_dim = exclusion_width(fusion_dim)
        self.x_hidden_proj = nn.Linear(hidden_size, 2 * x_dim, bias=False)
        self.x_memory_proj = nn.Linear(hidden_size, 2 * x_dim, bias=False)
        self.x_out_proj = nn.Linear(x_dim, hidden_size, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # untrained: exactly the backbone
        nn.init.zeros_(self.x_out_proj.weight)

    def memory_terms(
        self, memory: torch.Tensor, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """memory, excluded (B, S, D) each slot's token -> their input projections (B, S, 2f) and
        (B, S, 2f_x), scale-free (RMS-normalised first); None for no excluded token."""
        dtype = self.out_proj.weight.dtype
        out = []
        for token, proj in ((memory, self.memory_proj), (excluded, self.x_memory_proj)):
            if token is None:
                out.append(None)
                continue
            token = token.float()
            out.append(proj((token * torch.rsqrt(token.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)))
        return out[0], out[1]

    def forward(
        self, h: torch.Tensor, memory: torch.Tensor, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (P, D) hidden states at P positions; memory (P, 2f) and excluded (P, 2f_x) the
        `memory_terms` of the slot each position predicts -> what each SwiGLU adds to the residual
        stream (P, D), before the caller scales it by the mass behind its token; None for no excluded
        token."""
        hd = h.to(self.out_proj.weight.dtype)
        out = []
        for terms, h_proj, o_proj in (
            (memory, self.hidden_proj, self.out_proj),
            (excluded, self.x_hidden_proj, self.x_out_proj),
        ):
            if terms is None:
                out.append(None)
                continue
            # The memory's half added inside the product (one kernel, no (P, 2f) sum written apart).
            gate, up = torch.addmm(terms, hd, h_proj.weight.t()).chunk(2, dim=-1)
            out.append(o_proj(F.silu(gate) * up).to(h.dtype))
        return out[0], out[1]
