"""Inverted lists: the rows a question's rarest words name, equal to a scan of the bank, under edits."""

import pytest
import torch

import explicitlm.postings as lists_module
from explicitlm.postings import FLOOR, READ, Postings
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
    WORDS rarest listed words (each list's first FLOOR rows, then the rest of READ to the lists in
    order of rarity, each to its end or until READ is spent), each scored by the summed weight of all
    the question's words it contains. Returns the scores (0: not read, or excluded) and, for each
    list, the rows read from it with their scores."""
    import math

    m = lists_module
    distinct = sorted({int(w) for w in q if int(w) != NO_WORD})
    has = {w: (words == w).any(1) for w in distinct}
    df = {w: int(has[w].sum()) for w in distinct}
    chosen = [w for w in sorted(distinct, key=lambda w: (df[w], w)) if df[w]][: m.WORDS]
    spare = m.READ - sum(min(df[w], m.FLOOR) for w in chosen)
    score = torch.zeros(len(words))
    for w in distinct:
        if df[w]:
            score += has[w].float() * (math.log((len(words) + 1) / (df[w] + 1)) + 1)
    read = []
    for w in chosen:
        more = min(df[w] - min(df[w], m.FLOOR), max(spare, 0))
        spare -= more
        read.append(has[w].nonzero().flatten()[: min(df[w], m.FLOOR) + more])
    listed = torch.zeros(len(words), dtype=torch.bool)
    for rows in read:
        listed[rows] = True
    score = score * listed
    score[exclude] = 0
    return score, [(rows, score[rows]) for rows in read]


@pytest.mark.parametrize("budget", [1, 4, 16, 64])
@pytest.mark.parametrize("read", [(READ, FLOOR), (300, 20)], ids=["lists-whole", "lists-cut"])
def test_rows_for_keeps_each_list_s_best_and_then_the_best_by_weight(budget, read, monkeypatch):
    """Against the brute force: each picked word's QUOTA best rows (ties aside) are returned when the
    budget holds them, and the rest of the budget goes to the best rows by weight."""
    monkeypatch.setattr(lists_module, "READ", read[0])  # the second: most lists read only in part
    monkeypatch.setattr(lists_module, "FLOOR", read[1])
    quota = lists_module.QUOTA
    words = _bank()
    post = Postings.build(words, chunk=128)  # several chunks
    g = torch.Generator().manual_seed(1)
    pairs = torch.randint(0, len(words), (20, 2), generator=g)
    questions = words[pairs].flatten(1).clone()  # two rows' words: often more than WORDS listed ones
    questions[:, 0] = 10_000  # a word no row contains: never listed, never counted
    assert max(len(set(q.tolist()) - {NO_WORD, 10_000}) for q in questions) > lists_module.WORDS
    exclude = torch.randint(0, len(words), (20, 5), generator=g)
    got = post.rows_for(questions, budget, exclude)
    assert got.shape == (20, budget)
    for b in range(20):
        found = [int(r) for r in got[b] if r >= 0]
        score, per_list = _scores(words, questions[b], exclude[b])
        eligible = int((score > 0).sum())
        assert len(found) == len(set(found)) == min(budget, eligible)
        assert all(score[r] > 0 for r in found)
        must, may = set(), set()  # each list's best: above its QUOTA-th score, and at it (a tie)
        for rows, s in per_list:
            nth = s.sort(descending=True).values[quota - 1] if len(s) >= quota else torch.tensor(0.0)
            must |= {int(r) for r, v in zip(rows, s) if v > nth and score[r] > 0}
            may |= {int(r) for r, v in zip(rows, s) if v >= nth and score[r] > 0}
        if len(may) <= budget:  # every list's best fit
            assert must <= set(found), sorted(must - set(found))
            rest = score.clone()
            rest[list(may | set(found))] = 0
            others = [r for r in found if r not in may]
            if others:
                assert score[others].min() >= rest.max() - 1e-4  # then the best by weight, ties aside
        elif len(must) > budget:  # the budget is spent on lists' best rows
            assert set(found) <= may
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
        assert post.rows_for(q, 8, torch.full((1, 1), -1))[0, 0] == row
    # Every row that contains a word is listed under it; stale entries are allowed, missing ones not.
    for w in torch.unique(words[:, :3]).tolist()[:50]:
        if w != NO_WORD:
            assert all(post.lists(w, r) for r in (words == w).any(1).nonzero().flatten().tolist()), w


def test_an_empty_bank_lists_nothing():
    words = torch.zeros(0, 3, dtype=torch.long)
    post = Postings.build(words)
    got = post.rows_for(torch.tensor([[3, 4]]), 4, torch.full((1, 1), -1))
    assert (got == -1).all()
    words = torch.tensor([[3, 0, 0]])
    post.add(0, words[0])
    assert post.rows_for(torch.tensor([[3, 4]]), 4, torch.full((1, 1), -1))[0, 0] == 0


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
    got = post.rows_for(torch.tensor([[subject]]), 4, torch.full((1, 1), -1))
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
    got = post.rows_for(q, 1, torch.full((1, 1), -1))
    assert got[0, 0] == own


def test_the_rarest_words_list_is_read_past_the_floor():
    """A question whose rarest word is on more rows than FLOOR: its row, past the first FLOOR of that
    list and of every other, is still read (the budget goes to the rarest list first) and ranks first."""
    n = 3000
    words = torch.zeros(n, 4, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    rarest, everywhere, second = 99, 77, 55
    words[:FLOOR, 1] = rarest
    words[2000:2300, 1] = rarest  # the rarest word: on FLOOR + 300 rows
    words[:, 2] = everywhere
    words[1000:1400, 3] = second  # the second-rarest word, on rows before the asked one
    own = 2100  # past the first FLOOR rows of both lists
    words[own, 3] = second
    post = Postings.build(words)
    q = torch.tensor([[rarest, everywhere, second]])
    got = post.rows_for(q, 1, torch.full((1, 1), -1))
    assert got[0, 0] == own


def test_rare_question_words_the_row_lacks_cost_only_their_length():
    """The question's rarest words are ones statements seldom hold ("did", "hold"), on short lists
    without the asked row; the relation's and the subject's words come after them, on many more rows
    than FLOOR, with the asked row far down both lists. The short lists take only their length of the
    budget, the next ones are read on to their ends, and the row ranks first."""
    n = 6000
    words = torch.zeros(n, 6, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    did, hold, new, wales, relation, everywhere = 98, 99, 55, 56, 123, 77
    words[4000:4200, 1] = did  # on 200 rows, not the asked one
    words[4200:4300, 1] = hold  # on 100
    words[1000:3000, 2] = new  # the subject's two words, on 2,000 rows each
    words[1500:3500, 3] = wales
    own = 2900
    words[:900, 4] = relation  # the relation's word: on 901 rows, the asked one last
    words[own, 4] = relation
    words[:, 5] = everywhere
    post = Postings.build(words)
    q = torch.tensor([[did, hold, new, wales, relation, everywhere]])
    assert 200 + 100 + 901 <= READ and 900 > 2 * FLOOR  # the row far past any floor
    got = post.rows_for(q, 1, torch.full((1, 1), -1))
    assert got[0, 0] == own


def test_a_subject_s_only_row_is_kept_over_rows_with_more_of_the_question_s_template_words():
    """A question like "Which territorial unit governs Jasrota?": the subject's word is on one row, the asked one;
    150 rows hold the three template words, which together outweigh the subject's. Each list's best
    rows are kept whatever the other lists' rows score, so the asked row is returned with them."""
    n = 3000
    words = torch.zeros(n, 5, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    subject, which, unit, governs = 99, 11, 12, 13
    words[500:650, 1:4] = torch.tensor([which, unit, governs])
    own = 2000
    words[own, 4] = subject
    post = Postings.build(words)
    q = torch.tensor([[which, unit, governs, subject]])
    got = post.rows_for(q, 4, torch.full((1, 1), -1))
    assert own in got[0].tolist()


@pytest.mark.parametrize("total, floor", [(300, 20), (64, 8), (4096, 128)])
def test_read_prefixes_gives_each_list_its_floor_then_the_rest_in_order(total, floor):
    """Against a greedy reference: every slice's first `floor` entries (or all it has), then the spare
    budget to the slices in order, each to its end; the exact rows read and the slice of each."""
    from explicitlm.postings import Lists

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 200, (30, 8), generator=g)
    lengths[::5] = 0  # some questions with no listed word
    lengths[1::5, ::2] = torch.randint(0, 3, (6, 4), generator=g)  # short lists among long ones
    words = torch.repeat_interleave(torch.arange(8 * 30), lengths.flatten())
    rows = torch.cat([torch.arange(int(n)) * 7 + k for k, n in enumerate(lengths.flatten())])  # ascending in a slice
    lists = Lists(words, rows)
    start, length = lists.lengths(torch.arange(8 * 30).view(30, 8))
    got, which = lists.read_prefixes(start, length, total, floor)
    for b in range(30):
        n = [int(x) for x in length[b]]
        take = [min(x, floor) for x in n]
        spare = total - sum(take)
        for i, x in enumerate(n):
            more = min(x - take[i], spare)
            take[i] += more
            spare -= more
        want = [int(r) for i, x in enumerate(take) for r in lists.rows[int(start[b, i]) : int(start[b, i]) + x]]
        want_which = [i for i, x in enumerate(take) for _ in range(x)]
        assert got[b, : len(want)].tolist() == want and (got[b, len(want) :] == -1).all()
        assert which[b, : len(want)].tolist() == want_which


