"""OMCQ questions: parsing, the one prompt renderer, SFT records and tokenisation.

Every part of the project (conversion, training, evaluation, serving) renders prompts and parses
option strings through this module, so a question reads the same everywhere.

Letters: B batch, T tokens.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


PROMPT_SUFFIX = "请选择正确答案。"
LABELS = string.ascii_uppercase
# Option text can contain commas: a new option starts only where ",X:" follows.
_OPTION_SPLIT = re.compile(r",(?=[A-Z]:)")
_OPTION = re.compile(r"^([A-Z]):(.*)$", re.S)


# Text that a chat template reads as structure, not content: Qwen3's turn markers, and its think
# markers, on which its template splits an assistant turn (an option holding "</think>" would lose
# the text before it). A tokenizer's own added tokens are control text too (`control_markers`).
CONTROL_TEXT = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


class RenderError(ValueError):
    """A question or option that the chat template does not render verbatim, so its tokens cannot
    be located in the prompt: that question cannot be scored (the others of its batch can)."""


def control_markers(tokenizer: Any = None) -> tuple[str, ...]:
    """CONTROL_TEXT and every added token of `tokenizer` (its special tokens among them): strings
    that the tokenizer reads as one control token wherever they appear in user text."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(dict.fromkeys([*CONTROL_TEXT, *(str(getattr(t, "content", t)) for t in added.values())]))


def find_control(text: str, markers: tuple[str, ...] = CONTROL_TEXT) -> str | None:
    """The first control marker `text` contains, or None."""
    return next((m for m in markers if m and m in text), None)


