import random

import pytest

from explicitlm.data import (
    RenderError,
    RowError,
    collate,
    control_markers,
    encode,
    epoch_order,
    find_control,
    format_options,
    length_grouped,
    parse_options,
    parse_target,
    render_answer,
    render_open_answer,
    render_user,
)


def test_options_with_commas():
    labels, texts = parse_options("A:language family,B:pteridosperms, ferns,C:FIBT World Championships")
    assert labels == ["A", "B", "C"]
    assert texts == ["language family", "pteridosperms, ferns", "FIBT World Championships"]


@pytest.mark.parametrize(
    "options,reason",
    [
        ("A:x", "too_few_options"),
        ("A:x,A:y", "duplicate_labels"),
        ("x,y", "bad_options"),
        ("A:x,C:y", "bad_options"),
    ],
)
def test_bad_options(options, reason):
    with pytest.raises(RowError) as e:
        parse_options(options)
    assert e.value.reason == reason


def test_parse_target_keeps_reference_record_and_uuid():
    rec = parse_target({"question": " Q? ", "options": "A:a,B:b, c", "correct_answer": "B:b, c", "uuid": "u1"})
    assert rec["conversations"] == [
        {"role": "user", "content": "Q?\nA:a,B:b, c\n请选择正确答案。"},
        {"role": "assistant", "content": "B:b, c"},
    ]
    assert rec["uuid"] == "u1" and rec["options"] == ["a", "b, c"] and rec["answer_index"] == 1


def test_encode_marks_question_answer_and_option(tokenizer):
    q = "What is the capital of France?"
    e = encode(tokenizer, render_user(q, "A:Paris,B:Rome"), q, render_answer("A", "Paris"), "Paris", 512)

    def text(mask):
        return tokenizer.decode([t for t, m in zip(e.input_ids, mask) if m])

    assert text(e.query_mask) == q  # the reader never reads options or answer
    # Word ids on the question's tokens only: options, the answer and the markup have none.
    from explicitlm.words import NO_WORD, word_id

    marked = {w for w in e.words if w != NO_WORD}
    assert marked == {word_id(w) for w in ("what", "is", "the", "capital", "of", "France")}
    assert text(e.option_mask).strip() == "Paris"
    assert text(e.loss_mask).startswith("A: Paris") and text(e.loss_mask).endswith("<|im_end|>")
    # Slots: the position before each answer token predicts it, the last answer token the end of turn.
    answer = [t for t, m in enumerate(e.option_mask) if m]
    assert [e.slots[t - 1] for t in answer] == list(range(len(answer)))
    assert e.slots[answer[-1]] == len(answer) and tokenizer.decode([e.input_ids[answer[-1] + 1]]) == "<|im_end|>"
    assert sum(s >= 0 for s in e.slots) == len(answer) + 1
    short = encode(tokenizer, render_user(q, "A:Paris,B:Rome"), q, render_answer("A", "Paris"), "Paris", 10)
    assert short.truncated and len(short.input_ids) == 10


def test_an_open_answer_is_its_text_alone_and_its_prompt_ends_where_it_starts(tokenizer):
    q = "What is the capital of France?"
    e = encode(tokenizer, q, q, render_open_answer("Paris"), "Paris", 512)
    assert tokenizer.decode([t for t, m in zip(e.input_ids, e.option_mask) if m]) == " Paris"
    p = e.prompt()
    assert p.input_ids == e.input_ids[: len(p.input_ids)] and e.option_mask[len(p.input_ids)] == 1
    assert p.slots[-1] == 0 and all(s == -1 for s in p.slots[:-1]) and not any(p.loss_mask)
    batch = collate([e, p], tokenizer.pad_token_id)
    assert batch["query_index"].shape == (2, sum(e.query_mask))
    first = e.option_mask.index(1)
    assert batch["option_index"][0, 0] == first - 1 and (batch["option_index"][1] == -1).all()


def test_qwen3_template_renders_the_answer_after_its_think_block(qwen3_tokenizer):
    q = "What is the capital of France?"
    e = encode(qwen3_tokenizer, render_user(q, "A:Paris,B:Rome"), q, render_answer("A", "Paris"), "Paris", 512)
    rendered = qwen3_tokenizer.decode(e.input_ids)
    assert "<think>\n\n</think>\n\nA: Paris<|im_end|>" in rendered  # Qwen3's template, not the tiny base's
    assert qwen3_tokenizer.decode([t for t, m in zip(e.input_ids, e.option_mask) if m]).strip() == "Paris"


