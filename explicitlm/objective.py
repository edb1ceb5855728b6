"""What training optimises: a converted SFT record as its training sequence, the LM loss over the
answer's tokens and the learning-rate schedule.

Letters: B batch, T tokens, V vocabulary, M predicted positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explicitlm.data import LABELS, Encoded, encode
from explicitlm.scoring import Question


def record_question(rec: dict[str, Any]) -> Question:
    return Question(rec["question"], list(rec["options"]), rec["conversations"][0]["content"])


def encode_record(tokenizer: Any, rec: dict[str, Any], max_seq_len: int) -> Encoded:
    """A converted SFT record -> the training sequence of its correct answer."""
    i = int(rec["answer_index"])
    user, options = rec["conversations"][0]["content"], list(rec["options"])
    return encode(tokenizer, user, rec["question"], LABELS[i], options[i], max_seq_len, options)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens.

    logits (B, T, V) for every position, or (M, V) at the positions `predict_mask(loss_mask)` marks;
    input_ids and loss_mask (B, T).
    """
    if logits.dim() == 2:
        targets = input_ids[:, 1:][loss_mask[:, 1:].bool()]  # (M,)
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = loss_mask[:, 1:].float()
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine to 10%, both counted in optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f
