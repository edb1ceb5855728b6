"""Each row's words as small numbers: scoring the rows a batch of questions reads costs two table
lookups per row word instead of a search among the question's words.

Word ids are 64-bit hashes (`explicitlm.words`). Every word the bank has held gets a number (1, 2, ...;
0 is no word), and each row keeps, at each distinct word's first token, that word's number (0 on the
rest, as `MemoryBank.first`); each number's document frequency (rows holding the word) is kept too.
For a batch of questions, `scores` gives every distinct question word of the batch a column, through
a table over the numbers, and fills a (B, columns) table with what each question gives each column;
a row word is then a lookup in each table. Exact (sums run over a row's tokens in order, as a
search's would), static shapes, nothing goes to the host.

Numbers are never reused or moved: an edit's new words take the next ones. Words are looked up in a
sorted table of (word, number) pairs; an edit's new words go to a short sorted side table, merged in
(one linear pass over the words) every `MERGE_AT` new words, so that an edit costs little.

Letters: N rows, L tokens per row, V words numbered, B questions, Q question tokens, M rows scored,
K weights per question word.
"""

from __future__ import annotations

import torch

from explicitlm.bank import first_in_row, smoothed_idf, sorted_lookup
from explicitlm.index import take

INT32_PLACES = 1 << 31  # a batch's weight table with fewer places is indexed with int32 (half the bytes)
PASS = 1 << 20  # row words looked up a pass: each pass's tensors a few MB, not tens
QUESTIONS = 256  # questions a weight table serves: it holds B x (B Q + 1) weights


