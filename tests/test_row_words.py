"""Row words by number: a batch's scores equal a brute force over the rows' current words, under edits."""

import pytest
import torch

import explicitlm.row_words as row_words_module
from explicitlm.row_words import RowWords
from explicitlm.words import NO_WORD


def _rows(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, 301, dtype=torch.float)  # Zipf-like: words repeat within and across rows
    words = torch.multinomial((1 / ranks).expand(n, -1), length, replacement=True, generator=g) * 7919 + 13
    words[:, -3:] = NO_WORD
    return words


def _brute(words, rows, question, weight):
    """Each row's summed weight over the question's distinct words it holds (a repeated question word
    carries its weight at its first place only)."""
    out = torch.zeros(rows.shape)
    for b in range(rows.shape[0]):
        for m in range(rows.shape[1]):
            held = set(words[rows[b, m]].tolist())
            out[b, m] = sum(float(w) for q, w in zip(question[b].tolist(), weight[b]) if q != NO_WORD and q in held)
    return out


def _questions(words, b, seed):
    g = torch.Generator().manual_seed(seed)
    q = words[torch.randint(0, len(words), (b,), generator=g)].clone()  # a row's words, repeats and NO_WORD
    q[:, 0] = 999_999_937  # a word no row holds
    q = q.sort(1).values
    once = torch.ones_like(q, dtype=torch.bool)
    once[:, 1:] = q[:, 1:] != q[:, :-1]
    weight = torch.rand(q.shape, generator=g) * once * (q != NO_WORD)
    weight[:, -1] = 0.0  # a word the caller does not score
    return q, weight


@pytest.mark.parametrize("small", [False, True], ids=["one-pass", "bounded"])
def test_scores_equal_a_brute_force_under_edits(small, monkeypatch):
    if small:  # a batch past int32's places, looked up in passes of a few questions, tables of two
        monkeypatch.setattr(row_words_module, "INT32_PLACES", 32)  # a table of two questions holds 42
        monkeypatch.setattr(row_words_module, "PASS", 50)
        monkeypatch.setattr(row_words_module, "QUESTIONS", 2)
        monkeypatch.setattr(RowWords, "MERGE_AT", 3)  # new words merged into the main table as they come
    words = _rows(200, 10, seed=0)
    rw = RowWords.build(words, chunk=64)  # several chunks
    built = rw.size
    assert rw.numbers.dtype == torch.int32 and built == len(torch.unique(words[words != NO_WORD]))
    held = set(words.flatten().tolist()) - {NO_WORD}  # every word any row has held
    g = torch.Generator().manual_seed(1)
    for step in range(40):
        row = len(words) if step % 5 == 4 else int(torch.randint(0, len(words), (1,), generator=g))
        new = _rows(1, 10, seed=100 + step)[0]
        new[0] = 5_000_000 + step  # a word only this edit brings
        if row == len(words):
            words = torch.cat([words, new[None]])  # past the capacity once in a while
        else:
            words[row] = new
        rw.set(row, new)
        held |= set(new.tolist()) - {NO_WORD}
        if step % 8 == 7:
            q, weight = _questions(words, 6, seed=step)
            q[0, 1], weight[0, 1] = 5_000_000 + step, 0.5  # the newest word, asked (questions need not be sorted)
            rows = torch.randint(0, len(words), (6, 30), generator=g)
            rows[0, 0] = row
            got = rw.scores(rows, q, weight)
            assert torch.allclose(got, _brute(words, rows, q, weight), atol=1e-5)
            both = rw.scores(rows, q, torch.stack([weight, 2 * weight], -1))  # two weights a word
            assert torch.equal(both, torch.stack([got, rw.scores(rows, q, 2 * weight)], -1))
            assert got[0, 0] >= weight[0, 1] > 0
    assert rw.n_rows == len(words) == 208 and rw.size == len(held)
    assert len(rw.extra) < 3 if small else len(rw.extra) == rw.size - built >= 40  # every edit brought a word
    assert (rw.words[1:] > rw.words[:-1]).all() and (rw.extra[1:] > rw.extra[:-1]).all()  # merged in order
    assert sorted(torch.cat([rw.word_numbers, rw.extra_numbers]).tolist()) == list(range(1, rw.size + 1))
    ids = torch.tensor(sorted(held))  # each word's document frequency: the rows holding it now
    assert torch.equal(rw.df[rw.number(ids)], (words[:, :, None] == ids).any(1).sum(0))


def test_numbers_are_kept_across_edits():
    """An edit numbers its new words after every other and renumbers nothing."""
    words = _rows(50, 8, seed=2)
    rw = RowWords.build(words)
    before = rw.numbers.clone()
    rw.set(3, torch.tensor([77, 78, 77, NO_WORD, 0, 0, 0, 0]))
    assert rw.number(torch.tensor([77, 78])).tolist() == [rw.size - 1, rw.size]
    assert torch.equal(rw.numbers[torch.arange(50) != 3], before[torch.arange(50) != 3])
    assert sorted(rw.numbers[3].tolist()) == [0] * 6 + [rw.size - 1, rw.size]
    assert rw.number(torch.tensor([NO_WORD, 123456789])).tolist() == [0, 0]


def test_an_empty_bank_numbers_its_first_row():
    rw = RowWords.build(torch.zeros(0, 4, dtype=torch.long))
    assert rw.size == 0 and rw.numbers.shape == (0, 4)
    rw.set(0, torch.tensor([5, 6, 0, 0]))
    got = rw.scores(torch.tensor([[0]]), torch.tensor([[5, 9]]), torch.tensor([[2.0, 3.0]]))
    assert got.tolist() == [[2.0]] and rw.df.tolist() == [0, 1, 1]
    none = rw.scores(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert none.shape == (0, 3)  # no questions, or no rows: nothing to look up
    assert rw.scores(torch.zeros(2, 0, dtype=torch.long), torch.tensor([[5, 9]] * 2), torch.ones(2, 2)).shape == (2, 0)
