"""The one scorer and the one generator, shared by evaluation, the CLI and the `/answer` endpoint.

With options, an option's score is the mean log-likelihood of its text as the assistant's answer,
not a sampled letter: a frozen backbone that cannot bind a letter to its option can still rank
option texts. Probabilities are a softmax over the options' scores. Without options, the answer is
generated greedily: memory is read once per question, the KV cache is kept across steps, and each
step fills the next answer slot until the end of turn or `max_new_tokens`.

Letters: B sequences, T tokens, V vocabulary, R rows read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from explicitlm.data import (
    LABELS,
    Encoded,
    collate,
    encode,
    format_options,
    render_answer,
    render_open_answer,
    render_user,
)


@dataclass
class Question:
    question: str
    options: list[str]
    user: str = ""  # the rendered user turn; rendered from question and options when empty

    def __post_init__(self) -> None:
        if not self.user:
            self.user = render_user(self.question, format_options(self.options) if self.options else "")


@dataclass
class MemoryUse:
    """What memory did for one question: per layer, the rows read and the trust in them."""

    memory: list[list[tuple[int, float]]] = field(default_factory=list)  # per layer: (bank row, weight), best first
    trust: list[float] = field(default_factory=list)  # per layer: reading weight on rows rather than on "none"

    @property
    def used(self) -> list[bool]:
        """Per layer: whether memory was trusted more than not."""
        return [t >= 0.5 for t in self.trust]


@dataclass
class Scored(MemoryUse):
    scores: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    index: int = 0
    truncated: bool = False


@dataclass
class Generated(MemoryUse):
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finished: bool = False  # it reached the end of turn within max_new_tokens
    truncated: bool = False  # the prompt did not fit model.max_seq_len


def _cut(e: Encoded, start: int, end: int | None = None) -> Encoded:
    return Encoded(*(getattr(e, f.name)[start:end] for f in fields(Encoded)))


def shared_prompt_length(encoded: list[Encoded]) -> int:
    """How many leading tokens a question's option sequences share and can read once.

    The cut keeps every position that predicts an answer slot in the continuation and every
    continuation non-empty.
    """
    first = encoded[0].input_ids
    common = min(len(e.input_ids) for e in encoded)
    for e in encoded[1:]:
        common = next((t for t, (a, b) in enumerate(zip(first, e.input_ids)) if a != b), common)
    first_slot = min(
        (next(t for t, s in enumerate(e.slots) if s >= 0) for e in encoded if max(e.slots) >= 0), default=common
    )
    return max(1, min(common, min(len(e.input_ids) for e in encoded) - 1, first_slot))


def _batches(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so that each group's sizes sum to at most budget (one item at least)."""
    groups, group, total = [], [], 0
    for i, n in enumerate(sizes):
        if group and total + n > budget:
            groups.append(group)
            group, total = [], 0
        group.append(i)
        total += n
    return groups + ([group] if group else [])


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _memory_use(reads: list[Any]) -> list[MemoryUse]:
    """Per question: each layer's rows by weight and its trust, copied to the host once."""
    if not reads:
        return []
    rows = torch.stack([r.rows for r in reads], 1).tolist()  # (B, layers, R)
    weights = torch.stack([r.weights for r in reads], 1).tolist()
    trust = torch.stack([r.trust for r in reads], 1).tolist()  # (B, layers)
    out = []
    for b in range(len(trust)):
        memory = [sorted(zip(r, w), key=lambda rw: -rw[1]) for r, w in zip(rows[b], weights[b])]
        out.append(MemoryUse(memory, [float(t) for t in trust[b]]))
    return out