class RowError(ValueError):
    """A malformed OMCQ row; `reason` is a short stable key used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_options(options: str) -> tuple[list[str], list[str]]:
    """'A:x,B:y, z' -> (['A', 'B'], ['x', 'y, z']). Labels must run A, B, C, ... in order."""
    labels, texts = [], []
    for part in _OPTION_SPLIT.split(options.strip()):
        part = part.strip()
        if len(part) < 2 or part[1] != ":" or not "A" <= part[0] <= "Z":
            raise RowError("bad_options", f"cannot parse option {part[:60]!r}")
        labels.append(part[0])
        texts.append(part[2:].strip())
    n = len(labels)
    if n < 2:
        raise RowError("too_few_options", f"{n} option(s)")
    if "".join(labels) != LABELS[:n]:
        if len(set(labels)) != n:
            raise RowError("duplicate_labels", ",".join(labels))
        raise RowError("bad_options", f"labels {''.join(labels)} are not A, B, C, ... in order")
    if not all(texts):
        raise RowError("bad_options", "empty option text")
    return labels, texts


def format_options(texts: list[str]) -> str:
    """['x', 'y'] -> 'A:x,B:y' (the reference's option string)."""
    return ",".join(f"{LABELS[i]}:{t}" for i, t in enumerate(texts))


def render_user(question: str, options: str) -> str:
    """The user turn of the reference SFT record; a question without options is asked as it is."""
    return f"{question}\n{options}\n{PROMPT_SUFFIX}" if options else question


def render_answer(label: str, text: str) -> str:
    """The assistant turn of a multiple-choice answer, as the model is trained on and scored with.

    A space follows the colon so that the option's first word tokenises as it does inside a memory
    sentence (" Paris", not "Paris"): fusion writes the retrieved row's tokens, so answer and memory
    must share tokens. Records on disk keep the reference's "A:text".
    """
    return f"{label}: {text}"


def render_open_answer(text: str) -> str:
    """The assistant turn of an answer without options: the answer's text alone, after a space for
    the same reason as in `render_answer`."""
    return f" {text}"


def parse_target(target: Any) -> dict[str, Any]:
    """One OMCQ target object -> a converted record; raises RowError naming what is wrong."""
    if not isinstance(target, dict):
        raise RowError("not_an_object", type(target).__name__)
    fields = {}
    for key in ("question", "options", "correct_answer"):
        value = target.get(key)
        if value is None:
            raise RowError(f"missing_{key}")
        if not isinstance(value, str):
            raise RowError(f"bad_{key}_type", type(value).__name__)
        if not value.strip():
            raise RowError(f"empty_{key}")
        fields[key] = value.strip()
    labels, texts = parse_options(fields["options"])
    answer = fields["correct_answer"]
    m = _OPTION.match(answer)
    if m is None or m.group(1) not in labels or texts[labels.index(m.group(1))] != m.group(2).strip():
        raise RowError("answer_not_in_options", answer[:80])
    uuid = target.get("uuid")
    record = {
        "conversations": [
            {"role": "user", "content": render_user(fields["question"], fields["options"])},
            {"role": "assistant", "content": answer},
        ],
        "uuid": "" if uuid is None else str(uuid),
        "question": fields["question"],
        "options": texts,
        "answer_index": labels.index(m.group(1)),
    }
    for extra in ("subject", "predicate"):
        record[extra] = str(target.get(extra) or "")
    return record


def iter_targets(item: Any):
    """One top-level OMCQ item -> its target objects (every target is a question)."""
    if not isinstance(item, dict):
        raise RowError("not_an_object", type(item).__name__)
    targets = item.get("target")
    if targets is None:
        raise RowError("missing_target")
    if not isinstance(targets, list):
        targets = [targets]
    if not targets:
        raise RowError("empty_target")
    return targets


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # assistant tokens (answer and end of turn): trained on
    option_mask: list[int]  # the answer's text inside the assistant turn: scored
    query_mask: list[int]  # the question: what the memory reader reads
    words: list[int]  # each question token's word id (`explicitlm.words`), NO_WORD elsewhere
    slots: list[int]  # the answer slot each position predicts: its text's tokens, then the end of turn; -1 elsewhere

    @property
    def truncated(self) -> bool:
        return not any(self.option_mask)

    def prompt(self) -> Encoded:
        """The sequence up to the answer's text, ready to generate it: the last position predicts slot 0."""
        cut = self.option_mask.index(1) if any(self.option_mask) else len(self.input_ids)
        out = Encoded(*(getattr(self, f.name)[:cut] for f in dataclass_fields(Encoded)))
        out.loss_mask = [0] * cut
        out.option_mask = [0] * cut
        out.slots = [-1] * cut
        if cut:
            out.slots[-1] = 0
        return out


def split_prompt(e: Encoded) -> tuple[Encoded, Encoded]:
    """A training sequence cut where its answer starts being predicted: (the prompt, the answer).

    The answer part begins at the position whose next token is the first one trained on, so every
    loss position and answer slot is in it; the prompt part holds the question. Training runs the
    prompt without gradients (`ExplicitLM.answer_forward`)."""
    cut = max(e.loss_mask.index(1) - 1, 1) if any(e.loss_mask) else len(e.input_ids)
    head, tail = (
        Encoded(*(getattr(e, f.name)[a:b] for f in dataclass_fields(Encoded))) for a, b in ((0, cut), (cut, None))
    )
    return head, tail


def _span_mask(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    return [int(s < end and e > start and e > s) for s, e in offsets]


def encode(tokenizer: Any, user: str, question: str, answer: str, text: str, max_seq_len: int) -> Encoded:
    """Chat-template a question and one answer; mark which tokens are question and answer.

    `user` is the rendered user turn, which starts with `question` (and may list options after
    it); `answer` is the rendered assistant turn (`render_answer`, `render_open_answer`), which ends
    with `text`, the answer's own text: memory fills its slots. The memory reader reads the question
    only: options name distractors, and they are not evidence. The chat template of the backbone's
    tokenizer is applied to the whole conversation, then token offsets locate the spans, so a real
    Qwen3 template (think blocks and all) works unchanged. Sequences longer than `max_seq_len` are
    cut on the right; a record whose answer text is cut reports `truncated`. A question or answer
    the template does not render verbatim raises RenderError.
    """
    return encode_many(tokenizer, [(user, question, answer, text)], max_seq_len)[0]


def encode_many(tokenizer: Any, turns: Sequence[tuple[str, str, str, str]], max_seq_len: int) -> list[Encoded]:
    """`encode` of many (user, question, answer, text) at once: the tokenizer is called once for
    all of them, which is most of what encoding a training shard costs."""
    from explicitlm.words import token_word_ids

    rendered, starts = [], []
    for user, _, answer, _ in turns:
        r = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
        )
        q_start = r.find(user)
        a_start = r.rfind(answer)
        if q_start < 0 or a_start < q_start + len(user):
            raise RenderError(
                f"the chat template does not render the {'question' if q_start < 0 else 'answer'} as written "
                "(it reads part of the text as its own markup)"
            )
        rendered.append(r)
        starts.append((q_start, a_start))
    if not rendered:
        return []
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, question, answer, text), r, (q_start, a_start), ids, offsets in zip(
        turns, rendered, starts, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        offsets = [tuple(o) for o in offsets]
        ids = list(ids)
        o_start = a_start + len(answer) - len(text)
        answer_mask = _span_mask(offsets, a_start, a_start + len(answer))
        option_mask = _span_mask(offsets, o_start, a_start + len(answer))
        last = max(i for i, m in enumerate(answer_mask) if m)
        if last + 1 < len(ids):  # the end-of-turn token teaches the model where the answer stops
            answer_mask[last + 1] = 1
        slots = [-1] * len(ids)
        text_tokens = [i for i, m in enumerate(option_mask) if m]
        for k, i in enumerate(text_tokens):
            if i > 0:
                slots[i - 1] = k
        if text_tokens and text_tokens[-1] + 1 < len(ids):
            slots[text_tokens[-1]] = len(text_tokens)
        words = token_word_ids(r, offsets, [(q_start, q_start + len(question))])
        out.append(
            Encoded(
                input_ids=ids[:max_seq_len],
                loss_mask=answer_mask[:max_seq_len],
                option_mask=option_mask[:max_seq_len],
                query_mask=_span_mask(offsets, q_start, q_start + len(question))[:max_seq_len],
                words=words[:max_seq_len],
                slots=slots[:max_seq_len],
            )
        )
    return out


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of Encoded into (B, T) tensors; and positions, -1 padded: the question's
    (B, Q), which the memory reader reads, and those whose next token is the answer's (B, A) or its
    text's (B, A'), where the loss and the scores need logits. Index tensors of fixed width let the
    model gather without asking the device how many there are."""
    import torch  # here, not at import: conversion workers parse rows and never need it

    T = max(len(e.input_ids) for e in examples)

    def pad(rows: list[list[int]], value: int, width: int = T) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def predicting(mask: list[int]) -> list[int]:  # positions whose next token is marked
        return [t for t in range(len(mask) - 1) if mask[t + 1]]

    def index(rows: list[list[int]]) -> torch.Tensor:  # (B, width), -1 padded
        return pad(rows, -1, max(max(len(r) for r in rows), 1))

    asked = [[t for t, m in enumerate(e.query_mask) if m] for e in examples]
    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),  # (B, T)
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
        "loss_mask": pad([e.loss_mask for e in examples], 0),
        "option_mask": pad([e.option_mask for e in examples], 0),
        "query_index": index(asked),  # (B, Q)
        "loss_index": index([predicting(e.loss_mask) for e in examples]),  # (B, A) positions predicting the answer
        "option_index": index([predicting(e.option_mask) for e in examples]),  # (B, A') ... its text
        "words": pad([e.words for e in examples], 0),
        "slots": pad([e.slots for e in examples], -1),
    }


def length_grouped(
    order: list[int], key: Callable[[int], Any], batch: int, rng: random.Random | None, window: int = 64
) -> list[int]:
    """`order` rearranged so that each run of `batch` holds examples of about the same `key`
    (lengths): its full batches' examples sorted within windows of `window` batches, then the
    batches shuffled by `rng` (None: left in order). The tail short of a batch stays last, as in
    `order`."""
    full = len(order) // batch * batch
    size = batch * window
    flat = [i for s in range(0, full, size) for i in sorted(order[s : min(s + size, full)], key=key)]
    batches = [flat[s : s + batch] for s in range(0, full, batch)]
    if rng is not None:
        rng.shuffle(batches)
    return [i for b in batches for i in b] + order[full:]


def epoch_order(
    n: int, batches: int, batch: int, key: Callable[[int], Any], seed: int, epoch: int, shuffle: bool, group: bool
) -> list[int]:
    """One worker's order of its `n` examples in an epoch whose first `batches` runs of `batch` are
    trained: shuffled with (seed, epoch) when `shuffle` is; with `group`, those batches' examples
    grouped by `key` (`length_grouped`) and the batches shuffled by an rng that does not depend on
    `n`. Workers are given the same `batches` (their shards' smallest), so their i-th batches come
    from the same place of the same window: about as long, and neither waits long for the other at
    the gradients' all-reduce."""
    order = list(range(n))
    rng = random.Random(seed * 1000 + epoch)
    if shuffle:
        rng.shuffle(order)
    if not group:
        return order
    used = batches * batch
    if used > n:
        raise ValueError(f"{batches} batches of {batch} need {used} examples; this worker has {n}")
    batch_rng = random.Random(f"batches:{seed}:{epoch}") if shuffle else None
    return length_grouped(order[:used], key, batch, batch_rng) + order[used:]
