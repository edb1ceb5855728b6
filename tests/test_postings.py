"""Inverted lists: the rows a question's rarest words name, equal to a scan of the bank, under edits."""

import pytest
import torch

from explicitlm.bank import first_in_row
from explicitlm.postings import DEEP, PER_WORD, RAREST_WORD, WORDS, Postings
from explicitlm.words import NO_WORD


def _bank(n=600, length=8, vocab=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like: a few template words in most rows, many rare ones
    ranks = torch.arange(1, vocab + 1, dtype=torch.float)
    words = torch.multinomial((1 / ranks).expand(n, -1), length, replacement=True, generator=g) + 1
    words[:, -2:] = NO_WORD  # padding, as short rows have
    return words


def _scores(words, q, exclude):
    """What rows_for ranks by, by brute force over the current rows: the rows on the lists of the
    WORDS rarest listed words (the first RAREST_WORD rows of the DEEP rarest's, PER_WORD of the
    others'), each scored by the summed weight of all the question's words it contains."""
    import math

    distinct = sorted({int(w) for w in q if int(w) != NO_WORD})
    has = {w: (words == w).any(1) for w in distinct}
    df = {w: int(has[w].sum()) for w in distinct}
    chosen = [w for w in sorted(distinct, key=lambda w: (df[w], w)) if df[w]][:WORDS]
    listed = torch.zeros(len(words), dtype=torch.bool)
    for i, w in enumerate(chosen):
        listed[has[w].nonzero().flatten()[: RAREST_WORD if i < DEEP else PER_WORD]] = True
    score = torch.zeros(len(words))
    for w in distinct:
        if df[w]:
            score += has[w].float() * (math.log((len(words) + 1) / (df[w] + 1)) + 1)
    score[~listed] = 0
    score[exclude] = 0
    return score


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_rows_for_returns_the_best_rows_by_their_rare_words(budget):
    words = _bank()
    post = Postings.build(words, chunk=128)  # several chunks
    g = torch.Generator().manual_seed(1)
    questions = words[torch.randint(0, len(words), (20,), generator=g)].clone()
    questions[:, 0] = 10_000  # a word no row contains: never listed, never counted
    exclude = torch.randint(0, len(words), (20, 5), generator=g)
    got = post.rows_for(questions, budget, exclude, words, first_in_row(words))
    assert got.shape == (20, budget)
    for b in range(20):
        found = [int(r) for r in got[b] if r >= 0]
        score = _scores(words, questions[b], exclude[b])
        eligible = int((score > 0).sum())
        assert len(found) == len(set(found)) == min(budget, eligible)
        if found:
            rest = score.clone()
            rest[found] = 0
            assert score[found].min() >= rest.max() - 1e-4  # the best by weight, ties aside
    assert (got >= 0).any(), "some question names a word rare enough for the budget"


def test_edits_are_listed_at_once_and_after_a_merge(monkeypatch):
    words = _bank()
    post = Postings.build(words)
    monkeypatch.setattr(Postings, "MERGE_AT", 40)  # merge a few times during the edits
    g = torch.Generator().manual_seed(2)
    for step in range(30):
        row = int(torch.randint(0, len(words) + 1, (1,), generator=g))
        new = torch.randint(1, 400, (words.shape[1],), generator=g)
        new[0] = 5000 + step  # a word that only this edit brings
        if row == len(words):
            words = torch.cat([words, new[None]])
        else:
            words[row] = new
        post.add(row, new)
        q = torch.full((1, 4), NO_WORD)
        q[0, 0] = 5000 + step
        assert post.rows_for(q, 8, torch.full((1, 1), -1), words, first_in_row(words))[0, 0] == row
    # Every row that contains a word is listed under it; stale entries are allowed, missing ones not.
    for w in torch.unique(words[:, :3]).tolist()[:50]:
        if w != NO_WORD:
            assert all(post.lists(w, r) for r in (words == w).any(1).nonzero().flatten().tolist()), w


def test_an_empty_bank_lists_nothing():
    words = torch.zeros(0, 3, dtype=torch.long)
    post = Postings.build(words)
    got = post.rows_for(torch.tensor([[3, 4]]), 4, torch.full((1, 1), -1), words, first_in_row(words))
    assert (got == -1).all()
    words = torch.tensor([[3, 0, 0]])
    post.add(0, words[0])
    assert post.rows_for(torch.tensor([[3, 4]]), 4, torch.full((1, 1), -1), words, first_in_row(words))[0, 0] == 0


def test_edits_that_keep_a_subject_do_not_lengthen_its_list():
    """A row edited again and again keeps its subject: its list must not grow past the budget."""
    words = _bank()
    post = Postings.build(words)
    subject = 9_000_000
    words[7, 0] = subject
    post.add(7, words[7])
    for step in range(300):
        old = words[7].clone()
        words[7, 1] = 10 + step % 50  # another object, the same subject
        post.add(7, words[7], old)
    assert len(post.side) <= 60
    got = post.rows_for(torch.tensor([[subject]]), 4, torch.full((1, 1), -1), words, first_in_row(words))
    assert got[0, 0] == 7 and (got[0, 1:] == -1).all()


def test_a_rare_word_is_not_outweighed_by_the_first_rows_of_long_lists():
    """Long lists are read in part (their first rows by number). Rows on those parts share the
    question's common words, but a row found through a rare word must be scored on all it holds,
    not only on the lists it was read from, or three common words outweigh one rare one."""
    common = (11, 12, 13)
    n = 5000
    words = torch.zeros(n, 6, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)  # each row's own name, listed once
    words[:300, 1:4] = torch.tensor(common)  # the first 300 rows, more than a part: all three common words
    own = 4000
    words[own, 0], words[own, 1] = 99, common[0]  # the asked row: the rare word and one common one
    post = Postings.build(words)
    q = torch.tensor([[99, *common]])
    got = post.rows_for(q, 1, torch.full((1, 1), -1), words, first_in_row(words))
    assert got[0, 0] == own


def test_the_rarest_words_list_is_read_past_the_other_lists_share():
    """A question whose rarest word is on more rows than PER_WORD: its row, past the first PER_WORD of
    that list and of every other, is still read (the rarest's up to RAREST_WORD) and ranks first."""
    n = 3000
    words = torch.zeros(n, 4, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    rarest, everywhere, second = 99, 77, 55
    words[:PER_WORD, 1] = rarest
    words[2000:2300, 1] = rarest  # the rarest word: on PER_WORD + 300 rows, fewer than RAREST_WORD
    assert PER_WORD + 300 <= RAREST_WORD
    words[:, 2] = everywhere
    words[1000:1400, 3] = second  # the second-rarest word, on rows before the asked one
    own = 2100  # past the first PER_WORD rows of both lists
    words[own, 3] = second
    post = Postings.build(words)
    q = torch.tensor([[rarest, everywhere, second]])
    got = post.rows_for(q, 1, torch.full((1, 1), -1), words, first_in_row(words))
    assert got[0, 0] == own


def test_a_rare_question_word_the_row_lacks_does_not_cut_the_subject_s_list_short():
    """The question's rarest word is one statements seldom hold ("did"), on fewer rows, none of them
    the asked one; the subject's word comes second, on more rows than PER_WORD, with the asked row
    past the first PER_WORD of it. That list is read deep too, and the row ranks first."""
    n = 3000
    words = torch.zeros(n, 4, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    did, subject, relation, everywhere = 99, 55, 123, 77
    words[2500:2700, 1] = did  # on 200 rows, not the asked one
    words[1000 : 1000 + PER_WORD + 200, 2] = subject
    own = 1000 + PER_WORD + 100
    words[:600, 1] = relation  # the relation's word: more rows than the subject's, the asked one past them
    words[own, 1] = relation
    words[:, 3] = everywhere
    post = Postings.build(words)
    q = torch.tensor([[did, subject, relation, everywhere]])
    assert DEEP >= 2 and PER_WORD + 200 <= RAREST_WORD
    got = post.rows_for(q, 1, torch.full((1, 1), -1), words, first_in_row(words))
    assert got[0, 0] == own