def test_every_list_s_best_row_comes_before_any_list_s_second():
    """Budget 3, three lists: the rarest word's rows outscore every other list's best, but each list's
    best comes first (one row of each), not the three best by score."""
    n = 6000
    words = torch.zeros(n, 4, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    a, b, c, common = 11, 12, 13, 14
    words[:50, 1] = a  # weight about 5.8: any of these outscores the other lists' best
    words[100:400, 1] = b  # about 4.0
    words[500:1500, 2] = c  # about 2.8
    words[2000:, 3] = common  # about 1.4
    words[600, 3] = common  # c's and common's best: 4.2
    post = Postings.build(words)
    q = torch.tensor([[a, b, c, common]])
    got = post.rows_for(q, 3, torch.full((1, 1), -1))[0].tolist()
    assert 600 in got and sum(r < 50 for r in got) == 1 and sum(100 <= r < 400 for r in got) == 1, got


def test_each_list_keeps_exactly_its_quota_before_the_rest_by_score():
    """Two lists, the rare word's 200 rows all outscoring the common word's: with room for two quotas,
    each list gives QUOTA rows, no more of the rare word's however well they score."""
    quota = lists_module.QUOTA
    n = 6000
    words = torch.zeros(n, 3, dtype=torch.long)
    words[:, 0] = torch.arange(1000, 1000 + n)
    rare, common = 11, 12
    words[:200, 1] = rare
    words[1000:5000, 2] = common
    post = Postings.build(words)
    got = post.rows_for(torch.tensor([[rare, common]]), 2 * quota, torch.full((1, 1), -1))
    assert sum(1000 <= r < 5000 for r in got[0].tolist()) == quota and sum(r < 200 for r in got[0].tolist()) == quota


def test_a_small_bank_reads_no_more_than_its_longest_lists_and_finds_the_same_rows():
    """Below READ entries in its WORDS longest lists, a bank's reads stop there: every question's lists
    still fit whole, and the rows read are those of the full budget (a budget of every row: the same
    set, whatever order ties take)."""
    words = _bank(n=120, vocab=60)
    post = Postings.build(words)
    assert post.main.most < READ
    g = torch.Generator().manual_seed(4)
    questions = words[torch.randint(0, len(words), (30, 2), generator=g)].flatten(1)
    exclude = torch.full((30, 1), -1)
    small = post.rows_for(questions, 128, exclude)
    post.main.most = READ  # the full budget, mostly padding
    full = post.rows_for(questions, 128, exclude)
    assert [set(r.tolist()) for r in small] == [set(r.tolist()) for r in full]


def test_side_lists_are_read_to_their_longest_and_find_what_a_full_read_finds():
    """The side table of recent edits is read SIDE_PER_WORD entries a word at most, and no further than
    its longest list: before the first edit nothing, after a few edits a few; the rows are those a read
    of SIDE_PER_WORD would find."""
    words = _bank()
    post = Postings.build(words)
    assert post.side.longest == 0
    q = torch.tensor([[7001, 7002, 3, NO_WORD]])

    def rows_for():
        return post.rows_for(q, 16, torch.full((1, 1), -1))

    for i in range(3 + lists_module.SIDE_PER_WORD + 5):  # 7001 in every new row, 7002 in the first three
        new = torch.randint(1, 400, (words.shape[1],), generator=torch.Generator().manual_seed(i))
        new[0] = 7001
        new[1] = 7002 if i < 3 else new[1]
        words = torch.cat([words, new[None]])
        post.add(len(words) - 1, new)
        if i in (2, 10, lists_module.SIDE_PER_WORD + 7):
            assert post.side.longest == i + 1
            got = rows_for()  # read to the longest side list (3, 11), or SIDE_PER_WORD past it
            assert {600, 601, 602} <= set(got[0].tolist())  # the rows with both new words, from the side table
            post.side.longest = lists_module.SIDE_PER_WORD  # the full read
            assert torch.equal(got, rows_for())
            post.side.longest = i + 1
