"""What training optimises: a converted SFT record as its training sequence, the LM loss over the
answer's tokens and the learning-rate schedule.

Letters: B batch, T tokens, V vocabulary, A predicted positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explicitlm.data import LABELS, Encoded, encode, render_answer, render_open_answer
from explicitlm.scoring import Question


def record_question(rec: dict[str, Any], open_answer: bool = False) -> Question:
    """A converted record as a question to score (with its options) or to answer (without)."""
    if open_answer:
        return Question(rec["question"], [])
    return Question(rec["question"], list(rec["options"]), rec["conversations"][0]["content"])


def record_answer(rec: dict[str, Any]) -> str:
    return list(rec["options"])[int(rec["answer_index"])]


def encode_record(tokenizer: Any, rec: dict[str, Any], max_seq_len: int, open_answer: bool = False) -> Encoded:
    """A converted SFT record -> the training sequence of its correct answer: after its options, as
    the reference's letter and text, or (open_answer) after the question alone, as the text alone."""
    text = record_answer(rec)
    if open_answer:
        return encode(tokenizer, rec["question"], rec["question"], render_open_answer(text), text, max_seq_len)
    label = LABELS[int(rec["answer_index"])]
    user = rec["conversations"][0]["content"]
    return encode(tokenizer, user, rec["question"], render_answer(label, text), text, max_seq_len)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the positions of index: logits (B, A, V), input_ids (B, T),
    index (B, A) positions predicting an answer token, -1 padded."""
    targets = input_ids.gather(1, (index + 1).clamp(min=0, max=input_ids.shape[1] - 1))  # (B, A)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    keep = (index >= 0).flatten().float()
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine to 10%, both counted in optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f
