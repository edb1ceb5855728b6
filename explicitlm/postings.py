"""Which rows contain a word: inverted lists over a bank's word ids.

The product-key index ranks rows by their whole lexical vectors, and its cells group rows by what
they share most, their relation's template words ("... was formed in ..."). A question worded
unlike its row shares few of those words, so its probe can land in other cells and miss the row;
it still names the row's subject, whose words are rare. `rows_for` returns the rows that contain
the most of a question's rarest words (IDF-weighted), which join the index's candidates; the exact stage
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
    SCAN = 64  # list entries read per row returned

    def __init__(self, words: torch.Tensor, rows: torch.Tensor):
        """words, rows: (P,) pairs, any order."""
        order = torch.argsort(words, stable=True)  # stable: a word's rows stay in row order
        words, self.rows = words[order], rows[order]
        self.words, counts = torch.unique_consecutive(words, return_counts=True)  # (U,) sorted
        self.starts = torch.cumsum(counts, 0) - counts
        self.n_rows = int(rows.max()) + 1 if len(rows) else 0  # rows listed (the weights' N)
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
        self.n_rows = max(self.n_rows, row + 1)
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
        self.n_rows = max(self.n_rows, merged.n_rows)
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
        (B, budget) rows, -1 padded: the best `budget` rows by the summed weight of the question's
        words they contain, over the lists of its rarest words (whole lists, rarest first, up to
        SCAN x budget entries). A word weighs log((N + 1) / (df + 1)) + 1, N the rows listed, so a
        row naming two of a subject's words outranks rows naming one."""
        srt, first = distinct_words(question)
        out = torch.full((question.shape[0], budget), -1, dtype=torch.long, device=question.device)
        n_rows = float(self.n_rows)
        for b in range(question.shape[0]):
            q = srt[b][first[b]]
            pos, main, side = self._lists(q)
            df = main + torch.tensor([len(x) for x in side], dtype=main.dtype, device=main.device)
            order = torch.argsort(df, stable=True)
            take = order[(df[order] > 0) & (torch.cumsum(df[order], 0) <= self.SCAN * budget)]
            if not len(take):
                continue
            weight = torch.log((n_rows + 1.0) / (df[take].float() + 1.0)) + 1.0  # (W,)
            side_rows = [(r, i) for i, t in enumerate(take.tolist()) for r in side[t]]
            found = torch.tensor([r for r, _ in side_rows], dtype=torch.long, device=q.device)
            found_w = weight[torch.tensor([i for _, i in side_rows], dtype=torch.long, device=q.device)]
            lens = main[take]
            if len(self.words):
                flat = torch.arange(int(lens.sum()), device=q.device)
                offset = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
                listed = self.rows[flat - offset + torch.repeat_interleave(self.starts[pos[take]], lens)]
                found = torch.cat([found, listed])
                found_w = torch.cat([found_w, torch.repeat_interleave(weight, lens)])
            rows, inverse = torch.unique(found, return_inverse=True)
            score = torch.zeros(len(rows), device=q.device).scatter_add_(0, inverse, found_w)
            score[torch.isin(rows, exclude[b])] = -1.0  # already candidates
            best = score.topk(min(budget, len(rows))).indices
            best = best[score[best] > 0]
            out[b, : len(best)] = rows[best]
        return out
