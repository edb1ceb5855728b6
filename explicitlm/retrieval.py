"""What every layer shares when it reads memory: the question's candidate rows, how well each row
and the question share their words, and what a retrieved row adds to the question.

1. Candidates: the question's lexical vector (its distinct words, IDF-weighted, `explicitlm.index`)
   finds about a hundred rows through the product-key index.
2. Overlap, computed exactly from word ids with the bank's current IDF:
   - the TF-IDF cosine of question and row;
   - the row's coverage: the share of the row's words, apart from the answer options' words, that
     the question names, weighted by IDF to the power `match_power`. A question names its subject,
     whatever its wording; the row about that subject is then explained by the question except for
     its answer, while a row about another subject keeps a rare word the question lacks. Coverage
     ranks candidates (with the cosine) and decides whether a layer reads memory at all.
3. Values: the IDF-weighted mean embedding of a retrieved row's tokens whose words the question does
   not already say (`values_from=novel`), i.e. mostly the answer; or of all its words (`row`).

Letters: B questions, T tokens, C candidate rows, k retrieved rows, L tokens per row, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from explicitlm.bank import MemoryBank, distinct_words
from explicitlm.index import ProductKeyIndex, first_in_row, lexical_vectors, take
from explicitlm.words import NO_WORD


@dataclass
class Candidates:
    rows: torch.Tensor  # (B, C) bank rows
    selectable: torch.Tensor  # (B, C) rows the top-k may take (not padding, not the appended gold)
    lexical: torch.Tensor  # (B, C) cosine + coverage_weight * coverage
    cover: torch.Tensor  # (B, C) the row's coverage by the question, 0 to 1
    gold: torch.Tensor | None  # (B,) column of each question's own row, -1 when unknown


def contains(sorted_words: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Membership: sorted_words (B, T) sorted per row, ids (B, ...) -> bool (B, ...)."""
    flat = ids.reshape(ids.shape[0], -1)
    pos = torch.searchsorted(sorted_words, flat).clamp_(max=sorted_words.shape[1] - 1)
    return (sorted_words.gather(1, pos) == flat).reshape(ids.shape) & (ids != NO_WORD)


def find_candidates(
    bank: MemoryBank,
    index: ProductKeyIndex,
    question: torch.Tensor,
    options: torch.Tensor,
    n: int,
    top_cells: int,
    probe_cells: int,
    scan_rows: int,
    match_power: float,
    coverage_weight: float,
    seed: int,
    target_rows: torch.Tensor | None = None,
) -> Candidates:
    """question, options (B, T) word ids of the question's and the options' tokens (NO_WORD
    elsewhere); target_rows (B,) each question's own row (-1 unknown), in training: it is appended
    as a column the loss sees and the top-k cannot take."""
    q = lexical_vectors(question, bank.counts, index.keys.shape[1], seed, known_only=True)  # (B, K)
    rows, selectable = index.candidates(q, n, top_cells, probe_cells, scan_rows)  # (B, C)
    gold = None
    if target_rows is not None:
        found = (rows == target_rows[:, None]) & selectable  # (B, C)
        gold = torch.where(found.any(1), found.float().argmax(1), torch.full_like(target_rows, rows.shape[1]))
        gold = torch.where(target_rows >= 0, gold, torch.full_like(gold, -1))
        rows = torch.cat([rows, target_rows.clamp(min=0)[:, None]], 1)
        selectable = torch.cat([selectable, torch.zeros_like(selectable[:, :1])], 1)
    qs, _ = distinct_words(question)
    os_, _ = distinct_words(options)
    lexical, cover = word_overlap(bank, rows, qs, os_, match_power, coverage_weight)
    return Candidates(rows, selectable, lexical, cover, gold)


def word_overlap(
    bank: MemoryBank, rows: torch.Tensor, question: torch.Tensor, options: torch.Tensor, power: float, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (B, C); question, options (B, T) word ids sorted per row -> lexical score and coverage (B, C)."""
    words = take(bank.word_ids, rows)  # (B, C, L)
    first = first_in_row(words)  # each distinct word once
    idf = bank.counts.idf(words)  # (B, C, L)
    in_q = contains(question, words) & first
    in_o = contains(options, words)
    w2 = idf.square() * first
    q_first = torch.ones_like(question, dtype=torch.bool)
    q_first[:, 1:] = question[:, 1:] != question[:, :-1]
    q_known = q_first & (question != NO_WORD) & (bank.counts.df_of(question) > 0)
    q_norm = (bank.counts.idf(question).square() * q_known).sum(1).sqrt()  # (B,)
    cosine = (w2 * in_q).sum(-1) / (w2.sum(-1).sqrt() * q_norm[:, None]).clamp(min=1e-6)  # (B, C)
    rest = first & ~in_o  # the row's words apart from the options'
    wp = idf.pow(power) * rest
    cover = (wp * in_q).sum(-1) / wp.sum(-1).clamp(min=1e-6)
    return cosine + weight * cover, cover


def memory_values(
    bank: MemoryBank,
    embeddings: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    question: torch.Tensor,
    novel_only: bool,
) -> torch.Tensor:
    """rows, weights (B, k); question (B, T) word ids sorted per row -> (B, D) what the rows add.

    Each row is the IDF-weighted mean embedding of its tokens' words; with novel_only, of the words
    the question does not already say (the subject and the relation are in the prompt anyway), unless
    the row has no other word.
    """
    B, k = rows.shape
    ids, mask, words = (take(t, rows) for t in (bank.token_ids, bank.mask, bank.word_ids))  # (B, k, L) each
    keep = mask & (words != NO_WORD)
    if novel_only:
        novel = keep & ~contains(question, words)
        keep = torch.where(novel.any(-1, keepdim=True), novel, keep)
    w = bank.counts.idf(words) * keep
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-6)
    vec = F.embedding_bag(
        ids.reshape(B * k, -1), embeddings, per_sample_weights=w.reshape(B * k, -1).to(embeddings.dtype), mode="sum"
    ).reshape(B, k, -1)
    return (weights.unsqueeze(-1).to(vec.dtype) * vec).sum(1)
