"""The memory bank ("knowledge cache"): data, and the word statistics derived from it.

The bank is explicit text: every row keeps its uuid and sentence, tokenised to L ids with padding
masked out, and for every token the id of the word it belongs to (`explicitlm.words`). It is stored
as one Parquet file (no pickle; `explicitlm.bank_file`) so an edit can replace it atomically. Its
word document frequencies (`WordCounts`) are computed from the rows when the bank is loaded and kept
exact on every edit; the search structure over its keys (`explicitlm.index`) is built from both.

Letters: N rows, L tokens per row, U distinct words, E words added since the counts were sorted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from explicitlm import bank_file
from explicitlm.errors import UserError
from explicitlm.readers import read_knowledge
from explicitlm.words import NO_WORD, token_word_ids


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and rules: a bank is only valid for its tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


AUTO_QUANTILE = 0.99  # model.knowledge_length=auto: rows fit this share of the sentences whole
CUT_EXAMPLES = 5


@dataclass
class Cuts:
    """Sentences longer than the bank's L tokens: how many were cut, how many of them lost their last
    word (the cut took more than punctuation), and a few of those, as (kept text, lost text)."""

    rows: int = 0
    lost_words: int | None = 0  # None: not recorded (a bank file written before it was)
    examples: list[tuple[str, str]] = field(default_factory=list)

    def change(self, removed: Cuts | None, added: Cuts) -> None:
        """A row's text replaced: the cuts of its old text (None for a new row) and of its new one."""
        self.rows += added.rows - (removed.rows if removed else 0)
        if self.lost_words is not None:
            self.lost_words += added.lost_words - (removed.lost_words if removed else 0)

    def lines(self, n_rows: int, length: int) -> list[str]:
        """One line with the counts, then one per example (quoted)."""
        if not self.rows:
            return [f"no sentence is longer than {length} tokens"]
        lost = (
            f"{self.lost_words:,} of them lost their last word"
            if self.lost_words is not None
            else "what they lost was not recorded (the bank file predates it: build it again to see)"
        )
        head = f"{self.rows:,} sentences ({self.rows / max(n_rows, 1):.1%}) were longer than {length} tokens and cut; {lost}"
        return [head, *(f"  cut: {kept!r} lost {lost!r}" for kept, lost in self.examples)]