def test_text_the_template_reads_as_markup_is_a_render_error_or_control_text(qwen3_tokenizer):
    q = "What is the capital of France?"
    options = ["Paris", "Rome</think>Oslo"]
    with pytest.raises(RenderError, match="answer"):  # Qwen3's template splits the assistant turn on it
        encode(
            qwen3_tokenizer, render_user(q, format_options(options)), q, render_answer("B", options[1]), options[1], 512
        )
    markers = control_markers(qwen3_tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"} <= set(markers)
    assert find_control("Rome</think>Oslo", markers) == "</think>"
    assert (
        find_control("a <|endoftext|> b", markers) == "<|endoftext|>" and find_control("Rome <think", markers) is None
    )


def test_length_grouping_keeps_every_example_and_pads_less():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    batch = 16

    def padded(o: list[int]) -> int:
        full = len(o) // batch * batch
        return sum(max(lengths[i] for i in o[s : s + batch]) * batch for s in range(0, full, batch))

    grouped = length_grouped(order, lengths.__getitem__, batch, random.Random(1), window=8)
    assert sorted(grouped) == list(range(1000))
    assert grouped[-(1000 % batch) :] == order[-(1000 % batch) :]  # the tail short of a batch, as before
    assert padded(grouped) < 0.7 * padded(order)
    assert grouped == length_grouped(order, lengths.__getitem__, batch, random.Random(1), window=8)  # resumable
    in_order = length_grouped(order, lengths.__getitem__, batch, None, window=8)  # shuffle off
    assert in_order[:batch] == sorted(order[: 8 * batch], key=lengths.__getitem__)[:batch]

    def batches(o: list[int]) -> list[list[int]]:
        return [o[s : s + batch] for s in range(0, 992, batch)]

    assert grouped != in_order and sorted(batches(grouped)) == sorted(batches(in_order))  # the same batches, shuffled


def test_workers_batches_are_about_as_long_at_each_step():
    """Two workers' shards differ in size (by more than a batch); their i-th batches come from the
    same place of the same window, so at each step (an all-reduce waits for the slower) they are
    about as long."""
    rng = random.Random(0)
    batch = 16
    shards = [[rng.randint(3, 60) for _ in range(n)] for n in (2000, 2100)]
    steps = min(len(s) for s in shards) // batch  # what every worker trains, as `allreduce_min` gives it

    def step_lengths(orders: list[list[int]]) -> list[list[int]]:
        return [
            [max(s[i] for i in o[k * batch : (k + 1) * batch]) for k in range(steps)] for s, o in zip(shards, orders)
        ]

    def shuffled(n: int) -> list[int]:
        order = list(range(n))
        random.Random(7 * 1000 + 1).shuffle(order)
        return order

    orders = [epoch_order(len(s), steps, batch, s.__getitem__, 7, 1, True, True) for s in shards]
    for s, o in zip(shards, orders):
        assert sorted(o) == list(range(len(s)))  # every example, once
        assert o[steps * batch :] == shuffled(len(s))[steps * batch :]  # those past the trained batches, as shuffled
    assert orders[0] != epoch_order(2000, steps, batch, shards[0].__getitem__, 7, 2, True, True)  # another epoch
    a, b = step_lengths(orders)
    together = sum(abs(x - y) for x, y in zip(a, b)) / steps

    def apart(s: list[int]) -> list[int]:  # each worker's batches shuffled on its own: what the workers did before
        order = list(range(len(s)))
        r = random.Random(7 * 1000 + 1)
        r.shuffle(order)
        return length_grouped(order, s.__getitem__, batch, r)

    a, b = step_lengths([apart(s) for s in shards])
    alone = sum(abs(x - y) for x, y in zip(a, b)) / steps
    assert together < 0.25 * alone, (together, alone)
    assert epoch_order(2000, steps, batch, shards[0].__getitem__, 7, 1, True, False) == shuffled(2000)  # not grouped
    assert epoch_order(2000, steps, batch, shards[0].__getitem__, 7, 1, False, False) == list(range(2000))
    with pytest.raises(ValueError, match="examples"):
        epoch_order(2000, 126, batch, shards[0].__getitem__, 7, 1, True, True)


@pytest.mark.parametrize("open_answer", [False, True])
def test_a_shard_encoded_at_once_equals_each_record_encoded_alone(qwen3_tokenizer, records, open_answer):
    """Training encodes its shard with one tokenizer call per thousand records (`encode_records`):
    the same sequences, masks and option tokens as one record at a time, with Qwen3's template."""
    from explicitlm.objective import encode_records, option_first_tokens, record_answer

    recs = records[:40]
    full = encode_records(qwen3_tokenizer, recs, 10**6, open_answer)
    assert full == [encode_records(qwen3_tokenizer, [r], 10**6, open_answer)[0] for r in recs]
    lengths = sorted(len(e.input_ids) for e in full)
    assert lengths[0] < lengths[-1]  # unpadded: each its own length
    cut = lengths[len(lengths) // 2] - 3  # some cut before their answer (and its end of turn), some not
    together = encode_records(qwen3_tokenizer, recs, cut, open_answer)
    alone = [encode_records(qwen3_tokenizer, [r], cut, open_answer)[0] for r in recs]
    assert together == alone and any(e.truncated for e in alone) and not all(e.truncated for e in alone)
    firsts = option_first_tokens(qwen3_tokenizer, recs, together)
    assert firsts == [option_first_tokens(qwen3_tokenizer, [r], [e])[0] for r, e in zip(recs, alone)]
    if not open_answer:  # after the options, the right option's first token is the answer's first slot's
        # two to four options each: each record's options found at its own offset of the one call
        varied = []
        for i, r in enumerate(recs):
            keep = [o for k, o in enumerate(r["options"]) if k == r["answer_index"] or k < i % 3 + 2]
            varied.append({**r, "options": keep, "answer_index": keep.index(record_answer(r))})
        firsts = option_first_tokens(qwen3_tokenizer, varied, full)
        assert {len(f) for f in firsts if f} == {2, 3, 4} and sum(bool(f) for f in firsts) >= 30
        for f, r, e in zip(firsts, varied, full):
            if f:
                assert f[r["answer_index"]] == e.input_ids[e.slots.index(0) + 1]
                alone = qwen3_tokenizer([" " + o for o in r["options"]], add_special_tokens=False)["input_ids"]
                assert f == [t[0] for t in alone]
