"""What every layer shares when it reads memory: the question's candidate rows, the features the
reader sees of them, and what a reading makes of a row (the answer's tokens, slot by slot).

1. Candidates: the question's lexical vector (its distinct words, IDF-weighted, `explicitlm.index`)
   finds rows through the product-key index, and the inverted lists add the rows naming its rarest
   words. Their TF-IDF cosine with the question, computed exactly from their words (by the words'
   small numbers where the bank keeps them, `explicitlm.row_words`) with the bank's current IDF,
   keeps the best R: the rows each layer's reader reads.
2. Reader inputs: each row's tokens, and for every row token and question token whether its word
   occurs on the other side and how rare it is; per row its cosine and the shares of the question's
   and of the row's IDF mass they have in common. Word statistics are the reader's inputs; which row
   answers, and whether any does, is the reader's trained decision (`explicitlm.modules`).
3. Values: the answer is read out of a row as a span. Slot s of the answer (its s-th token, or the
   end of the answer after its last) is the row's token s places after the span's start, weighted by
   the chance that the span has not ended there; every row contributes by its reading weight.

Letters: B questions, T tokens, C candidate rows, R rows read, L tokens per row, D hidden size,
S answer slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from explicitlm.bank import MemoryBank, distinct_words
from explicitlm.index import ProductKeyIndex, lexical_vectors, take
from explicitlm.postings import Postings
from explicitlm.row_words import RowWords
from explicitlm.words import NO_WORD


@dataclass
class Candidates:
    rows: torch.Tensor  # (B, R) bank rows the reader reads
    valid: torch.Tensor  # (B, R) False on padding (a bank smaller than R, or too few matches)
    lexical: torch.Tensor  # (B, R, 3) cosine, question share, row share
    target: torch.Tensor | None  # (B,) 0: no row answers, 1 + c: row c, -1: unknown (training only)


@dataclass
class RowTokens:
    """What the readers of every layer read, gathered once per forward."""

    ids: torch.Tensor  # (B, R, L) token ids
    mask: torch.Tensor  # (B, R, L) real tokens
    feats: torch.Tensor  # (B, R, L, 6) per row token
    q_feats: torch.Tensor  # (B, R, T, 4) per question token, against each row


def contains(sorted_words: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Membership: sorted_words (B, T) sorted per row, ids (B, ...) -> bool (B, ...)."""
    flat = ids.reshape(ids.shape[0], -1)
    pos = torch.searchsorted(sorted_words, flat).clamp_(max=sorted_words.shape[1] - 1)
    return (sorted_words.gather(1, pos) == flat).reshape(ids.shape) & (ids != NO_WORD)


def find_candidates(
    bank: MemoryBank,
    index: ProductKeyIndex,
    question: torch.Tensor,
    n: int,
    read_rows: int,
    top_cells: int,
    probe_cells: int,
    scan_rows: int,
    seed: int,
    target_rows: torch.Tensor | None = None,
    hide: torch.Tensor | None = None,
    postings: Postings | None = None,
    posting_rows: int = 0,
) -> Candidates:
    """question (B, T) word ids of the question's tokens (NO_WORD elsewhere) -> the read_rows rows
    with the highest TF-IDF cosine among the index's n candidates and, with postings, up to
    posting_rows rows that contain the question's rarest words.

    target_rows (B,) each question's own row (-1 unknown), in training; hide (B,) questions whose own
    row is kept from them, so that the reader learns what to do when the bank lacks the fact.

    A bank of at most scan_rows rows is ranked whole by its keys, and the lists' share of candidates
    comes from that ranking too: in a bank that small the lists of a question's template words hold
    most of its rows, and reading them costs more than the rest of the search."""
    q = lexical_vectors(question, bank.counts, index.keys.shape[1], seed, known_only=True)  # (B, K)
    whole = index.ranks_whole(scan_rows)
    lists = postings is not None and posting_rows > 0
    rows, selectable = index.candidates(q, n + posting_rows * (lists and whole), top_cells, probe_cells, scan_rows)
    if lists and not whole:
        named = postings.rows_for(question, posting_rows, torch.where(selectable, rows, -1))  # (B, P)
        rows = torch.cat([rows, named.clamp(min=0)], 1)
        selectable = torch.cat([selectable, named >= 0], 1)
    qs, _ = distinct_words(question)
    row_words = postings.row_words if postings is not None else None
    overlap = torch.stack(word_overlap(bank, rows, qs, row_words), -1)  # (B, C, 3): cosine, question share, row share
    cosine = overlap[..., 0]  # (B, C)
    if hide is not None and target_rows is not None:
        selectable = selectable & ~((rows == target_rows[:, None]) & hide[:, None])
    k = min(read_rows, rows.shape[1])
    top = cosine.masked_fill(~selectable, -torch.inf).topk(k, dim=1).indices  # (B, R)
    rows, valid = rows.gather(1, top), selectable.gather(1, top)
    target = None
    if target_rows is not None:
        found = (rows == target_rows[:, None]) & valid  # (B, R)
        target = torch.where(found.any(1), found.float().argmax(1) + 1, torch.zeros_like(target_rows))
        target = torch.where(target_rows >= 0, target, torch.full_like(target, -1))
    lexical = overlap.gather(1, top[..., None].expand(-1, -1, 3)) * valid[..., None]  # (B, R, 3)
    return Candidates(rows, valid, lexical, target)