class RowWords:
    MERGE_AT = 1024  # words in the side table before it is merged into the main one

    def __init__(self, vocab: torch.Tensor, numbers: torch.Tensor):
        """vocab (V,) sorted word ids, numbered 1..V in that order; numbers (N, L) int32 per row."""
        numbered = torch.arange(1, len(vocab) + 1, dtype=torch.int32, device=vocab.device)
        self.words, self.word_numbers = vocab, numbered  # (V,) each
        self.extra, self.extra_numbers = vocab[:0], numbered[:0]  # the side table: words numbered since
        self.size = len(vocab)  # the highest number given
        self._numbers = numbers  # (capacity, L): rows grow by doubling
        self.n_rows = numbers.shape[0]
        self._df = torch.bincount(numbers.flatten().long(), minlength=len(vocab) + 1)  # (capacity,): grows by doubling
        self._df[0] = 0  # number 0 is no word

    @classmethod
    def build(cls, word_ids: torch.Tensor, chunk: int = 1 << 16) -> RowWords:
        """(N, L) word ids -> every distinct word numbered, and each row's numbers."""
        parts = [word_ids[s : s + chunk] for s in range(0, word_ids.shape[0], chunk)]
        firsts = [first_in_row(part) for part in parts]
        vocab = torch.unique(torch.cat([p[f] for p, f in zip(parts, firsts)])) if parts else word_ids.new_zeros(0)
        numbered = torch.arange(1, len(vocab) + 1, dtype=torch.int32, device=vocab.device)
        numbers = [sorted_lookup(vocab, numbered, p) * f for p, f in zip(parts, firsts)]
        return cls(vocab, (torch.cat(numbers) if numbers else word_ids).to(torch.int32))

    @property
    def numbers(self) -> torch.Tensor:  # (N, L) int32
        return self._numbers[: self.n_rows]

    @property
    def df(self) -> torch.Tensor:  # (V + 1,) rows holding each number's word; [0] is 0
        return self._df[: self.size + 1]

    def number(self, ids: torch.Tensor) -> torch.Tensor:
        """Word ids (any shape) -> their numbers, 0 for a word never numbered (and NO_WORD)."""
        return sorted_lookup(self.words, self.word_numbers, ids) + sorted_lookup(self.extra, self.extra_numbers, ids)

    def idf(self, numbers: torch.Tensor) -> torch.Tensor:
        """Numbers (any shape) -> their words' IDF (`explicitlm.bank.smoothed_idf`), as the bank's counts give."""
        return smoothed_idf(self.df.index_select(0, numbers.reshape(-1)).view(numbers.shape), self.n_rows)

    def to(self, device: torch.device | str) -> RowWords:
        for name in ("words", "word_numbers", "extra", "extra_numbers", "_numbers", "_df"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, at its capacity."""
        names = ("words", "word_numbers", "extra", "extra_numbers", "_numbers", "_df")
        return {name.lstrip("_"): getattr(self, name) for name in names}

    def set(self, row: int, words: torch.Tensor) -> None:
        """Row `row` (one past the last: a new row) now holds `words` (L,); its new words are numbered."""
        words = words.to(self.words.device)
        first = first_in_row(words)
        for w in words[first][self.number(words[first]) == 0].tolist():  # an edit's few new words
            self._add_word(w)
        if row >= self._numbers.shape[0]:
            grow = max(row + 1, 2 * self._numbers.shape[0], 16) - self._numbers.shape[0]
            self._numbers = torch.cat([self._numbers, self._numbers.new_zeros(grow, self._numbers.shape[1])])
        old = self._numbers[row].long()  # zeros for a new row
        now = self.number(words) * first
        self._df.index_add_(0, old, -torch.ones_like(old)).index_add_(0, now, torch.ones_like(now))
        self._df[0] = 0
        self._numbers[row] = now.to(torch.int32)
        self.n_rows = max(self.n_rows, row + 1)

    def _add_word(self, word: int) -> None:
        self.size += 1
        if self.size >= len(self._df):
            self._df = torch.cat([self._df, torch.zeros_like(self._df)])
        w = torch.tensor([word], device=self.extra.device)
        at = int(torch.searchsorted(self.extra, w))  # the side table stays sorted
        n = torch.tensor([self.size], dtype=self.extra_numbers.dtype, device=w.device)
        self.extra = torch.cat([self.extra[:at], w, self.extra[at:]])
        self.extra_numbers = torch.cat([self.extra_numbers[:at], n, self.extra_numbers[at:]])
        if len(self.extra) >= self.MERGE_AT:  # one linear pass over the words: both tables are sorted
            V, E = len(self.words), len(self.extra)
            at = torch.searchsorted(self.words, self.extra) + torch.arange(E, device=w.device)  # the side's places
            rest = torch.ones(V + E, dtype=torch.bool, device=w.device)
            rest[at] = False
            words, numbers = self.words.new_empty(V + E), self.word_numbers.new_empty(V + E)
            words[at], numbers[at] = self.extra, self.extra_numbers
            words[rest], numbers[rest] = self.words, self.word_numbers
            self.words, self.word_numbers = words, numbers
            self.extra, self.extra_numbers = self.extra[:0], self.extra_numbers[:0]

    def scores(self, rows: torch.Tensor, question: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows (B, M) bank rows (>= 0); question (B, Q) word ids; weight (B, Q) or (B, Q, K) what each
        question word gives a row that holds it (0: nothing; give a word repeated in a question once)
        -> (B, M) or (B, M, K): the summed weight of each row's words."""
        B, Q = question.shape
        one = weight.dim() == 2
        weight = weight[..., None] if one else weight  # (B, Q, K)
        K = weight.shape[-1]
        if rows.numel() == 0:
            out = weight.new_zeros(*rows.shape, K)
        elif B > QUESTIONS:  # a bounded table: B x (B Q + 1) weights grow with the square of B
            out = torch.cat(
                [
                    self._scores(*(t[s : s + QUESTIONS] for t in (rows, question, weight)))
                    for s in range(0, B, QUESTIONS)
                ]
            )
        else:
            out = self._scores(rows, question, weight)
        return out.squeeze(-1) if one else out

    def _scores(self, rows: torch.Tensor, question: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows (B, M); question (B, Q); weight (B, Q, K) -> (B, M, K)."""
        B, Q, K = weight.shape
        number = self.number(question) * (weight != 0).any(-1)  # (B, Q), 0: not scored
        batch = number.flatten().sort().values
        # Each distinct number of the batch a column (1 + its first place in `batch`); 0 for the rest.
        column = torch.zeros(self.size + 1, dtype=torch.int32, device=rows.device)
        column[batch] = (torch.searchsorted(batch, batch) + 1).to(torch.int32)
        column[0] = 0
        width = B * Q + 1
        table = torch.zeros(B, width, K, dtype=weight.dtype, device=rows.device)
        at = column[number].long()[..., None].expand_as(weight)
        table.scatter_add_(1, at, weight * (number > 0)[..., None])  # column 0 gets nothing
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
        return torch.cat(out)
