import torch

from explicitlm.words import NO_WORD, token_word_ids, word_id, word_vectors, words


def test_words_meet_whatever_their_spelling():
    # Case, accents, a possessive and an English inflection: the same word id.
    assert word_id("Paris") == word_id("paris") == word_id("PARIS")
    assert word_id("São") == word_id("Sao")
    assert word_id("speaks") == word_id("speak") and word_id("died") == word_id("die")
    assert word_id("Paris") != word_id("Rome")
    found = words("Where was Jean Rotrou born? ____ São Paulo's")
    assert [w for _, _, w in found] == [
        word_id(x) for x in ("where", "was", "jean", "rotrou", "born", "sao", "paulo", "s")
    ]
    assert all(w != NO_WORD for _, _, w in found)  # and the cloze blank is no word


def test_tokens_carry_their_words_id_at_any_position(tokenizer):
    """A subject opening a text, standing mid-sentence or lower-cased tokenises three ways; its tokens
    carry the same word ids in all three."""
    ids = {}
    for text in ("Knesset applies to Israel.", "Which country does the Knesset apply to?", "the knesset"):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        per_token = token_word_ids(text, enc["offset_mapping"])
        ids[text] = {w for w in per_token if w != NO_WORD}
    assert all(word_id("Knesset") in v for v in ids.values())
    # Markup outside the given spans is no word: only the question's own words count.
    text = "<|im_start|>user\nWhere is Oslo?<|im_end|>"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index("Where")
    got = {w for w in token_word_ids(text, enc["offset_mapping"], [(start, start + len("Where is Oslo?"))])} - {NO_WORD}
    assert got == {word_id("where"), word_id("is"), word_id("Oslo")}


def test_word_vectors_are_fixed_signs_with_near_orthogonal_pairs():
    ids = torch.tensor([word_id(f"word{i}") for i in range(400)])
    v = word_vectors(ids, 256, seed=0)
    assert v.shape == (400, 256) and torch.allclose(v.abs(), torch.full_like(v, 256**-0.5))
    assert torch.equal(v, word_vectors(ids, 256, seed=0)) and not torch.equal(v, word_vectors(ids, 256, seed=1))
    cos = (v @ v.T).fill_diagonal_(0)
    assert cos.abs().max() < 0.35 and cos.pow(2).mean().sqrt() < 1.5 / 16  # about N(0, 1/256)
