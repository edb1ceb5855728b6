"""Which rows contain a word: inverted lists over a bank's word ids.

The product-key index ranks rows by their whole lexical vectors, and its cells group rows by what
they share most, their relation's template words ("... was formed in ..."). A question worded
unlike its row shares few of those words, so its probe can land in other cells and miss the row;
it still names the row's subject, whose words are rare. `rows_for` returns the rows that contain
the most of a question's rarest words (IDF-weighted), which join the index's candidates; the exact
stage (`explicitlm.retrieval.word_overlap`) then scores every candidate on its current words.

The search is batched with fixed shapes: each question reads the lists of its `WORDS` rarest words,
`READ` entries in all (fewer where a bank's `WORDS` longest lists hold fewer): each list's first
`FLOOR`, then the rest to the lists in order of rarity, each to its end or until the budget is spent
(and up to `SIDE_PER_WORD` of each word's entries in the side table of recent edits, as many as its
longest list holds: none before the first edit). A question's rarest words are often ones statements seldom hold ("did", "hold", "tell me"), on short lists without the
asked row: they cost only their length, and the subject's words after them are read far down. Every
row read is scored by the summed weight of all the question's words it holds now (its words looked
up by their small numbers in a table of the batch's, `explicitlm.row_words`). A long list is read
only in part, its first rows by row index; scoring rows on what they hold, not on which lists
they were read from, keeps such a part from outranking the row it cut off. Then each list's `QUOTA`
best rows are kept first (each list's best, then each one's second, ...), and the rest by score: a subject's only word, on a list of one
row, must not lose that row to rows holding two or three of the question's template words ("Which
territorial unit governs Jasrota?"). Sorts, a dedup and a top-k; nothing goes to the host.

Lists are sorted by word (CSR form). An edit lists its row under its new words in a side table of
the same form, kept sorted and small, folded into the lists when it grows; a row's old entries
stay, and cost at most one candidate that scores low.

Letters: N rows, L tokens per row, P postings (word, row) pairs, B questions, Q question tokens,
W words read per question, S entries read per word.
"""

from __future__ import annotations

import torch

from explicitlm.bank import distinct_words
from explicitlm.row_words import RowWords

WORDS = 8  # a question's rarest words whose lists are read
READ = 3072  # list entries read per question, the rarest lists first
FLOOR = 128  # entries of each picked word's list read whatever the rarer lists take
QUOTA = 8  # the best rows of each picked word's list, kept whatever the other lists' rows score
# And from each word's entries listed since the last merge: edits keep a row's subject words (listed
# already), so a word gains side entries from rows added or renamed since, a few in practice.
SIDE_PER_WORD = 32


