"""Which rows contain a word: inverted lists over a bank's word ids.

The product-key index ranks rows by their whole lexical vectors, and its cells group rows by what
they share most, their relation's template words ("... was formed in ..."). A question worded
unlike its row shares few of those words, so its probe can land in other cells and miss the row;
it still names the row's subject, whose words are rare. `rows_for` returns the rows that contain a
question's rarest words, which join the index's candidates; the exact stage
(`explicitlm.retrieval.word_overlap`) then scores every candidate on its current words.

Lists are sorted by word (CSR form). An edit lists its row under its new words in a side table (a
dict: a few appends per edit, one lookup per question word), folded into the lists when it grows;
a row's old entries stay, and cost at most one candidate that scores low.

Letters: N rows, L tokens per row, P postings (word, row) pairs, B questions, T question tokens.
"""

from __future__ import annotations

import torch

from explicitlm.bank import distinct_words


class Postings:
    MERGE_AT = 1 << 20  # entries listed since the build before the lists are rebuilt

    def __init__(self, words: torch.Tensor, rows: torch.Tensor):
        """words, rows: (P,) pairs, any order."""
        order = torch.argsort(words, stable=True)  # stable: a word's rows stay in row order
        words, self.rows = words[order], rows[order]
        self.words, counts = torch.unique_consecutive(words, return_counts=True)  # (U,) sorted
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts
        # Rows listed since the build, by word: an edit costs a few dict appends, a lookup one get.
        self.extra: dict[int, set[int]] = {}
        self.n_extra = 0

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
        for name in ("words", "rows", "starts", "counts"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def add(self, row: int, words: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Row `row` now contains `words` (L,) instead of `old` (None: a new row): list it under each
        word it did not contain before, so edits that keep a row's subject do not lengthen its list."""
        srt, first = distinct_words(words)
        new = srt[first]
        if old is not None:
            new = new[~torch.isin(new, old.to(new.device))]
        added = 0
        for w in new.tolist():
            rows = self.extra.setdefault(w, set())
            added += row not in rows
            rows.add(row)
        self.n_extra += added
        if self.n_extra >= self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        """Fold the entries listed since the build into the sorted lists (O(P log P))."""
        device = self.words.device
        side_words = [w for w, rows in self.extra.items() for _ in rows]
        side_rows = [r for rows in self.extra.values() for r in rows]
        merged = Postings(
            torch.cat([torch.repeat_interleave(self.words, self.counts), torch.tensor(side_words, device=device)]),
            torch.cat([self.rows, torch.tensor(side_rows, dtype=self.rows.dtype, device=device)]),
        )
        self.words, self.rows, self.starts, self.counts = merged.words, merged.rows, merged.starts, merged.counts
        self.extra, self.n_extra = {}, 0

    def _lists(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[set[int]]]:
        """Distinct word ids q (Q,) -> position in the sorted lists, rows listed there, and each
        word's rows listed since the build."""
        if len(self.words):
            pos = torch.searchsorted(self.words, q).clamp_(max=len(self.words) - 1)
            main = torch.where(self.words[pos] == q, self.counts[pos], torch.zeros_like(q))
        else:
            pos, main = torch.zeros_like(q), torch.zeros_like(q)
        side = [self.extra.get(w, set()) for w in q.tolist()] if self.extra else [set() for _ in range(len(q))]
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
            df = main + torch.tensor([len(x) for x in side], dtype=main.dtype, device=main.device)
            order = torch.argsort(df, stable=True)
            take = order[(df[order] > 0) & (torch.cumsum(df[order], 0) <= budget)]
            if not len(take):
                continue
            found = torch.tensor([r for i in take.tolist() for r in side[i]], dtype=torch.long, device=q.device)
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
