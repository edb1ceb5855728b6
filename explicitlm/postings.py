"""Which rows contain a word: inverted lists over a bank's word ids.

The product-key index ranks rows by their whole lexical vectors, and its cells group rows by what
they share most, their relation's template words ("... was formed in ..."). A question worded
unlike its row shares few of those words, so its probe can land in other cells and miss the row;
it still names the row's subject, whose words are rare. `rows_for` returns the rows that contain a
question's rarest words, which join the index's candidates; the exact stage
(`explicitlm.retrieval.word_overlap`) then scores every candidate on its current words.

Lists are sorted by word (CSR form). Edits append a row's new words to a side list, merged in when
it grows; a row's old entries stay, and cost at most one candidate that scores low.

Letters: N rows, L tokens per row, P postings (word, row) pairs, B questions, T question tokens.
"""

from __future__ import annotations

import torch

from explicitlm.bank import distinct_words


class Postings:
    MERGE_AT = 1 << 16

    def __init__(self, words: torch.Tensor, rows: torch.Tensor):
        """words, rows: (P,) pairs, any order."""
        order = torch.argsort(words, stable=True)  # stable: a word's rows stay in row order
        words, self.rows = words[order], rows[order]
        self.words, counts = torch.unique_consecutive(words, return_counts=True)  # (U,) sorted
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts
        self.extra_words = words.new_zeros(0)  # (E,) appended pairs, merged at MERGE_AT
        self.extra_rows = rows.new_zeros(0)

    @classmethod
    def build(cls, word_ids: torch.Tensor, chunk: int = 1 << 16) -> Postings:
        """(N, L) word ids -> each row listed once under each distinct word it contains."""
        words, rows = [], []
        for start in range(0, word_ids.shape[0], chunk):  # bounded memory at a million rows
            srt, first = distinct_words(word_ids[start : start + chunk])
            r = torch.arange(start, start + srt.shape[0], device=srt.device)[:, None].expand_as(srt)
            words.append(srt[first])
            rows.append(r[first])
        if not words:
            empty = word_ids.new_zeros(0).flatten()
            return cls(empty, empty.clone())
        return cls(torch.cat(words), torch.cat(rows))

    def to(self, device: torch.device | str) -> Postings:
        for name in ("words", "rows", "starts", "counts", "extra_words", "extra_rows"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def add(self, row: int, words: torch.Tensor) -> None:
        """Row `row` now contains `words` (L,): list it under each (an edit or a new row)."""
        srt, first = distinct_words(words.to(self.words.device))
        new = srt[first]
        self.extra_words = torch.cat([self.extra_words, new])
        self.extra_rows = torch.cat([self.extra_rows, torch.full_like(new, row)])
        if len(self.extra_words) >= self.MERGE_AT:
            main_words = torch.repeat_interleave(self.words, self.counts)
            merged = Postings(torch.cat([main_words, self.extra_words]), torch.cat([self.rows, self.extra_rows]))
            for name, value in merged.tensors().items():
                setattr(self, name, value)

    def _lists(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct word ids q (Q,) -> position in the sorted table, rows listed there, and rows
        in the side list: (Q,), (Q,), (Q, E) bool."""
        if len(self.words):
            pos = torch.searchsorted(self.words, q).clamp_(max=len(self.words) - 1)
            main = torch.where(self.words[pos] == q, self.counts[pos], torch.zeros_like(q))
        else:
            pos, main = torch.zeros_like(q), torch.zeros_like(q)
        side = q[:, None] == self.extra_words[None, :]
        return pos, main, side

    @torch.no_grad()
    def rows_for(self, question: torch.Tensor, budget: int, exclude: torch.Tensor) -> torch.Tensor:
        """question (B, T) word ids (NO_WORD off words); exclude (B, C) rows already candidates ->
        (B, budget) rows, -1 padded: the rows listed under the question's rarest words, whole lists
        taken rarest first while their total length stays within budget."""
        srt, first = distinct_words(question)
        out = torch.full((question.shape[0], budget), -1, dtype=torch.long, device=question.device)
        for b in range(question.shape[0]):
            q = srt[b][first[b]]
            pos, main, side = self._lists(q)
            df = main + side.sum(1)
            order = torch.argsort(df, stable=True)
            take = order[(df[order] > 0) & (torch.cumsum(df[order], 0) <= budget)]
            if not len(take):
                continue
            found = self.extra_rows[side[take].any(0)]
            lens = main[take]
            if len(self.words):
                flat = torch.arange(int(lens.sum()), device=q.device)
                offset = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
                found = torch.cat(
                    [found, self.rows[flat - offset + torch.repeat_interleave(self.starts[pos[take]], lens)]]
                )
            found = torch.unique(found)
            found = found[~torch.isin(found, exclude[b])][:budget]
            out[b, : len(found)] = found
        return out