def tokenize_rows(
    tokenizer: Any, texts: list[str], length: int, chunk: int = 1 << 14
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cuts]:
    """Sentences -> token ids, mask and word ids, each (n, L), and what the cut at L took (`Cuts`).

    A sentence is tokenised as its words read inside a prompt, after a space: its first word is
    usually its subject, and a question names the subject mid-sentence (" Knesset"); a byte-level
    BPE gives "Knesset" at the start of a text another id. Word ids do not depend on it, but the
    memory values (token embeddings) and the answer's tokens do.
    """
    spaced = [" " + t.lstrip() for t in texts]
    ids = torch.full((len(texts), length), 0, dtype=torch.long)
    words = torch.zeros((len(texts), length), dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.bool)
    cuts = Cuts()
    for start in range(0, len(spaced), chunk):  # bounded memory: offsets of a chunk at a time
        part = spaced[start : start + chunk]
        enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        for i, (text, row, offsets) in enumerate(zip(part, enc["input_ids"], enc["offset_mapping"]), start):
            if len(row) > length:
                cuts.rows += 1
                end = offsets[length - 1][1]
                lost = text[end:].strip()
                if any(c.isalnum() for c in lost):  # more than punctuation: the sentence's end is gone
                    cuts.lost_words += 1
                    if len(cuts.examples) < CUT_EXAMPLES:
                        cuts.examples.append((text[:end].strip(), lost))
            row, offsets = row[:length], offsets[:length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            words[i, : len(row)] = torch.tensor(token_word_ids(text, offsets), dtype=torch.long)
            mask[i, : len(row)] = True
    return ids, mask, words, cuts


def auto_length(tokenizer: Any, texts: list[str], quantile: float = AUTO_QUANTILE, chunk: int = 1 << 14) -> int:
    """model.knowledge_length=auto: the token length that `quantile` of the sentences fit whole
    (tokenised as `tokenize_rows` does), at least 1."""
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer([" " + t.lstrip() for t in texts[start : start + chunk]], add_special_tokens=False)
        lengths.extend(len(r) for r in enc["input_ids"])
    if not lengths:
        return 1
    lengths.sort()
    return max(lengths[min(math.ceil(quantile * len(lengths)) - 1, len(lengths) - 1)], 1)


def first_in_row(words: torch.Tensor) -> torch.Tensor:
    """(..., L) word ids -> mask True at each distinct word's first position (never NO_WORD)."""
    L = words.shape[-1]
    same = words[..., :, None] == words[..., None, :]  # (..., L, L)
    earlier = torch.ones(L, L, dtype=torch.bool, device=words.device).tril(-1)
    return ~(same & earlier).any(-1) & (words != NO_WORD)


def distinct_words(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., L) word ids -> the same ids sorted along the last dim, and a mask that is True once
    per distinct word (never on NO_WORD): set operations over a row without a Python loop."""
    srt = words.sort(dim=-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    return srt, first & (srt != NO_WORD)


def sorted_lookup(keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ids (any shape) -> the value of each id in a table of sorted keys and their values, 0 where the
    table lacks it: the lookup of every sorted table here (a word's count, a word's number)."""
    if len(keys) == 0:
        return torch.zeros_like(ids)
    at = torch.searchsorted(keys, ids.contiguous()).clamp_(max=len(keys) - 1)  # a strided input is copied anyway
    return torch.where(keys[at] == ids, values[at].to(ids.dtype), torch.zeros_like(ids))


def smoothed_idf(df: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Smoothed inverse document frequency, log((N + 1) / (df + 1)) + 1: a word no row contains
    weighs the most, never 0, and a word every row contains weighs 1."""
    return torch.log((n_rows + 1.0) / (df.float() + 1.0)) + 1.0


class WordCounts:
    """How many rows contain each word (a row counts a word once), exact under edits.

    The counts sit in a sorted table looked up with `searchsorted` on the model's device; words
    that appear after it was sorted go to a short side table, sorted too, merged in when it grows.
    """

    MERGE_AT = 1024

    def __init__(self, words: torch.Tensor, df: torch.Tensor, n_rows: int):
        order = words.argsort()
        self.words, self.df = words[order], df[order]  # (U,) each, sorted by word id
        self.extra_words = words.new_zeros(0)  # (E,)
        self.extra_df = df.new_zeros(0)
        self.n_rows = n_rows

    @classmethod
    def from_rows(cls, word_ids: torch.Tensor, chunk: int = 1 << 16) -> WordCounts:
        parts = []
        for start in range(0, word_ids.shape[0], chunk):  # bounded memory at a million rows
            srt, first = distinct_words(word_ids[start : start + chunk])
            parts.append(srt[first])
        allw = torch.cat(parts) if parts else word_ids.new_zeros(0).flatten()
        words, df = torch.unique(allw, return_counts=True)
        return cls(words, df, word_ids.shape[0])

    def to(self, device: torch.device | str) -> WordCounts:
        for name in ("words", "df", "extra_words", "extra_df"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def df_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Document frequency of each id (0 for words no row contains); any shape."""
        ids = ids.contiguous()  # searchsorted copies a strided input first
        df = sorted_lookup(self.words, self.df, ids)
        if len(self.extra_words):  # the side table is sorted too
            df = df + sorted_lookup(self.extra_words, self.extra_df, ids)
        return df

    def idf(self, ids: torch.Tensor) -> torch.Tensor:
        return smoothed_idf(self.df_of(ids), self.n_rows)

    def update(self, removed: torch.Tensor | None, added: torch.Tensor | None, n_rows: int) -> None:
        """A row's words left (removed) and came (added), each (L,) or None; the bank now has n_rows."""
        self.n_rows = n_rows
        before, after = (set() if row is None else set(row[row != NO_WORD].tolist()) for row in (removed, added))
        for w in before - after:  # an edit usually changes a word or two: only those are counted again
            self._add(w, -1)
        for w in after - before:
            self._add(w, 1)

    def _add(self, word: int, delta: int) -> None:
        w = torch.tensor([word], device=self.words.device)
        if len(self.words):
            pos = int(torch.searchsorted(self.words, w).clamp(max=len(self.words) - 1))
            if int(self.words[pos]) == word:
                self.df[pos] += delta
                return
        at = int(torch.searchsorted(self.extra_words, w))  # the side table stays sorted
        if at < len(self.extra_words) and int(self.extra_words[at]) == word:
            self.extra_df[at] += delta
            return
        self.extra_words = torch.cat([self.extra_words[:at], w, self.extra_words[at:]])
        self.extra_df = torch.cat([self.extra_df[:at], torch.tensor([delta], device=w.device), self.extra_df[at:]])
        if len(self.extra_words) >= self.MERGE_AT:
            merged = WordCounts(torch.cat([self.words, self.extra_words]), torch.cat([self.df, self.extra_df]), 0)
            self.words, self.df = merged.words, merged.df
            self.extra_words, self.extra_df = merged.extra_words, merged.extra_df


class MemoryBank:
    """Rows of explicit text with their token ids, masks and word ids, and the bank's word counts.

    Row storage grows by doubling, so adding a row costs O(L), not a copy of the bank.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        mask: torch.Tensor,
        word_ids: torch.Tensor,
        uuids: list[str],
        texts: list[str],
        tokenizer_fingerprint: str,
        pad_id: int,
        cuts: Cuts | None = None,
        version: int = 0,
        auto_length: bool = False,
    ):
        self._ids, self._mask, self._words = token_ids, mask, word_ids  # (capacity, L) each
        # Each distinct word's first position in its row: what word statistics count, kept per row
        # (an edit changes its own row's only) instead of found again for every candidate.
        self._first = torch.cat(
            [first_in_row(word_ids[i : i + 65536]) for i in range(0, len(word_ids), 65536)] or [word_ids.bool()]
        )
        self.uuids, self.texts = uuids, texts
        self.tokenizer_fingerprint, self.pad_id = tokenizer_fingerprint, pad_id
        self.cuts, self.version = cuts or Cuts(), version
        self.auto_length = auto_length  # L was sized to the sentences (model.knowledge_length=auto)
        self._row_of = {u: i for i, u in enumerate(uuids) if u}
        self.counts = WordCounts.from_rows(self.word_ids)

    def __len__(self) -> int:
        return len(self.uuids)

    @property
    def token_ids(self) -> torch.Tensor:  # (N, L) long, padded with pad_id
        return self._ids[: len(self)]

    @property
    def mask(self) -> torch.Tensor:  # (N, L) bool, True on real tokens
        return self._mask[: len(self)]

    @property
    def word_ids(self) -> torch.Tensor:  # (N, L) long, NO_WORD off words
        return self._words[: len(self)]

    @property
    def first(self) -> torch.Tensor:  # (N, L) bool, True at each distinct word's first position
        return self._first[: len(self)]

    @property
    def knowledge_length(self) -> int:
        return self._ids.shape[1]

    @property
    def truncated(self) -> int:
        """Rows whose sentence is longer than L tokens."""
        return self.cuts.rows

    @property
    def device(self) -> torch.device:
        return self._ids.device

    def to(self, device: torch.device | str) -> MemoryBank:
        self._ids, self._mask, self._words, self._first = (
            t.to(device) for t in (self._ids, self._mask, self._words, self._first)
        )
        self.counts.to(device)
        return self

    def row_of(self, uuid: str) -> int:
        """Row index of a uuid, -1 when the bank has no such row."""
        return self._row_of.get(uuid, -1)

    def row(self, i: int) -> dict[str, Any]:
        return {"uuid": self.uuids[i], "text": self.texts[i], "row": i}

    def fingerprint(self) -> str:
        """A hash of the bank's content (uuids and word ids): what its cached statistics are keyed by."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\n".join(self.uuids).encode())
        h.update(self.word_ids.cpu().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, rows: list[dict[str, str]], tokenizer: Any, knowledge_length: int | str) -> MemoryBank:
        """Tokenise sentences to exactly L ids (cut or padded) and note what the cut took. L "auto":
        the length that AUTO_QUANTILE of the sentences fit whole, resolved here once and kept in the
        bank file, so that everything loading the bank (and the weights trained on it) agrees."""
        texts = [r["text"] for r in rows]
        auto = knowledge_length == "auto"
        length = auto_length(tokenizer, texts) if auto else int(knowledge_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids, mask, words, cuts = tokenize_rows(tokenizer, texts, length)
        ids[~mask] = pad_id
        uuids = [r.get("uuid", "") or f"row-{i}" for i, r in enumerate(rows)]
        return cls(ids, mask, words, uuids, texts, tokenizer_fingerprint(tokenizer), pad_id, cuts, auto_length=auto)

    def set_row(self, i: int, text: str, tokenizer: Any) -> torch.Tensor | None:
        """Replace row i's text (i == len(self) appends; its uuid must be added first) and re-tokenise
        it; the word counts and the counts of cut rows follow. Returns the row's previous word ids,
        None for a new row."""
        ids, mask, words, cut = tokenize_rows(tokenizer, [text], self.knowledge_length)
        ids[~mask] = self.pad_id
        new = i >= self._filled()
        if new:
            self._reserve(i + 1)
            old = None
        else:
            old = self._words[i].clone()
        was = None if new else tokenize_rows(tokenizer, [self.texts[i]], self.knowledge_length)[3]
        self.cuts.change(was, cut)
        self._ids[i], self._mask[i], self._words[i] = ids[0], mask[0], words[0]
        self._first[i] = first_in_row(words[0].to(self._first.device))
        if new:
            self.texts.append(text)
        else:
            self.texts[i] = text
        self.counts.update(old, self._words[i], len(self))
        self.version += 1
        return old

    def add_row(self, uuid: str, text: str, tokenizer: Any) -> int:
        if uuid in self._row_of:
            raise KeyError(f"uuid {uuid} already in the bank")
        i = len(self)
        self.uuids.append(uuid)
        self._row_of[uuid] = i
        self.set_row(i, text, tokenizer)
        return i

    def _filled(self) -> int:
        return len(self.texts)

    def _reserve(self, n: int) -> None:
        capacity = self._ids.shape[0]
        if n <= capacity:
            return
        grow = max(n, capacity * 2, 16) - capacity
        self._ids = torch.cat([self._ids, self._ids.new_full((grow, self.knowledge_length), self.pad_id)])
        self._mask = torch.cat([self._mask, self._mask.new_zeros((grow, self.knowledge_length))])
        self._words = torch.cat([self._words, self._words.new_zeros((grow, self.knowledge_length))])
        self._first = torch.cat([self._first, self._first.new_zeros((grow, self.knowledge_length))])

    def save(self, path: str | Path) -> None:
        """Write the bank as one Parquet file, atomically (temp file, fsync, rename)."""
        bank_file.write(path, self.rows_table())

    def rows_table(self, rows: list[int] | None = None) -> pa.Table:
        """Rows `rows` (all when None) as a table of the bank file's schema, with the bank's metadata."""
        stored = (self._ids, self._mask, self._words)
        if rows is None:
            uuids, texts, arrays = self.uuids, self.texts, [t[: len(self)] for t in stored]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            uuids, texts = [self.uuids[i] for i in rows], [self.texts[i] for i in rows]
            arrays = [t[index] for t in stored]
        meta = {
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "knowledge_length": self.knowledge_length,
            "pad_id": self.pad_id,
            "truncated": self.cuts.rows,
            "lost_last_word": self.cuts.lost_words,
            "cut_examples": [list(e) for e in self.cuts.examples],
            "knowledge_length_auto": self.auto_length,
            "version": self.version,
        }
        return bank_file.to_table(uuids, texts, *(a.cpu().numpy() for a in arrays), meta)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None) -> MemoryBank:
        """Read a bank file. A bank of the previous format (no word ids) is brought up to date from
        its sentences when a tokenizer is given."""
        table, meta = bank_file.read(path)
        fmt = meta.get("format")
        L = meta.get("knowledge_length", 0)
        texts, uuids = table.column("text").to_pylist(), table.column("uuid").to_pylist()
        if fmt in bank_file.OLDER_FORMATS and tokenizer is not None:
            ids, mask, words, cuts = tokenize_rows(tokenizer, texts, L)
            ids[~mask] = meta["pad_id"]
            return cls(
                ids,
                mask,
                words,
                uuids,
                texts,
                meta["tokenizer_fingerprint"],
                meta["pad_id"],
                cuts,
                meta.get("version", 0),
                meta.get("knowledge_length_auto", False),
            )
        if fmt != bank_file.BANK_FORMAT:
            raise UserError(
                f"{path} is not an ExplicitLM memory bank of format {bank_file.BANK_FORMAT} (it has {fmt!r}); "
                "build a new one from its sentences (model.database_init_path) or load it with its tokenizer"
            )

        def column(name: str, dtype: str) -> torch.Tensor:
            flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            return torch.from_numpy(flat.astype(dtype)).reshape(-1, L)

        return cls(
            token_ids=column("token_ids", "int64"),
            mask=column("mask", "bool"),
            word_ids=column("word_ids", "int64"),
            uuids=uuids,
            texts=texts,
            tokenizer_fingerprint=meta["tokenizer_fingerprint"],
            pad_id=meta["pad_id"],
            # A file written before the report kept only the count of cut rows.
            cuts=Cuts(
                meta.get("truncated", 0),
                meta.get("lost_last_word"),
                [tuple(e) for e in meta.get("cut_examples", [])],
            ),
            version=meta.get("version", 0),
            auto_length=meta.get("knowledge_length_auto", False),
        )


def load_or_build_bank(
    cache_path: str | Path,
    database_init_path: str | Path,
    tokenizer: Any,
    knowledge_length: int | str,
    knowledge_num: int,
    recompute: bool = False,
) -> MemoryBank:
    """The reference's cache logic: build from the database when missing or asked, else load.

    A cached bank made with another tokenizer or row length is refused, never silently reused;
    knowledge_length "auto" takes the length the bank was built with.
    """
    cache_path = Path(cache_path)
    if cache_path.exists() and not recompute:
        bank = MemoryBank.load(cache_path, tokenizer)
        fp = tokenizer_fingerprint(tokenizer)
        rebuild = (
            f"build a new bank from its sentences: delete {cache_path} or point model.cache_path elsewhere "
            "(model.database_init_path names the sentences)"
        )
        if bank.tokenizer_fingerprint != fp:
            raise UserError(f"memory bank {cache_path} was built with another tokenizer; {rebuild}")
        if knowledge_length != "auto" and bank.knowledge_length != knowledge_length:
            raise UserError(
                f"memory bank {cache_path} has rows of {bank.knowledge_length} tokens but model.knowledge_length="
                f"{knowledge_length}; {rebuild}"
            )
        return bank
    if not database_init_path or not Path(database_init_path).exists():
        raise UserError(
            f"no memory bank at {cache_path} and model.database_init_path={str(database_init_path)!r} does not exist"
        )
    rows = []
    for row in read_knowledge(database_init_path):
        if len(rows) >= knowledge_num:
            print(f"memory: more than model.knowledge_num={knowledge_num} sentences; keeping the first {knowledge_num}")
            break
        rows.append(row)
    bank = MemoryBank.build(rows, tokenizer, knowledge_length)
    L = bank.knowledge_length
    sized = (
        f" (model.knowledge_length=auto: {AUTO_QUANTILE:.0%} of the sentences fit whole)" if bank.auto_length else ""
    )
    head, *examples = bank.cuts.lines(len(bank), L)
    print(f"memory: built {len(bank)} rows of {L} tokens{sized} from {database_init_path}; {head}")
    for line in examples:
        print(f"memory: {line}")
    bank.save(cache_path)
    return bank
