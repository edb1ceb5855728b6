"""Evaluate trained memory weights on any OMCQ or converted SFT file against any memory bank.

`evaluate_records` (with options) and `evaluate_open` (answers generated without them) return sums,
not means, so that shards scored on several workers add up (`merge_sums`); training's validation
uses the same functions. Open answers are judged by exact match after normalisation (case, accents,
punctuation, leading articles) and by token F1, as reading-comprehension benchmarks judge them.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from explicitlm.bank import MemoryBank
from explicitlm.config import Config
from explicitlm.errors import UserError
from explicitlm.loading import build_model, fill_from_weights, resolve_device
from explicitlm.model import ExplicitLM
from explicitlm.objective import record_answer, record_question
from explicitlm.readers import load_questions
from explicitlm.scoring import generate_answers, memory_rows, score_questions

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Case folded, accents and punctuation dropped, articles removed, spaces collapsed."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()
    return " ".join(_ARTICLES.sub(" ", text.translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def token_f1(prediction: str, answer: str) -> float:
    """F1 of the normalised answers' words (bags of words)."""
    p, a = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a or not common:
        return float(p == a)
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def evaluate_records(
    model: ExplicitLM,
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_seq_len: int,
    batch_size: int = 32,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Sums (not means) so that shards from several workers add up: each row counted once.
    `progress` is called with the number of questions scored since its last call and their total."""
    sums: dict[str, Any] = {
        "n": 0,
        "correct": 0,
        "nll": 0.0,
        "with_gold": 0,
        "r1": 0.0,
        "rk": 0.0,
        "read": 0.0,
        "truncated": 0,
        "per_predicate": {},
    }
    per_q = max(1, batch_size // 4)
    for start in range(0, len(records), per_q):
        chunk = records[start : start + per_q]
        scored = score_questions(model, tokenizer, [record_question(r) for r in chunk], max_seq_len, batch_size)
        for rec, s in zip(chunk, scored):
            gold = int(rec["answer_index"])
            ok = int(s.index == gold)
            sums["n"] += 1
            sums["correct"] += ok
            sums["nll"] += -s.scores[gold] if s.scores[gold] > -1e8 else 0.0
            sums["truncated"] += int(s.truncated)
            # The share of layers that read memory (their rows matched the question well enough).
            sums["read"] += sum(s.used) / max(len(s.used), 1)
            pred = rec.get("predicate") or ""
            if pred:
                c = sums["per_predicate"].setdefault(pred, [0, 0])
                c[0] += ok
                c[1] += 1
            row = model.bank.row_of(rec.get("uuid") or "")
            if row >= 0 and s.memory:
                sums["with_gold"] += 1
                sums["r1"] += sum(layer[0][0] == row for layer in s.memory) / len(s.memory)
                sums["rk"] += sum(any(r == row for r, _ in layer) for layer in s.memory) / len(s.memory)
        if progress is not None:
            progress(len(chunk), len(records))
    return sums


def evaluate_open(
    model: ExplicitLM,
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_seq_len: int,
    batch_size: int = 32,
    max_new_tokens: int = 24,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Answers generated without options, as sums: exact matches, token F1, and answers that name
    what another row it read says instead (wrong, and found in a row other than the question's own)."""
    sums: dict[str, Any] = {"n": 0, "em": 0, "f1": 0.0, "other_row": 0, "read": 0.0, "per_predicate": {}}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        answers = generate_answers(
            model,
            tokenizer,
            [record_question(r, open_answer=True) for r in chunk],
            max_seq_len,
            max_new_tokens,
            batch_size,
        )
        for rec, a in zip(chunk, answers):
            gold = record_answer(rec)
            ok = exact_match(a.text, gold)
            sums["n"] += 1
            sums["em"] += int(ok)
            sums["f1"] += token_f1(a.text, gold)
            sums["read"] += sum(a.used) / max(len(a.used), 1)
            own = model.bank.row_of(rec.get("uuid") or "")
            said = normalize_answer(a.text)
            if said and not ok:
                others = [r["text"] for r in memory_rows(model.bank, a, top=3) if model.bank.row_of(r["uuid"]) != own]
                sums["other_row"] += int(any(f" {said} " in f" {normalize_answer(t)} " for t in others))
            pred = rec.get("predicate") or ""
            if pred:
                c = sums["per_predicate"].setdefault(pred, [0, 0])
                c[0] += int(ok)
                c[1] += 1
        if progress is not None:
            progress(len(chunk), len(records))
    return sums


def summarize_open(sums: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    n = max(sums.get("n", 0), 1)
    return {
        f"{prefix}exact_match": sums.get("em", 0) / n,
        f"{prefix}token_f1": sums.get("f1", 0.0) / n,
        f"{prefix}other_row_answers": sums.get("other_row", 0) / n,
        f"{prefix}memory_read": sums.get("read", 0.0) / n,
        f"{prefix}n": sums.get("n", 0),
        f"{prefix}per_predicate": {p: c / t for p, (c, t) in sorted(sums.get("per_predicate", {}).items())},
    }


def merge_sums(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"per_predicate": {}}
    for p in parts:
        for k, v in p.items():
            if k == "per_predicate":
                for pred, (c, n) in v.items():
                    t = total["per_predicate"].setdefault(pred, [0, 0])
                    t[0] += c
                    t[1] += n
            else:
                total[k] = total.get(k, 0) + v
    return total


def summarize(sums: dict[str, Any], prefix: str = "val_") -> dict[str, Any]:
    n = max(sums.get("n", 0), 1)
    g = max(sums.get("with_gold", 0), 1)
    out = {
        f"{prefix}accuracy": sums.get("correct", 0) / n,
        f"{prefix}loss": sums.get("nll", 0.0) / n,
        f"{prefix}n": sums.get("n", 0),
        f"{prefix}truncated": sums.get("truncated", 0),
        f"{prefix}memory_read": sums.get("read", 0.0) / n,
    }
    if sums.get("with_gold"):
        out[f"{prefix}recall@1"] = sums["r1"] / g
        out[f"{prefix}recall@k"] = sums["rk"] / g
    out[f"{prefix}per_predicate"] = {p: c / t for p, (c, t) in sorted(sums.get("per_predicate", {}).items())}
    return out


def evaluate(cfg: Config, progress: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    from explicitlm.pipeline import ensure_bank

    torch.set_num_threads(max(cfg.training.torch_threads, 1))
    cfg = fill_from_weights(cfg, cfg.eval.weights)
    records, rejected = load_questions(cfg.eval.data)
    if cfg.eval.max_samples:
        records = records[: cfg.eval.max_samples]
    if not records:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(rejected.items()))
        why = f"all {sum(rejected.values()):,} rows rejected: {reasons}" if rejected else "it holds none"
        raise UserError(
            f"eval.data={cfg.eval.data} has no usable question ({why}); give OMCQ questions "
            '({"target":[{"question","options","correct_answer"}]}) or converted records'
        )
    bank = ensure_bank(cfg)
    device = resolve_device(cfg.eval.device, "eval.device")
    tokenizer, model = build_model(cfg, adapter=cfg.eval.weights, bank=bank, bank_is_file=True, device=device)
    if cfg.eval.mode == "open":
        sums = evaluate_open(
            model, tokenizer, records, cfg.model.max_seq_len, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress
        )
        out = summarize_open(sums)
    else:
        sums = evaluate_records(model, tokenizer, records, cfg.model.max_seq_len, cfg.eval.batch_size, progress)
        out = summarize(sums, prefix="")
    out["mode"] = cfg.eval.mode
    out["rejected"] = dict(rejected)
    out["bank_rows"] = len(bank)
    out["weights"] = cfg.eval.weights
    return out


def edited_fact(text: str, options: list[str], answer_index: int, key: str) -> tuple[str, int] | None:
    """A fact's sentence rewritten to name a wrong option instead of the answer, and that option's
    index (picked by a hash of `key`, the same in every run); None when the sentence does not
    contain the answer."""
    answer = options[answer_index]
    wrong = [i for i, o in enumerate(options) if o != answer]
    if answer not in text or not wrong:
        return None
    pick = wrong[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(wrong)]
    return text.replace(answer, options[pick]), pick


def memory_checks(
    cfg: Config,
    weights: str,
    records: list[dict[str, Any]],
    bank: Any,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Does the knowledge live in the memory? On the records whose uuid names a bank row:
    the bare backbone; the trained model with those rows removed from the bank; and with each row
    edited to name a wrong option, scored against that option (the share of answers that follow).
    Beside each, the no-training word rule (`explicitlm.baselines.WordRule`) on the same bank: what
    the trained reader must beat. `progress` as in `evaluate_records`, for each of the three passes."""
    records = [r for r in records if bank.row_of(r.get("uuid") or "") >= 0]
    if not records:
        return {}
    L, max_len, bs = cfg.model.knowledge_length, cfg.model.max_seq_len, cfg.eval.batch_size
    device = resolve_device(cfg.eval.device, "eval.device")
    tokenizer, bare = build_model(cfg, bank=bank, device=device)  # untrained memory modules: exactly the backbone

    def score(model, recs):
        return summarize(evaluate_records(model, tokenizer, recs, max_len, bs, progress), prefix="")

    def rule(texts: list[str], recs: list[dict[str, Any]]) -> float:
        """The word rule's accuracy on recs, reading a bank of texts."""
        from explicitlm.baselines import WordRule

        reader = WordRule(texts)
        hits = [reader.answer(r["question"], list(r["options"]), r["uuid"])[0] == int(r["answer_index"]) for r in recs]
        return round(sum(hits) / len(hits), 4)

    out: dict[str, Any] = {"questions": len(records), "bare_accuracy": score(bare, records)["accuracy"]}
    del bare
    rows = [{"uuid": u, "text": t} for u, t in zip(bank.uuids, bank.texts)]
    own = {r["uuid"] for r in records}
    _, without = build_model(
        cfg,
        adapter=weights,
        bank=MemoryBank.build([r for r in rows if r["uuid"] not in own], tokenizer, L),
        device=device,
    )
    ablated = score(without, records)
    out["without_own_rows_accuracy"], out["without_own_rows_memory_read"] = ablated["accuracy"], ablated["memory_read"]
    out["rule_accuracy"] = rule([r["text"] for r in rows], records)
    out["rule_without_own_rows_accuracy"] = rule([r["text"] for r in rows if r["uuid"] not in own], records)
    del without
    edits, edited_records = {}, []
    for r in records:
        changed = edited_fact(bank.texts[bank.row_of(r["uuid"])], list(r["options"]), int(r["answer_index"]), r["uuid"])
        if changed is not None:
            edits[r["uuid"]] = changed[0]
            edited_records.append(dict(r, answer_index=changed[1]))
    if edited_records:
        edited_bank = MemoryBank.build([dict(r, text=edits.get(r["uuid"], r["text"])) for r in rows], tokenizer, L)
        _, edited = build_model(cfg, adapter=weights, bank=edited_bank, device=device)
        out["edited_questions"], out["edit_following"] = len(edited_records), score(edited, edited_records)["accuracy"]
        out["rule_edit_following"] = rule(list(edited_bank.texts), edited_records)
    return out
