import pytest

from explicitlm.data import (
    RenderError,
    RowError,
    control_markers,
    encode,
    find_control,
    format_options,
    parse_options,
    parse_target,
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
    e = encode(tokenizer, render_user(q, "A:Paris,B:Rome"), q, "A", "Paris", 512, ["Paris", "Rome"])

    def text(mask):
        return tokenizer.decode([t for t, m in zip(e.input_ids, mask) if m])

    assert text(e.query_mask) == q  # the query never reads options or answer
    assert text(e.choices_mask) == "ParisRome"  # the options' text in the prompt, labels left out
    # Word ids on the question's and the options' tokens only: the answer and the markup have none.
    from explicitlm.words import NO_WORD, word_id

    marked = {w for w in e.words if w != NO_WORD}
    assert marked == {word_id(w) for w in ("what", "is", "the", "capital", "of", "France", "Paris", "Rome")}
    assert all(w == NO_WORD for w, m in zip(e.words, e.loss_mask) if m)
    assert text(e.option_mask).strip() == "Paris"
    assert text(e.loss_mask).startswith("A: Paris") and text(e.loss_mask).endswith("<|im_end|>")
    short = encode(tokenizer, render_user(q, "A:Paris,B:Rome"), q, "A", "Paris", 10)
    assert short.truncated and len(short.input_ids) == 10


def test_qwen3_template_renders_the_answer_after_its_think_block(qwen3_tokenizer):
    q = "What is the capital of France?"
    e = encode(qwen3_tokenizer, render_user(q, "A:Paris,B:Rome"), q, "A", "Paris", 512, ["Paris", "Rome"])
    rendered = qwen3_tokenizer.decode(e.input_ids)
    assert "<think>\n\n</think>\n\nA: Paris<|im_end|>" in rendered  # Qwen3's template, not the tiny base's
    assert qwen3_tokenizer.decode([t for t, m in zip(e.input_ids, e.option_mask) if m]).strip() == "Paris"


def test_text_the_template_reads_as_markup_is_a_render_error_or_control_text(qwen3_tokenizer):
    q = "What is the capital of France?"
    options = ["Paris", "Rome</think>Oslo"]
    with pytest.raises(RenderError, match="answer"):  # Qwen3's template splits the assistant turn on it
        encode(qwen3_tokenizer, render_user(q, format_options(options)), q, "B", options[1], 512, options)
    markers = control_markers(qwen3_tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"} <= set(markers)
    assert find_control("Rome</think>Oslo", markers) == "</think>"
    assert (
        find_control("a <|endoftext|> b", markers) == "<|endoftext|>" and find_control("Rome <think", markers) is None
    )