class Lists:
    """(word, row) pairs sorted by word and row: each word's rows in a contiguous, ascending slice."""

    def __init__(self, words: torch.Tensor, rows: torch.Tensor, count_most: bool = False):
        by_row = torch.argsort(rows, stable=True)
        order = by_row[torch.argsort(words[by_row], stable=True)]  # by word, then by row
        self.pair_words, self.rows = words[order], rows[order]  # (P,) each
        # The most entries any question can read: its WORDS lists are at most the WORDS longest, and
        # one list at most the longest. A small bank's reads stop there, and so do a side table's of
        # a few edits (host ints, counted when the lists are built, never per question).
        self.most = self.longest = 0
        if count_most and len(self.pair_words):
            lengths = torch.unique_consecutive(self.pair_words, return_counts=True)[1]
            top = lengths.topk(min(WORDS, len(lengths))).values
            self.most, self.longest = int(top.sum()), int(top[0])

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

    def read_prefixes(
        self, start: torch.Tensor, length: torch.Tensor, total: int, floor: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W) slices in reading order -> (B, total) rows, -1 padded, and the slice each was read
        from: each slice's first `floor` entries, then the rest of `total` given to the slices in order,
        each read to its end or until the budget is spent (a slice read in part gives its first rows
        by number)."""
        if floor * start.shape[1] > total:
            raise ValueError(f"{start.shape[1]} slices of at least {floor} entries do not fit in {total}")
        base = length.clamp(max=floor)
        spare = (total - base.sum(1, keepdim=True)).clamp(min=0)  # (B, 1)
        extra = length - base
        before = extra.cumsum(1) - extra  # the extra entries the earlier slices want
        take = base + torch.minimum(extra, (spare - before).clamp(min=0))  # (B, W), sums to at most total
        ends = take.cumsum(1)  # (B, W)
        p = torch.arange(total, device=start.device).expand(start.shape[0], -1).contiguous()  # (B, total)
        which = torch.searchsorted(ends, p, right=True)  # the slice each place reads from
        inside = which < start.shape[1]
        which = which.clamp(max=start.shape[1] - 1)
        offset = p - (ends - take).gather(1, which)
        at = (start.gather(1, which) + offset).clamp_(0, max(len(self) - 1, 0))
        rows = self.rows[at] if len(self) else torch.zeros_like(at)
        return torch.where(inside, rows, torch.full_like(rows, -1)), which


class Postings:
    MERGE_AT = 1 << 15  # entries listed since the build before the side table is folded in

    def __init__(self, words: torch.Tensor, rows: torch.Tensor, row_words: RowWords):
        """words, rows: (P,) pairs, any order; row_words: the same rows' words, numbered."""
        self.main = Lists(words, rows, count_most=True)
        self.side = Lists(words[:0], rows[:0])
        self.row_words = row_words  # what a row read is scored on
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
            return cls(empty, empty.clone(), RowWords.build(word_ids))
        return cls(torch.cat(words), torch.cat(rows), RowWords.build(word_ids, chunk))

    def to(self, device: torch.device | str) -> Postings:
        self.main.to(device)
        self.side.to(device)
        self.row_words.to(device)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "main.words": self.main.pair_words,
            "main.rows": self.main.rows,
            "side.words": self.side.pair_words,
            "side.rows": self.side.rows,
            **{f"row_words.{k}": v for k, v in self.row_words.tensors().items()},
        }

    def add(self, row: int, words: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Row `row` now contains `words` (L,) instead of `old` (None: a new row): list it under each
        word it did not contain before, so edits that keep a row's subject do not lengthen its list."""
        srt, first = distinct_words(words)
        new = srt[first]
        if old is not None:
            new = new[~torch.isin(new, old.to(new.device))]
        new = new[[not self.lists(int(w), row) for w in new]]  # a word that came back is listed already
        self.row_words.set(row, words)
        self.n_rows = max(self.n_rows, row + 1)
        side = self.side
        self.side = Lists(
            torch.cat([side.pair_words, new]), torch.cat([side.rows, torch.full_like(new, row)]), count_most=True
        )
        if len(self.side) >= self.MERGE_AT:
            self.main = Lists(
                torch.cat([self.main.pair_words, self.side.pair_words]),
                torch.cat([self.main.rows, self.side.rows]),
                count_most=True,
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
    def rows_for(
        self,
        question: torch.Tensor,
        budget: int,
        exclude: torch.Tensor,
    ) -> torch.Tensor:
        """question (B, Q) word ids (NO_WORD off words); exclude (B, C) rows already candidates, -1
        padded -> (B, budget) rows, -1 padded: from the lists of the question's WORDS rarest words
        (READ entries in all, or all its lists hold; at least FLOOR of each list; and up to SIDE_PER_WORD of
        each's entries listed since the last merge), each list's QUOTA best first, then the best by
        the summed weight of all the question's words each contains. A word weighs
        log((N + 1) / (df + 1)) + 1, N the rows listed, so a row naming a subject's two words and the
        relation's outranks one naming only the subject's rarer word. Every row is scored on what it
        holds, not on which lists it was read from: a long list is read
        only in part (its first rows by number), and that part must not outweigh a row it cut off."""
        B = question.shape[0]
        if self.n_rows == 0:  # an empty bank
            return question.new_full((B, budget), -1)
        srt, once = distinct_words(question)  # (B, Q)
        start, length = self.main.lengths(srt)
        side_start, side_length = self.side.lengths(srt)
        length, side_length = length * once, side_length * once  # a repeated word's list is read once
        df = length + side_length  # (B, Q)
        weight = (torch.log((self.n_rows + 1.0) / (df.float() + 1.0)) + 1.0) * (df > 0)  # (B, Q)
        # The rarest listed words first; words not listed (or repeated) last.
        key = torch.where(df > 0, df, torch.full_like(df, torch.iinfo(df.dtype).max))
        pick = key.sort(dim=1, stable=True).indices[:, :WORDS]  # (B, W): ties go to the smaller word id
        total = max(min(READ, self.main.most), 1)  # every question's lists fit whole below READ
        floor = min(FLOOR, total // pick.shape[1])
        main_rows, main_list = self.main.read_prefixes(start.gather(1, pick), length.gather(1, pick), total, floor)
        # Each picked word's side entries, SIDE_PER_WORD at most; fewer when no side list is that long
        # (none at all before the first edit): the same rows, fewer places to score.
        per_side = min(SIDE_PER_WORD, self.side.longest)
        side_rows = self.side.read(side_start.gather(1, pick), side_length.gather(1, pick), per_side)
        side_list = torch.arange(pick.shape[1], device=pick.device)[None, :, None].expand_as(side_rows)
        rows = torch.cat([main_rows, side_rows.flatten(1)], 1)  # (B, M)
        lists = torch.cat([main_list, side_list.flatten(1)], 1)  # (B, M) the picked word each was read for
        # Score: the question's words each row contains, each once, by weight.
        M = rows.shape[1]
        score = self.row_words.scores(rows.clamp(min=0), srt, weight)  # (B, M)
        excluded = exclude.sort(1).values  # (B, C)
        at = torch.searchsorted(excluded, rows).clamp_(max=max(excluded.shape[1] - 1, 0))
        taken = excluded.gather(1, at) == rows if excluded.shape[1] else torch.zeros_like(rows, dtype=torch.bool)
        score = score.masked_fill(taken | (rows < 0), 0.0)
        # Each list's QUOTA best rows are kept whatever the others score, its best first, then each
        # list's second, and so on: a subject's only word, on a list of one row, must not lose its
        # row to rows holding two of the question's template words.
        # One sort: by list, then score (the best first), then place; a list's part of the key outweighs
        # any score, which is at most the question's summed weight.
        span = 1.0 + weight.sum(1, keepdim=True).double()
        order = (lists * span - score.double()).sort(dim=1, stable=True).indices
        per_list = torch.zeros_like(pick).scatter_add_(1, lists, torch.ones_like(lists))  # (B, W)
        starts = per_list.cumsum(1) - per_list  # where each list begins in that order
        rank = torch.arange(M, device=rows.device) - starts.gather(1, lists.gather(1, order))
        rank = torch.empty_like(rank).scatter_(1, order, rank.clamp(max=QUOTA))  # (B, M) in each list
        rank = rank.masked_fill(score <= 0, QUOTA)  # QUOTA: not kept
        # Each row once, at its best rank: sort, keep the first of each run.
        at = (rows * (QUOTA + 1) + rank).sort(1).indices
        rows, score, rank = rows.gather(1, at), score.gather(1, at), rank.gather(1, at)
        again = torch.zeros_like(rows, dtype=torch.bool)
        again[:, 1:] = rows[:, 1:] == rows[:, :-1]
        score = score.masked_fill(again, 0.0)
        priority = score + (QUOTA - rank) * (score > 0) * (1.0 + weight.sum(1, keepdim=True))
        top = priority.topk(min(budget, score.shape[1]), dim=1)
        best = torch.where(top.values > 0, rows.gather(1, top.indices), torch.full_like(top.indices, -1))
        if best.shape[1] < budget:
            best = torch.cat([best, best.new_full((B, budget - best.shape[1]), -1)], 1)
        return best
