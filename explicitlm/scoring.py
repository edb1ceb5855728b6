"""The one multiple-choice scorer, shared by evaluation and the `/answer` endpoint.

An option's score is the mean log-likelihood of its text as the assistant's answer, not a sampled
letter: a frozen backbone that cannot bind a letter to its option can still rank option texts.
Probabilities are a softmax over the options' scores.

Letters: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from explicitlm.data import LABELS, Encoded, collate, encode, format_options, render_user


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
    match: list[float] = field(default_factory=list)  # per layer: share of the question's words the rows contain
    used: list[bool] = field(default_factory=list)  # per layer: whether it read memory (match >= model.min_match)


def predict_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target: (B, T) -> (B, T). Logits are needed only there."""
    at = torch.zeros_like(target_mask)
    at[:, :-1] = target_mask[:, 1:]
    return at


def _cut(e: Encoded, start: int, end: int | None = None) -> Encoded:
    return Encoded(*(getattr(e, f.name)[start:end] for f in fields(Encoded)))


def shared_prompt_length(encoded: list[Encoded]) -> int:
    """How many leading tokens a question's option sequences share and can read once.

    The cut keeps every scored position (a token followed by an option token) in the continuation
    and every continuation non-empty.
    """
    first = encoded[0].input_ids
    common = min(len(e.input_ids) for e in encoded)
    for e in encoded[1:]:
        common = next((t for t, (a, b) in enumerate(zip(first, e.input_ids)) if a != b), common)
    first_scored = min((e.option_mask.index(1) for e in encoded if any(e.option_mask)), default=common)
    return max(1, min(common, min(len(e.input_ids) for e in encoded) - 1, first_scored - 1))


@torch.no_grad()
def score_questions(
    model: Any, tokenizer: Any, questions: list[Question], max_seq_len: int, batch_size: int = 64
) -> list[Scored]:
    """Score every option of every question, batched across questions (up to batch_size options).

    Each question's prompt runs once (memory retrieval, fusion, KV cache) and its options continue
    from it: the same log-likelihoods as full sequences at a fraction of the work.
    """
    device = next(model.parameters()).device
    encoded = [
        [
            encode(tokenizer, q.user, q.question, LABELS[oi], text, max_seq_len, q.options)
            for oi, text in enumerate(q.options)
        ]
        for q in questions
    ]
    chunks, chunk, size = [], [], 0  # question indices per forward pass
    for qi, q in enumerate(questions):
        if chunk and size + len(q.options) > batch_size:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(qi)
        size += len(q.options)
    if chunk:
        chunks.append(chunk)
    option_scores = [[0.0] * len(q.options) for q in questions]
    memory: list[list] = [[] for _ in questions]
    match: list[list[float]] = [[] for _ in questions]
    used: list[list[bool]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    try:
        for chunk in chunks:
            cuts = [shared_prompt_length(encoded[qi]) for qi in chunk]
            prompts = collate([_cut(encoded[qi][0], 0, p) for qi, p in zip(chunk, cuts)], tokenizer.pad_token_id)
            prompts = {k: v.to(device) for k, v in prompts.items()}
            prefix = model.prefill(
                prompts["input_ids"],
                prompts["attention_mask"],
                prompts["query_mask"],
                prompts["words"],
                prompts["choices_mask"],
            )
            flat = [
                (qi, oi, _cut(e, p)) for j, (qi, p) in enumerate(zip(chunk, cuts)) for oi, e in enumerate(encoded[qi])
            ]
            group = torch.tensor([j for j, qi in enumerate(chunk) for _ in encoded[qi]], device=device)  # (B_c,)
            batch = {k: v.to(device) for k, v in collate([e for _, _, e in flat], tokenizer.pad_token_id).items()}
            at = predict_mask(batch["option_mask"])  # logits only where an option token comes next
            logits = model.continue_from(prefix, group, batch["input_ids"], batch["attention_mask"], at)
            targets = batch["input_ids"][:, 1:][at[:, :-1].bool()]  # (M,)
            lp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (M,)
            rows = at.bool().nonzero(as_tuple=True)[0]  # (M,) which sequence each position belongs to
            n = torch.zeros(len(flat), device=device).index_add_(0, rows, torch.ones_like(lp))
            mean_lp = torch.zeros(len(flat), device=device).index_add_(0, rows, lp) / n.clamp(min=1)  # (B_c,)
            # To the host once per chunk: one copy per tensor, not one device sync per option and layer.
            mean_lp = mean_lp.tolist()
            retrieved = [(r.tolist(), w.tolist()) for r, w in prefix.retrieved]  # per layer: (B_q, k) each
            if prefix.values:  # (B_q, layers) each
                matches, reads = (
                    torch.stack([getattr(v, k) for v in prefix.values], 1).tolist() for k in ("match", "used")
                )
            else:
                matches = reads = [[] for _ in chunk]
            for b, (qi, oi, _) in enumerate(flat):
                option_scores[qi][oi] = mean_lp[b] if any(encoded[qi][oi].option_mask) else -1e9
            for j, qi in enumerate(chunk):
                memory[qi] = [list(zip(r[j], w[j])) for r, w in retrieved]
                match[qi], used[qi] = [float(x) for x in matches[j]], [bool(x) for x in reads[j]]
    finally:
        model.train(was_training)
    results = []
    for qi, scores in enumerate(option_scores):
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        truncated = any(e.truncated for e in encoded[qi])
        results.append(
            Scored(
                scores,
                probs,
                int(max(range(len(scores)), key=scores.__getitem__)),
                memory[qi],
                truncated,
                match[qi],
                used[qi],
            )
        )
    return results


def memory_rows(bank: Any, scored: Scored, top: int = 5) -> list[dict[str, Any]]:
    """The rows that informed an answer: weights summed over layers, best first."""
    total: dict[int, float] = {}
    for layer in scored.memory:
        for row, w in layer:
            total[row] = total.get(row, 0.0) + w / max(len(scored.memory), 1)
    best = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [{"uuid": bank.uuids[r], "text": bank.texts[r], "score": round(s, 6)} for r, s in best]