def word_overlap(
    bank: MemoryBank, rows: torch.Tensor, question: torch.Tensor, row_words: RowWords | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows (B, C); question (B, T) word ids sorted per row -> each (B, C): the TF-IDF cosine of row
    and question, the share of the question's IDF mass the row contains, and the share of the
    row's IDF mass the question contains. With row_words (the bank's words by number, kept with its
    inverted lists) the same figures come from table lookups instead of searches."""
    q_first = torch.ones_like(question, dtype=torch.bool)
    q_first[:, 1:] = question[:, 1:] != question[:, :-1]
    q_first &= question != NO_WORD
    q_idf = bank.counts.idf(question) * q_first  # (B, T)
    q_known = q_first & (bank.counts.df_of(question) > 0)
    q_norm = (q_idf.square() * q_known).sum(1).sqrt()  # (B,)
    if row_words is None:
        words, first = take(bank.word_ids, rows), take(bank.first, rows)  # (B, C, L) each; first: each word once
        idf = bank.counts.idf(words)  # (B, C, L)
        in_q = contains(question, words) & first
        w2 = idf.square() * first
        shared2, shared = (w2 * in_q).sum(-1), (idf * in_q).sum(-1)  # (B, C) each
        row2, row1 = w2.sum(-1), (idf * first).sum(-1)
    else:
        numbers = take(row_words.numbers, rows)  # (B, C, L), 0 but at each word's first token
        idf = row_words.idf(numbers) * (numbers > 0)
        row2, row1 = idf.square().sum(-1), idf.sum(-1)
        shared2, shared = row_words.scores(rows, question, torch.stack([q_idf.square(), q_idf], -1)).unbind(-1)
    cosine = shared2 / (row2.sqrt() * q_norm[:, None]).clamp(min=1e-6)
    question_share = shared / q_idf.sum(1, keepdim=True).clamp(min=1e-6)
    row_share = shared / row1.clamp(min=1e-6)
    return cosine, question_share, row_share


def row_tokens(bank: MemoryBank, rows: torch.Tensor, question: torch.Tensor) -> RowTokens:
    """rows (B, R) bank rows; question (B, T) the question tokens' word ids (NO_WORD elsewhere)."""
    B, R = rows.shape
    ids, mask, words = (take(t, rows) for t in (bank.token_ids, bank.mask, bank.word_ids))  # (B, R, L) each
    L = ids.shape[-1]
    top = math.log(bank.counts.n_rows + 1.0) + 1.0  # the IDF of a word no row contains: the highest
    qs, _ = distinct_words(question)
    is_word = words != NO_WORD
    in_q = contains(qs, words).float()
    idf = bank.counts.idf(words) / top * is_word
    starts = is_word.clone()
    starts[..., 1:] &= words[..., 1:] != words[..., :-1]
    pos = torch.arange(L, device=rows.device, dtype=torch.float32) / max(L - 1, 1)
    feats = torch.stack([in_q, idf, in_q * idf, is_word.float(), starts.float(), pos.expand(B, R, L)], -1)
    feats = feats * mask[..., None]
    row_sorted = words.sort(-1).values.reshape(B * R, L)
    q_words = question.repeat_interleave(R, 0)  # (B R, T)
    in_row = contains(row_sorted, q_words).reshape(B, R, -1).float()  # (B, R, T)
    q_word = question != NO_WORD
    q_idf = (bank.counts.idf(question) / top * q_word)[:, None].expand_as(in_row)
    q_feats = torch.stack([in_row, q_idf, in_row * q_idf, q_word[:, None].expand_as(in_row).float()], -1)
    return RowTokens(ids, mask, feats, q_feats)


