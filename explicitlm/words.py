"""Words: where a question and a memory row meet, whatever their spelling.

A byte-level BPE gives "Knesset" at the start of a text, " Knesset" mid-sentence and " knesset"
in lower case three different ids, and splits a name into pieces that many other names share.
Retrieval and the match between a question and a row therefore compare words, not token ids: each
word is normalised (Unicode compatibility form, accents dropped, case folded, an English Snowball
stem, so "born"/"Born" and "speaks"/"speak" meet) and hashed to a 64-bit id. Every token carries
the id of the word it belongs to (0 for punctuation, spaces and markup), so the model can weigh,
compare and pool tokens by word.

A word's vector in the retrieval space is a fixed pseudo-random sign pattern derived from its
id (a counter-based hash, computed on any device): no table, nothing to train or to ship, the same
for every tokenizer, and any word, seen or new, has one. Sums of such vectors weighted by IDF
approximate TF-IDF cosines (a random projection), which the product-key index searches.

Letters: n words, K retrieval dimensions.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import torch

# Letters and digits; "_" is excluded so a cloze's "____" is not a word.
WORD = re.compile(r"[^\W_]+")
NO_WORD = 0
# Bumped whenever normalisation or hashing changes: cached keys of older words are rebuilt.
WORDS_VERSION = 1


_local = threading.local()


def _stemmer():
    """This thread's stemmer: a Snowball stemmer keeps its state on itself, so threads (a server's
    edit thread and its model thread) must not share one."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        import snowballstemmer

        stemmer = _local.stemmer = snowballstemmer.stemmer("english")
    return stemmer


@lru_cache(maxsize=1 << 20)
def word_id(word: str) -> int:
    """The normalised word's 64-bit id (signed, never NO_WORD)."""
    w = "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c)).casefold()
    w = _stemmer().stemWord(w)
    h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little", signed=True)
    return h or 1


def words(text: str) -> list[tuple[int, int, int]]:
    """(start, end, id) of every word in text."""
    return [(m.start(), m.end(), word_id(m.group())) for m in WORD.finditer(text)]


def token_word_ids(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]] | None = None
) -> list[int]:
    """The id of the word each token belongs to (NO_WORD for tokens outside any word).

    offsets are the tokens' (start, end) characters in text; only words inside `spans` (default:
    all of text) count, so a chat template's markup ("<|im_start|>") is never a word.
    """
    owner = [NO_WORD] * len(text)
    for start, end in spans if spans is not None else [(0, len(text))]:
        for s, e, wid in words(text[start:end]):
            owner[start + s : start + e] = [wid] * (e - s)
    out = []
    for s, e in offsets:
        out.append(next((owner[c] for c in range(s, min(e, len(owner))) if owner[c] != NO_WORD), NO_WORD))
    return out


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    z = (x ^ _shr(x, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def word_vectors(ids: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """(n,) word ids -> (n, dim) float vectors of +-1/sqrt(dim); dim a multiple of 64.

    Two different words' vectors have cosine about N(0, 1/dim): a random projection.
    """
    if dim % 64:
        raise ValueError(f"the retrieval dimension must be a multiple of 64, got {dim}")
    blocks = torch.arange(dim // 64, device=ids.device, dtype=torch.long)  # (dim/64,)
    z = _splitmix64(ids[:, None] * 31 + blocks[None, :] + seed * 1_000_003)  # (n, dim/64)
    bits = (z[..., None] >> torch.arange(64, device=ids.device)) & 1  # (n, dim/64, 64)
    return (bits.reshape(len(ids), dim).float() * 2 - 1) * dim**-0.5