@torch.no_grad()
def score_questions(
    model: Any, tokenizer: Any, questions: list[Question], max_seq_len: int, batch_size: int = 64
) -> list[Scored]:
    """Score every option of every question, batched across questions (up to batch_size options).

    Each question's prompt runs once (memory, KV cache) and its options continue from it: the same
    log-likelihoods as full sequences at a fraction of the work.
    """
    device = next(model.parameters()).device
    encoded = [
        [
            encode(tokenizer, q.user, q.question, render_answer(LABELS[oi], text), text, max_seq_len)
            for oi, text in enumerate(q.options)
        ]
        for q in questions
    ]
    option_scores = [[0.0] * len(q.options) for q in questions]
    uses: list[MemoryUse] = [MemoryUse() for _ in questions]
    was_training = model.training
    model.eval()
    try:
        for chunk in _batches([len(q.options) for q in questions], batch_size):
            cuts = [shared_prompt_length(encoded[qi]) for qi in chunk]
            prompts = _to(
                collate([_cut(encoded[qi][0], 0, p) for qi, p in zip(chunk, cuts)], tokenizer.pad_token_id), device
            )
            prefix = model.prefill(
                prompts["input_ids"], prompts["attention_mask"], prompts["query_index"], prompts["words"]
            )
            flat = [(qi, oi, _cut(e, p)) for qi, p in zip(chunk, cuts) for oi, e in enumerate(encoded[qi])]
            group = torch.tensor([j for j, qi in enumerate(chunk) for _ in encoded[qi]], device=device)  # (B_c,)
            batch = _to(collate([e for _, _, e in flat], tokenizer.pad_token_id), device)
            at = batch["option_index"]  # (B_c, A) logits only where an option token comes next
            logits = model.continue_from(prefix, group, batch["input_ids"], batch["attention_mask"], batch["slots"], at)
            targets = batch["input_ids"].gather(1, (at + 1).clamp(min=0, max=batch["input_ids"].shape[1] - 1))
            lp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (B_c, A)
            keep = (at >= 0).float()
            mean_lp = (lp * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B_c,)
            # To the host once per chunk: one copy per tensor, not one device sync per option and layer.
            mean_lp = mean_lp.tolist()
            for b, (qi, oi, _) in enumerate(flat):
                option_scores[qi][oi] = mean_lp[b] if any(encoded[qi][oi].option_mask) else -1e9
            for qi, use in zip(chunk, _memory_use(prefix.reads)):
                uses[qi] = use
    finally:
        model.train(was_training)
    results = []
    for qi, scores in enumerate(option_scores):
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        best = int(max(range(len(scores)), key=scores.__getitem__))
        truncated = any(e.truncated for e in encoded[qi])
        results.append(Scored(uses[qi].memory, uses[qi].trust, scores, probs, best, truncated))
    return results


def open_prompt(tokenizer: Any, question: Question, max_seq_len: int) -> tuple[Encoded, bool]:
    """The sequence a generated answer continues: the conversation as training renders it, cut
    where the answer's text would start; and whether max_seq_len leaves no room for an answer."""
    placeholder = "answer"
    e = encode(tokenizer, question.user, question.question, render_open_answer(placeholder), placeholder, max_seq_len)
    return e.prompt(), e.truncated


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: list[Question],
    max_seq_len: int,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[Generated]:
    """Greedy answers without options: memory read once per question, the KV cache kept across steps."""
    device = next(model.parameters()).device
    end = model.end_token_id
    prompts, cut = zip(*(open_prompt(tokenizer, q, max_seq_len) for q in questions)) if questions else ((), ())
    results: list[Generated] = [Generated() for _ in questions]
    was_training = model.training
    model.eval()
    try:
        for chunk in _batches([1] * len(questions), batch_size):
            batch = _to(collate([prompts[i] for i in chunk], tokenizer.pad_token_id), device)
            prefix = model.prefill(
                batch["input_ids"], batch["attention_mask"], batch["query_index"], batch["words"], batch["slots"]
            )
            B = len(chunk)
            last = prefix.attention_mask.sum(1) - 1  # (B,)
            logits = model.backbone.lm_head(prefix.hidden[torch.arange(B, device=device), last])  # (B, V)
            steps, done = [], torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                token = logits.argmax(-1)  # (B,)
                token = torch.where(done, torch.full_like(token, end), token)
                steps.append(token)
                done = done | (token == end)
                if step + 1 == max_new_tokens or bool(done.all()):  # one sync a token: cheaper than a wasted step
                    break
                slots = torch.full((B, 1), step + 1, dtype=torch.long, device=device)
                logits = model.continue_from(prefix, None, token[:, None], torch.ones_like(slots), slots)[:, -1]
                prefix.attention_mask = torch.cat([prefix.attention_mask, torch.ones_like(slots)], 1)
            tokens = torch.stack(steps, 1).tolist()  # (B, steps)
            uses = _memory_use(prefix.reads) or [MemoryUse() for _ in chunk]  # none: memory off
            for j, (i, use) in enumerate(zip(chunk, uses)):
                ids = tokens[j]
                finished = end in ids
                ids = ids[: ids.index(end)] if finished else ids
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results[i] = Generated(use.memory, use.trust, text, ids, finished, cut[i])
    finally:
        model.train(was_training)
    return results


def memory_rows(bank: Any, use: MemoryUse, top: int = 5) -> list[dict[str, Any]]:
    """The rows that informed an answer: weights averaged over layers, best first."""
    total: dict[int, float] = {}
    for layer in use.memory:
        for row, w in layer:
            total[row] = total.get(row, 0.0) + w / max(len(use.memory), 1)
    best = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [{"uuid": bank.uuids[r], "text": bank.texts[r], "score": round(s, 6)} for r, s in best]
