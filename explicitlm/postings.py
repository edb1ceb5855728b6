"""Which rows contain a word: inverted lists over a bank's word ids.

The product-key index ranks rows by their whole lexical vectors, and its cells group rows by what
they share most, their relation's template words ("... was formed in ..."). A question worded
unlike its row shares few of those words, so its probe can land in other cells and miss the row;
it still names the row's subject, whose words are rare. `rows_for` returns the rows that contain
the most of a question's rarest words (IDF-weighted), which join the index's candidates; the exact
stage (`explicitlm.retrieval.word_overlap`) then scores every candidate on its current words.

The search is batched with fixed shapes: each question reads the lists of its `WORDS` rarest words,
up to `PER_WORD` entries of each, and a row's score sums the weights of the lists it is on (a sort
and a segment sum). Nothing about a question's lists goes to the host.

Lists are sorted by word (CSR form). An edit lists its row under its new words in a side table of
the same form, kept sorted and small, folded into the lists when it grows; a row's old entries
stay, and cost at most one candidate that scores low.

Letters: N rows, L tokens per row, P postings (word, row) pairs, B questions, Q question tokens,
W words read per question, S entries read per word.
"""

from __future__ import annotations

import torch

from explicitlm.bank import distinct_words

WORDS = 4  # a question's rarest words whose lists are read
PER_WORD = 256  # entries read from each list (a subject's words have short lists)


class Lists:
    """(word, row) pairs sorted by word and row: each word's rows in a contiguous, ascending slice."""

    def __init__(self, words: torch.Tensor, rows: torch.Tensor):
        by_row = torch.argsort(rows, stable=True)
        order = by_row[torch.argsort(words[by_row], stable=True)]  # by word, then by row
        self.pair_words, self.rows = words[order], rows[order]  # (P,) each

    def to(self, device: torch.device | str) -> Lists:
        self.pair_words, self.rows = self.pair_words.to(device), self.rows.to(device)
        return self

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (any shape) -> where each word's slice starts, and its length (0: unlisted)."""
        start = torch.searchsorted(self.pair_words, q)
        end = torch.searchsorted(self.pair_words, q, right=True)
        return start, end - start

    def read(self, start: torch.Tensor, length: torch.Tensor, per_word: int) -> torch.Tensor:
        """(B, W) slices -> (B, W, S) their first per_word rows, -1 beyond each slice."""
        j = torch.arange(per_word, device=start.device)
        at = (start[..., None] + j).clamp_(max=max(len(self) - 1, 0))
        rows = self.rows[at] if len(self) else torch.zeros_like(at)
        return torch.where(j < length[..., None], rows, torch.full_like(rows, -1))


class Postings:
    MERGE_AT = 1 << 15  # entries listed since the build before the side table is folded in

    def __init__(self, words: torch.Tensor, rows: torch.Tensor):
        """words, rows: (P,) pairs, any order."""
        self.main = Lists(words, rows)
        self.side = Lists(words[:0], rows[:0])
        self.n_rows = int(rows.max()) + 1 if len(rows) else 0  # rows listed (the weights' N)

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
        self.main.to(device)
        self.side.to(device)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "main.words": self.main.pair_words,
            "main.rows": self.main.rows,
            "side.words": self.side.pair_words,
            "side.rows": self.side.rows,
        }

    def add(self, row: int, words: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Row `row` now contains `words` (L,) instead of `old` (None: a new row): list it under each
        word it did not contain before, so edits that keep a row's subject do not lengthen its list."""
        srt, first = distinct_words(words)
        new = srt[first]
        if old is not None:
            new = new[~torch.isin(new, old.to(new.device))]
        new = new[[not self.lists(int(w), row) for w in new]]  # a word that came back is listed already
        self.n_rows = max(self.n_rows, row + 1)
        side = self.side
        self.side = Lists(torch.cat([side.pair_words, new]), torch.cat([side.rows, torch.full_like(new, row)]))
        if len(self.side) >= self.MERGE_AT:
            self.main = Lists(
                torch.cat([self.main.pair_words, self.side.pair_words]), torch.cat([self.main.rows, self.side.rows])
            )
            self.side = Lists(new[:0], new[:0])

    def lists(self, word: int, row: int) -> bool:
        """Whether `row` is on `word`'s list (in the lists or the side table)."""
        for lists in (self.main, self.side):
            start, length = (int(x) for x in lists.lengths(torch.tensor(word, device=lists.rows.device)))
            rows = lists.rows[start : start + length]  # ascending
            at = int(torch.searchsorted(rows, torch.tensor(row, device=rows.device))) if length else 0
            if at < length and int(rows[at]) == row:
                return True
        return False

    @torch.no_grad()
    def rows_for(self, question: torch.Tensor, budget: int, exclude: torch.Tensor) -> torch.Tensor:
        """question (B, Q) word ids (NO_WORD off words); exclude (B, C) rows already candidates, -1
        padded -> (B, budget) rows, -1 padded: the best by the summed weight of the question's words
        they contain, over the lists of its WORDS rarest words (PER_WORD entries of each). A word
        weighs log((N + 1) / (df + 1)) + 1, N the rows listed, so a row naming two of a subject's
        words outranks rows naming one."""
        B = question.shape[0]
        srt, first = distinct_words(question)  # (B, Q)
        start, length = self.main.lengths(srt)
        side_start, side_length = self.side.lengths(srt)
        df = (length + side_length) * first  # (B, Q)
        # The rarest listed words first; words not listed (or repeated) last.
        key = torch.where(df > 0, df, torch.full_like(df, torch.iinfo(df.dtype).max))
        pick = key.sort(dim=1, stable=True).indices[:, :WORDS]  # (B, W): ties go to the smaller word id
        df_w = df.gather(1, pick)
        weight = (torch.log((self.n_rows + 1.0) / (df_w.float() + 1.0)) + 1.0) * (df_w > 0)  # (B, W)
        rows = torch.cat(
            [
                self.main.read(start.gather(1, pick), length.gather(1, pick), PER_WORD),
                self.side.read(side_start.gather(1, pick), side_length.gather(1, pick), PER_WORD),
            ],
            -1,
        ).reshape(B, -1)  # (B, W 2S)
        weights = weight[..., None].expand(-1, -1, 2 * PER_WORD).reshape(B, -1)
        # Sum each row's weights: sort the rows, and add up each run of one row.
        rows, order = rows.sort(1)
        weights = weights.gather(1, order) * (rows >= 0)
        run_start = torch.ones_like(rows, dtype=torch.bool)
        run_start[:, 1:] = rows[:, 1:] != rows[:, :-1]
        run = torch.cumsum(run_start, 1) - 1  # (B, M) each entry's run
        score = torch.zeros_like(weights).scatter_add_(1, run, weights)  # (B, M) by run
        row_of_run = torch.full_like(rows, -1).scatter_(1, run, rows)
        excluded = exclude.sort(1).values  # (B, C)
        at = torch.searchsorted(excluded, row_of_run).clamp_(max=max(excluded.shape[1] - 1, 0))
        taken = excluded.gather(1, at) == row_of_run if excluded.shape[1] else torch.zeros_like(rows, dtype=torch.bool)
        score = score.masked_fill(taken | (row_of_run < 0), 0.0)
        top = score.topk(min(budget, score.shape[1]), dim=1)
        best = torch.where(top.values > 0, row_of_run.gather(1, top.indices), torch.full_like(top.indices, -1))
        if best.shape[1] < budget:
            best = torch.cat([best, best.new_full((B, budget - best.shape[1]), -1)], 1)
        return best
