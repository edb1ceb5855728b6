"""The one multiple-choice scorer, shared by evaluation and the `/answer` endpoint.

An option's score is the mean log-likelihood of its text as the assistant's answer, not a sampled
letter: a frozen backbone that cannot bind a letter to its option can still rank option texts.
Probabilities are a softmax over the options' scores.

Letters: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from explicitlm.data import LABELS, collate, encode, format_options, render_user


@dataclass
class Question:
    question: str
    options: list[str]
    user: str = ""  # the rendered user turn; rendered from question and options when empty

    def __post_init__(self) -> None:
        if not self.user:
            self.user = render_user(self.question, format_options(self.options))


@dataclass
class Scored:
    scores: list[float]
    probabilities: list[float]
    index: int
    memory: list[list[tuple[int, float]]]  # per layer: (bank row, weight), best first
    truncated: bool = False


def predict_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target: (B, T) -> (B, T). Logits are needed only there."""
    at = torch.zeros_like(target_mask)
    at[:, :-1] = target_mask[:, 1:]
    return at


@torch.no_grad()
def score_questions(model: Any, tokenizer: Any, questions: list[Question], max_seq_len: int,
                    batch_size: int = 64) -> list[Scored]:
    """Score every option of every question; sequences are batched across questions."""
    device = next(model.parameters()).device
    flat = []  # (question idx, option idx, Encoded)
    for qi, q in enumerate(questions):
        for oi, text in enumerate(q.options):
            flat.append((qi, oi, encode(tokenizer, q.user, q.question, LABELS[oi], text, max_seq_len)))
    option_scores = [[0.0] * len(q.options) for q in questions]
    memory: list[list] = [[] for _ in questions]
    truncated = [False] * len(questions)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([e for _, _, e in chunk], tokenizer.pad_token_id).items()}
            at = predict_mask(batch["option_mask"])  # logits only where an option token comes next
            out = model(batch["input_ids"], batch["attention_mask"], batch["query_mask"], record=True,
                        question_mask=batch["question_mask"], logits_mask=at)
            targets = batch["input_ids"][:, 1:][at[:, :-1].bool()]  # (M,)
            lp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (M,)
            rows = at.bool().nonzero(as_tuple=True)[0]  # (M,) which sequence each position belongs to
            n = torch.zeros(len(chunk), device=device).index_add_(0, rows, torch.ones_like(lp))
            mean_lp = torch.zeros(len(chunk), device=device).index_add_(0, rows, lp) / n.clamp(min=1)  # (B,)
            for b, (qi, oi, enc) in enumerate(chunk):
                option_scores[qi][oi] = float(mean_lp[b]) if enc.option_mask and any(enc.option_mask) else -1e9
                truncated[qi] |= enc.truncated
                if oi == 0:  # the query reads question tokens only: every option retrieves the same rows
                    memory[qi] = [list(zip(rows[b].tolist(), w[b].tolist())) for rows, w in out.retrieved]
    finally:
        model.train(was_training)
    results = []
    for qi, scores in enumerate(option_scores):
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        results.append(Scored(scores, probs, int(max(range(len(scores)), key=scores.__getitem__)), memory[qi], truncated[qi]))
    return results


def memory_rows(bank: Any, scored: Scored, top: int = 5) -> list[dict[str, Any]]:
    """The rows that informed an answer: weights summed over layers, best first."""
    total: dict[int, float] = {}
    for layer in scored.memory:
        for row, w in layer:
            total[row] = total.get(row, 0.0) + w / max(len(scored.memory), 1)
    best = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [{"uuid": bank.uuids[r], "text": bank.texts[r], "score": round(s, 6)} for r, s in best]
