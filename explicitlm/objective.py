"""What training optimises: a converted SFT record as its training sequence, the LM loss over the
answer's tokens, the option loss and the learning-rate schedule.

The option loss asks of a multiple-choice question what its score asks (`explicitlm.scoring`): that
the right option beat the others. At the position that predicts the answer's first token, a
cross-entropy over the options' first tokens: where the LM loss only lifts the right answer, this
also pushes a wrong option down, which is what the exclusion (`explicitlm.modules`) is for. A
question whose row training hides can instead be taught no option but the ones a row rules out
(`training.absent_target=spread`).

Letters: B batch, T tokens, V vocabulary, A predicted positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explicitlm.data import LABELS, Encoded, encode_many, render_answer, render_open_answer
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
    return encode_records(tokenizer, [rec], max_seq_len, open_answer)[0]


def encode_records(
    tokenizer: Any, recs: list[dict[str, Any]], max_seq_len: int, open_answer: bool = False
) -> list[Encoded]:
    """`encode_record` of many records, with one tokenizer call."""
    turns = []
    for rec in recs:
        text = record_answer(rec)
        if open_answer:
            turns.append((rec["question"], rec["question"], render_open_answer(text), text))
        else:
            label = LABELS[int(rec["answer_index"])]
            turns.append((rec["conversations"][0]["content"], rec["question"], render_answer(label, text), text))
    return encode_many(tokenizer, turns, max_seq_len)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the positions of index: logits (B, A, V), input_ids (B, T),
    index (B, A) positions predicting an answer token, -1 padded."""
    targets = input_ids.gather(1, (index + 1).clamp(min=0, max=input_ids.shape[1] - 1))  # (B, A)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    keep = (index >= 0).flatten().float()
    return (nll * keep).sum() / keep.sum().clamp(min=1)


def option_first_tokens(tokenizer: Any, recs: list[dict[str, Any]], encoded: list[Encoded]) -> list[list[int]]:
    """For each record, each option's first token as the answer's first slot would hold it; [] where
    the right option's does not match its training sequence's (then it has no option loss). One
    tokenizer call for all."""
    texts = [" " + text for rec in recs for text in rec["options"]]
    firsts = [t[:1] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    out, at = [], 0
    for rec, e in zip(recs, encoded, strict=True):
        ids = firsts[at : at + len(rec["options"])]
        at += len(rec["options"])
        first = next((t for t, s in enumerate(e.slots) if s == 0), None)
        right = ids[int(rec["answer_index"])]
        if first is None or first + 1 >= len(e.input_ids) or right != [e.input_ids[first + 1]]:
            out.append([])
        else:
            out.append([i[0] if i else -1 for i in ids])
    return out


def option_loss(
    logits: torch.Tensor,
    slots: torch.Tensor,
    index: torch.Tensor,
    options: torch.Tensor,
    right: torch.Tensor,
    spread: torch.Tensor | None = None,
    ruled_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the right option among the options' first tokens, at the position predicting
    slot 0. logits (B, A, V) at index (B, A); slots (B, T); options (B, K) token ids, -1 padded (a
    question without options: all -1); right (B,) the right option. Wrong options that share the right
    one's first token are left out (the first token cannot tell them apart).

    spread (B,) questions whose target is instead even over the options that ruled_out (B, J) does not
    hold (first tokens that a row the reader sees names as what the answer is not, -1 padded): a
    question whose fact the bank lacks, where a reader can rule an option out but has nothing to
    choose among the rest by."""
    at_slot = slots.gather(1, index.clamp(min=0)).masked_fill(index < 0, -1)  # (B, A)
    first = at_slot == 0
    a0 = first.float().argmax(1)  # (B,)
    z = logits[torch.arange(len(a0), device=a0.device), a0].float()  # (B, V)
    chosen = z.gather(1, options.clamp(min=0))  # (B, K)
    known = right < options.shape[1]  # (B,) a right option the row has (an open question's is 0 of -1s)
    right = right.clamp(max=options.shape[1] - 1)
    right_id = options.gather(1, right[:, None])  # (B, 1)
    same = (options == right_id) & (torch.arange(options.shape[1], device=options.device) != right[:, None])
    ok = (first.any(1) & known & (right_id.squeeze(1) >= 0)).float()
    nll = torch.nn.functional.cross_entropy(chosen.masked_fill((options < 0) | same, -1e4), right, reduction="none")
    if spread is not None:
        # Each first token once (an earlier option with the same token stands for it), none ruled out.
        k = torch.arange(options.shape[1], device=options.device)
        repeat = ((options[:, :, None] == options[:, None, :]) & (k[None, None, :] < k[None, :, None])).any(2)
        ruled = (
            (options[:, :, None] == ruled_out[:, None, :]).any(2) if ruled_out is not None else torch.zeros_like(repeat)
        )
        counted = (options >= 0) & ~repeat
        even = counted & ~ruled  # (B, K)
        logp = torch.log_softmax(chosen.masked_fill(~counted, -1e4), 1)
        spread_nll = -(logp * even).sum(1) / even.sum(1).clamp(min=1)
        nll = torch.where(spread, spread_nll, nll)
        # A question drawn with no option left to spread over (an open one) is taught nothing here.
        ok = torch.where(spread, (even.any(1) & first.any(1)).float(), ok)
    return (nll * ok).sum() / ok.sum().clamp(min=1)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine to 10%, both counted in optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f
