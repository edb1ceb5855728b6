import math

import pytest
import torch
import torch.nn.functional as F

from explicitlm.bank import MemoryBank
from explicitlm.index import (
    ProductKeyIndex,
    bank_index,
    index_cache_path,
    lexical_keys,
    lexical_vectors,
    pair_shortlist,
    quantize_int8,
    rank_int8,
    take,
)

DIM = 128


def _bank(tokenizer, texts):
    return MemoryBank.build([{"uuid": f"r{i}", "text": t} for i, t in enumerate(texts)], tokenizer, 16)


def _sentences(n):
    return [f"Person{i} number {i % 97} was born in Town{i % 53} of Land{i % 11}." for i in range(n)]


def _own_key_finds_row(index, bank, rows=None):
    """Share of rows whose own words, as a query, bring them among the candidates (through the probe)."""
    rows = torch.arange(len(bank)) if rows is None else rows
    q = lexical_vectors(bank.word_ids[rows], bank.counts, DIM, 0, known_only=True)
    cand, valid = index.candidates(q, 16, top_cells=16, probe_cells=64, scan_rows=0)
    return ((cand == rows[:, None]) & valid).any(1).float().mean().item()


@pytest.mark.parametrize("n", [1, 2, 3, 50, 2000])
def test_any_bank_size_builds_and_every_row_is_reachable(tokenizer, n):
    """From one row to many, fewer rows than sub-keys included: the grid follows the bank, cells stay
    within their cap where they can, and every row's own key finds it through the probe."""
    bank = _bank(tokenizer, _sentences(n))
    index = ProductKeyIndex.build(lexical_keys(bank.word_ids, bank.counts, DIM, 0), max_cell_rows=4)
    assert len(index) == n and index.n1 == index.n2 == max(2, math.isqrt(max(n - 1, 0)) + 1)
    assert index.n1 * index.n2 >= n and (index.cell >= 0).all()
    assert _own_key_finds_row(index, bank) == 1.0


def test_identical_sentences_overflow_their_cell_but_stay_reachable(tokenizer):
    texts = _sentences(300) + ["Many copies of one sentence."] * 200
    bank = _bank(tokenizer, texts)
    index = ProductKeyIndex.build(lexical_keys(bank.word_ids, bank.counts, DIM, 0), max_cell_rows=4)
    # 200 equal keys want one cell; its next-best cells fill up too, and the rest join the best one
    # rather than some cell no query for them would read.
    copies = torch.arange(300, 500)
    assert len(index.cell[copies].unique()) <= 16 + 1
    assert _own_key_finds_row(index, bank, torch.arange(300)) == 1.0
    q = lexical_vectors(bank.word_ids[300:301], bank.counts, DIM, 0, known_only=True)
    cand, valid = index.candidates(q, 16, top_cells=16, probe_cells=64, scan_rows=0)
    assert valid.all() and (cand >= 300).all()  # a query for the copies gets copies


def test_edits_are_found_at_once_and_laid_out_later(tokenizer):
    bank = _bank(tokenizer, _sentences(3000))
    index = ProductKeyIndex.build(lexical_keys(bank.word_ids, bank.counts, DIM, 0), max_cell_rows=4, max_recent=50)
    layouts = index.layouts
    edited = []
    for k, row in enumerate(range(0, 3000, 50)):  # 60 edits: past max_recent once
        bank.set_row(row, f"Zorblax{k} Quux{k} moved to Vetch{k}.", tokenizer)
        index.update_row(row, lexical_vectors(bank.word_ids[row : row + 1], bank.counts, DIM, 0)[0])
        edited.append(row)
        assert _own_key_finds_row(index, bank, torch.tensor(edited)) == 1.0  # at once, every edit so far
    new = bank.add_row("new", "Completely fresh Xylophonia facts.", tokenizer)
    index.update_row(new, lexical_vectors(bank.word_ids[new : new + 1], bank.counts, DIM, 0)[0])
    assert index.layouts == layouts + 1 and 0 < len(index.recent) <= 50
    assert _own_key_finds_row(index, bank, torch.tensor([*edited, new])) == 1.0
    assert _own_key_finds_row(index, bank) > 0.99


def test_the_cache_is_keyed_by_the_banks_content(tokenizer, tmp_path):
    bank = _bank(tokenizer, _sentences(500))
    cache = index_cache_path(tmp_path / "bank.parquet")
    first = bank_index(bank, DIM, 0, 4, 100, cache)
    assert cache.exists() and cache.name.startswith("bank.parquet")
    again = bank_index(bank, DIM, 0, 4, 100, cache)
    assert torch.equal(again.keys, first.keys) and torch.equal(again.cell, first.cell)
    assert ProductKeyIndex.load(cache, {"wrong": 1}, 4, 100) is None
    bank.set_row(3, "Something else entirely.", tokenizer)
    changed = bank_index(bank, DIM, 0, 4, 100, cache)  # another content: rebuilt, not reused
    assert not torch.equal(changed.keys[3], first.keys[3])
    assert bank_index(bank, 64, 0, 4, 100, cache).keys.shape[1] == 64  # another space: rebuilt


def test_int8_ranking_keeps_the_exact_best():
    # The probe ranks candidates with int8 keys on a CPU: the exact top 8 of every query must be
    # among its int8 top 32, which the exact stage then scores.
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(4096, 64, generator=g), dim=-1)
    keys8, scale = quantize_int8(keys)
    q = F.normalize(keys[:40] + 0.3 * torch.randn(40, 64, generator=g), dim=-1)
    pos = torch.randint(0, len(keys), (40, 1500), generator=g)
    exact = (take(keys, pos) @ q[:, :, None]).squeeze(-1)  # (40, 1500)
    approx = rank_int8(keys8, scale, pos, q)
    assert (approx - exact).abs().max() < 0.01
    top8, top32 = exact.topk(8, dim=1).indices, approx.topk(32, dim=1).indices
    assert all(torch.isin(top8[i], top32[i]).all() for i in range(len(q)))


def test_pair_shortlist_keeps_the_best_cells():
    # Two best-first score lists: the shortlist must hold every pair of the exact top p of all c x c sums.
    g = torch.Generator().manual_seed(0)
    for c, p in [(16, 32), (128, 2048), (8, 64), (5, 3)]:
        t1 = torch.randn(4, c, generator=g).sort(dim=1, descending=True).values
        t2 = torch.randn(4, c, generator=g).sort(dim=1, descending=True).values
        full = (t1[:, :, None] + t2[:, None, :]).flatten(1).topk(min(p, c * c), dim=1).values
        a, b = pair_shortlist(c, c, p, "cpu")
        assert len(a) < c * c or p >= c * c
        short = (t1[:, a] + t2[:, b]).topk(min(p, len(a)), dim=1).values
        assert torch.equal(full, short)
