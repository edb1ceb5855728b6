"""Each row's words as small numbers: scoring the rows a batch of questions reads costs two table
lookups per row word instead of a search among the question's words.

Word ids are 64-bit hashes (`explicitlm.words`). Every word the bank has held gets a number (1, 2, ...;
0 is no word), and each row keeps, at each distinct word's first token, that word's number (0 on the
rest, as `MemoryBank.first`); each number's document frequency (rows holding the word) is kept too.
For a batch of questions, `scores` gives every distinct question word of the batch a column, through
a table over the numbers, and fills a (B, columns) table with what each question gives each column;
a row word is then a lookup in each table. Exact (sums run over a row's tokens in order, as a
search's would), static shapes, nothing goes to the host.

Numbers are never reused or moved: an edit's new words take the next ones, looked up in a short
sorted side table, so that no edit renumbers the bank.

Letters: N rows, L tokens per row, V words numbered, B questions, Q question tokens, M rows scored,
K weights per question word.
"""

from __future__ import annotations

import torch

from explicitlm.bank import first_in_row, smoothed_idf
from explicitlm.index import take

INT32_PLACES = 1 << 31  # a batch's weight table with fewer places is indexed with int32 (half the bytes)
PASS = 1 << 20  # row words looked up a pass: a large batch's lookups stay in cache


class RowWords:
    def __init__(self, vocab: torch.Tensor, numbers: torch.Tensor):
        """vocab (V,) sorted word ids, numbered 1..V in that order; numbers (N, L) int32 per row."""
        self.vocab = vocab
        self.extra = vocab[:0]  # (E,) words numbered since, sorted
        self.extra_numbers = vocab[:0]  # (E,) their numbers, V + 1 ...
        self._numbers = numbers  # (capacity, L): rows grow by doubling
        self.n_rows = numbers.shape[0]
        self.df = torch.bincount(numbers.flatten().long(), minlength=len(vocab) + 1)  # (V + 1,); [0] unused

    @classmethod
    def build(cls, word_ids: torch.Tensor, chunk: int = 1 << 16) -> RowWords:
        """(N, L) word ids -> every distinct word numbered, and each row's numbers."""
        parts = [word_ids[s : s + chunk] for s in range(0, word_ids.shape[0], chunk)]
        firsts = [first_in_row(part) for part in parts]
        vocab = torch.unique(torch.cat([p[f] for p, f in zip(parts, firsts)])) if parts else word_ids.new_zeros(0)
        numbers = [cls._number_in(vocab, p) * f for p, f in zip(parts, firsts)]
        return cls(vocab, (torch.cat(numbers) if numbers else word_ids).to(torch.int32))

    @staticmethod
    def _number_in(table: torch.Tensor, ids: torch.Tensor, numbers: torch.Tensor | None = None) -> torch.Tensor:
        """ids (any shape) -> their numbers in a sorted table (its place + 1, or `numbers`), 0 where absent."""
        if len(table) == 0:
            return torch.zeros_like(ids)
        at = torch.searchsorted(table, ids.contiguous()).clamp_(max=len(table) - 1)
        found = table[at] == ids
        return torch.where(found, at + 1 if numbers is None else numbers[at], torch.zeros_like(ids))

    @property
    def size(self) -> int:
        """The highest number given."""
        return len(self.vocab) + len(self.extra)

    @property
    def numbers(self) -> torch.Tensor:  # (N, L) int32
        return self._numbers[: self.n_rows]

    def number(self, ids: torch.Tensor) -> torch.Tensor:
        """Word ids (any shape) -> their numbers, 0 for a word never numbered (and NO_WORD)."""
        return self._number_in(self.vocab, ids) + self._number_in(self.extra, ids, self.extra_numbers)

    def idf(self, numbers: torch.Tensor) -> torch.Tensor:
        """Numbers (any shape) -> their words' IDF (`explicitlm.bank.smoothed_idf`), as the bank's counts give."""
        return smoothed_idf(self.df.index_select(0, numbers.reshape(-1)).view(numbers.shape), self.n_rows)

    def to(self, device: torch.device | str) -> RowWords:
        for name in ("vocab", "extra", "extra_numbers", "_numbers", "df"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("vocab", "extra", "extra_numbers", "numbers", "df")
        return {name: getattr(self, name) for name in names}

    def set(self, row: int, words: torch.Tensor) -> None:
        """Row `row` (one past the last: a new row) now holds `words` (L,); its new words are numbered."""
        words = words.to(self.vocab.device)
        first = first_in_row(words)
        new = words[first][self.number(words[first]) == 0]
        if len(new):
            extra = torch.cat([self.extra, new])
            numbers = torch.cat([self.extra_numbers, torch.arange(len(new), device=new.device) + self.size + 1])
            order = extra.argsort()
            self.extra, self.extra_numbers = extra[order], numbers[order]
            self.df = torch.cat([self.df, self.df.new_zeros(len(new))])
        if row >= self._numbers.shape[0]:
            grow = max(row + 1, 2 * self._numbers.shape[0], 16) - self._numbers.shape[0]
            self._numbers = torch.cat([self._numbers, self._numbers.new_zeros(grow, self._numbers.shape[1])])
        old = self._numbers[row].long()  # zeros for a new row
        now = self.number(words) * first
        self.df.index_add_(0, old, -torch.ones_like(old)).index_add_(0, now, torch.ones_like(now))
        self.df[0] = 0
        self._numbers[row] = now.to(torch.int32)
        self.n_rows = max(self.n_rows, row + 1)

    def scores(self, rows: torch.Tensor, question: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows (B, M) bank rows (>= 0); question (B, Q) word ids; weight (B, Q) or (B, Q, K) what each
        question word gives a row that holds it (0: nothing; give a word repeated in a question once)
        -> (B, M) or (B, M, K): the summed weight of each row's words."""
        B, Q = question.shape
        one = weight.dim() == 2
        weight = weight.reshape(B, Q, -1)  # (B, Q, K)
        number = self.number(question) * (weight != 0).any(-1)  # (B, Q), 0: not scored
        batch = number.flatten().sort().values
        # Each distinct number of the batch a column (1 + its first place in `batch`); 0 for the rest.
        column = torch.zeros(self.size + 1, dtype=torch.int32, device=rows.device)
        column[batch] = (torch.searchsorted(batch, batch) + 1).to(torch.int32)
        column[0] = 0
        width = B * Q + 1
        table = torch.zeros(B, width, weight.shape[-1], dtype=weight.dtype, device=rows.device)
        at = column[number].long()[..., None].expand_as(weight)
        table.scatter_add_(1, at, weight * (number > 0)[..., None])  # column 0 gets nothing
        K = weight.shape[-1]
        flat = table.view(-1) if K == 1 else table.view(B * width, K)  # a 1-D table looks up faster
        step = max(1, PASS // max(rows[0].numel() * self.numbers.shape[1], 1))  # questions a pass
        out = []
        for s in range(0, B, step):
            part = rows[s : s + step]
            at = column.index_select(0, take(self.numbers, part).view(-1)).view(part.shape[0], -1)  # (b, M L)
            offset = torch.arange(s, s + part.shape[0], device=rows.device) * width  # each question's table row
            at = at + offset[:, None].to(at.dtype) if B * width < INT32_PLACES else at.long() + offset[:, None]
            got = flat.index_select(0, at.view(-1)).view(*part.shape, -1, K)  # (b, M, L, K)
            out.append(got.transpose(-1, -2).contiguous().sum(-1))  # over each row's tokens in order
        got = torch.cat(out)  # (B, M, K)
        return got.squeeze(-1) if one else got