def span_values(
    row_embeddings: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    slots: int,
    readings: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What each answer slot should produce under each reading of the same spans: per reading, (B, S, D)
    and the reading mass behind it (B, S).

    row_embeddings (B, R, L, D); start, end (B, R, L) span logits; readings: (weights (B, R), each
    row's reading weight (they sum to the trust in memory, at most 1), and end_embedding (D,) the
    end-of-turn token's or None). Slot s of a row is its token at start + s while the span has not
    ended, else the end of turn; the mass is then the weights' sum at every slot. When end_embedding
    is None (an excluded span says nothing of where the answer ends) a slot past the span gets
    nothing, and its mass is only what row tokens still hold there. Every reading's slots come from
    one product over the rows, which are the largest tensor here."""
    L = start.shape[-1]
    p_start, p_end = torch.softmax(start, -1), torch.softmax(end, -1)  # (B, R, L)
    not_ended = p_end.flip(-1).cumsum(-1).flip(-1)  # (B, R, L): P(end >= m)
    s = torch.arange(slots, device=start.device)[:, None]
    m = torch.arange(L, device=start.device)[None, :]
    offset = m - s  # (S, L): the span's start that puts row token m at slot s
    span = p_start[..., offset.clamp(min=0)] * (offset >= 0) * not_ended[..., None, :]  # (B, R, S, L)
    mix = torch.stack([span * weights[..., None, None] for weights, _ in readings], 1)  # (B, K, R, S, L)
    B, K, R, S, _ = mix.shape
    # One (K S, R L) x (R L, D) product per question, over a view of the rows (einsum would copy them).
    flat = mix.to(row_embeddings.dtype).transpose(2, 3).reshape(B, K * S, R * L)
    values = torch.bmm(flat, row_embeddings.reshape(B, R * L, -1)).unflatten(1, (K, S))  # (B, K, S, D)
    in_rows = mix.sum((2, 4))  # (B, K, S) the mass on row tokens
    out = []
    for k, (weights, end_embedding) in enumerate(readings):
        if end_embedding is None:
            out.append((values[:, k], in_rows[:, k]))
            continue
        total = weights.sum(1, keepdim=True)  # (B, 1)
        ended = total - in_rows[:, k]  # (B, S) the mass that has no row token left
        out.append((values[:, k] + ended[..., None] * end_embedding, total.expand_as(ended)))
    return out


def slot_positions(slots: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots (B, T): the answer slot each position predicts (-1: none) -> (B, S) the position that
    predicts each slot, and whether the sequence has it."""
    B, T = slots.shape
    ok = (slots >= 0) & (slots < n_slots)
    column = torch.where(ok, slots, torch.full_like(slots, n_slots))  # a spare column for the rest
    t = torch.arange(T, device=slots.device).expand(B, T)
    pos = torch.zeros(B, n_slots + 1, dtype=torch.long, device=slots.device).scatter_(1, column, t)
    has = torch.zeros(B, n_slots + 1, dtype=torch.bool, device=slots.device).scatter_(1, column, ok)
    return pos[:, :n_slots], has[:, :n_slots]


def answer_positions(slots: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """slots (B, T) -> the positions memory writes to (B, W), whether each is one, and the slot it
    predicts (B, W). Static shapes, no host sync: a sequence longer than the answer (training, a
    prompt) is gathered slot by slot (W = S); a short one (an option's continuation, a generated
    token) position by position (W = T)."""
    B, T = slots.shape
    if T <= n_slots:
        ok = (slots >= 0) & (slots < n_slots)
        return torch.arange(T, device=slots.device).expand(B, T), ok, slots.clamp(0, n_slots - 1)
    pos, has = slot_positions(slots, n_slots)
    return pos, has, torch.arange(n_slots, device=slots.device).expand(B, n_slots)


def answer_span(row_ids: torch.Tensor, input_ids: torch.Tensor, slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Where a sequence's answer stands in its own row: row_ids (B, L) the row's tokens, input_ids and
    slots (B, T) -> (B, 2) first and last token, -1 when the answer's tokens are not a run of the
    row's. The last slot a sequence has predicts its end of turn."""
    B, L = row_ids.shape
    pos, has = slot_positions(slots, n_slots)
    S = n_slots
    following = input_ids.gather(1, (pos + 1).clamp(max=input_ids.shape[1] - 1))  # (B, S) token each slot predicts
    n = (has.sum(1) - 1).clamp(min=0)  # (B,) answer tokens before the end of turn
    padded = torch.cat([row_ids, row_ids.new_full((B, S), -1)], 1)  # (B, L + S)
    windows = padded.unfold(1, S, 1)[:, :L]  # (B, L, S): the row from each start
    need = torch.arange(S, device=row_ids.device)[None, :] < n[:, None]  # (B, S)
    match = ((windows == following[:, None, :]) | ~need[:, None, :]).all(-1) & (n[:, None] > 0)  # (B, L)
    start = torch.where(match.any(1), match.float().argmax(1), torch.full_like(n, -1))
    return torch.stack([start, torch.where(start >= 0, start + n - 1, start)], 1)
