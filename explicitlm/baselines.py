"""What a user could pick instead of training anything: the figures the trained reader must beat.

- `WordRule`, no training: take the bank row whose words best match the question's (the share of the
  row's words, the options' words left out, that the question names, IDF-weighted to a power); if
  that share reaches a threshold, answer the option whose words the row contains, else guess.
- `BM25Reader`, retrieval-augmented reading: the best row by BM25 (`bm25s`) for the question, then
  the option whose words the row contains; without options, the row's words that the question lacks
  (stop words left out).
Both meet questions and rows on the project's normalised words (`explicitlm.words`).

Letters: N rows.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from explicitlm.factsets import pick
from explicitlm.words import WORD, word_id


def word_set(text: str) -> set[int]:
    return {word_id(m.group()) for m in WORD.finditer(text)}


def option_in_row(row: set[int], options: list[str], idf, key: str) -> tuple[int, bool]:
    """The option whose words (IDF-weighted) the row contains the most of; a guess when none."""
    shares = []
    for o in options:
        words = word_set(o)
        total = sum(idf(w) for w in words)
        shares.append(sum(idf(w) for w in words & row) / total if total else 0.0)
    best = max(range(len(options)), key=shares.__getitem__)
    if shares[best] > 0 and shares.count(shares[best]) == 1:
        return best, True
    return pick(key, len(options)), False


def words_not_in(text: str, question: str, stop: set[str]) -> str:
    """The row's words that the question lacks, in order, stop words left out."""
    asked = word_set(question)
    kept = [m.group() for m in WORD.finditer(text) if word_id(m.group()) not in asked and m.group().lower() not in stop]
    return " ".join(kept)


class WordRule:
    """Best row by the coverage of its words (options' words left out) by the question's."""

    def __init__(self, texts: list[str], power: float = 3.0, threshold: float = 0.75, scan: int = 4):
        self.texts = texts
        self.rows = [word_set(t) for t in texts]
        self.df: Counter[int] = Counter(w for row in self.rows for w in row)
        self.lists: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            for w in row:
                self.lists[w].append(i)
        self.power, self.threshold, self.scan = power, threshold, scan

    def idf(self, w: int) -> float:
        return math.log((len(self.rows) + 1) / (self.df.get(w, 0) + 1)) + 1

    def best_row(self, question: str, options: list[str]) -> tuple[int, float]:
        """The candidate row (containing one of the question's `scan` rarest words) of best coverage."""
        q = word_set(question)
        left_out = set().union(*(word_set(o) for o in options)) if options else set()
        rare = sorted((w for w in q if self.df.get(w)), key=lambda w: self.df[w])[: self.scan]
        best, best_cover = -1, -1.0
        for i in {i for w in rare for i in self.lists[w]}:
            rest = self.rows[i] - left_out
            weight = sum(self.idf(w) ** self.power for w in rest)
            cover = sum(self.idf(w) ** self.power for w in rest & q) / weight if weight else 0.0
            if cover > best_cover:
                best, best_cover = i, cover
        return best, best_cover

    def answer(self, question: str, options: list[str], key: str) -> tuple[int, bool]:
        """(option index, whether the row decided it)."""
        row, cover = self.best_row(question, options)
        if row < 0 or cover < self.threshold:
            return pick(key, len(options)), False
        return option_in_row(self.rows[row], options, self.idf, key)

    def open_answer(self, question: str, stop: set[str]) -> str:
        row, cover = self.best_row(question, [])
        return words_not_in(self.texts[row], question, stop) if row >= 0 and cover >= self.threshold else ""


class BM25Reader:
    """The best row by BM25 over the question's text, read for the option it names."""

    def __init__(self, texts: list[str]):
        import bm25s

        self.texts = texts
        self.rows = [word_set(t) for t in texts]
        df: Counter[int] = Counter(w for row in self.rows for w in row)
        n = len(texts)
        self.idf = lambda w: math.log((n + 1) / (df.get(w, 0) + 1)) + 1
        self.stop = set(bm25s.stopwords.STOPWORDS_EN)
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokens(texts), show_progress=False)

    def _tokens(self, texts: list[str]) -> Any:
        import bm25s

        # The project's word normalisation (case, accents, stems), as strings bm25s can count.
        normalised = [
            " ".join(str(word_id(m.group())) for m in WORD.finditer(t) if m.group().lower() not in self.stop)
            for t in texts
        ]
        return bm25s.tokenize(normalised, stopwords=None, show_progress=False, token_pattern=r"-?\d+")

    def top(self, questions: list[str]) -> list[int]:
        """The best row for each question (-1: no row shares a word with it)."""
        if not questions:
            return []
        docs, scores = self.retriever.retrieve(self._tokens(questions), k=1, show_progress=False, n_threads=1)
        return [int(d[0]) if s[0] > 0 else -1 for d, s in zip(docs, scores)]

    def answers(self, questions: list[str], options: list[list[str]], keys: list[str]) -> list[tuple[int, bool]]:
        out = []
        for row, opts, key in zip(self.top(questions), options, keys):
            out.append(
                option_in_row(self.rows[row], opts, self.idf, key) if row >= 0 else (pick(key, len(opts)), False)
            )
        return out

    def open_answers(self, questions: list[str]) -> list[str]:
        return [
            words_not_in(self.texts[row], q, self.stop) if row >= 0 else ""
            for row, q in zip(self.top(questions), questions)
        ]
