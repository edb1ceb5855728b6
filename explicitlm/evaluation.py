"""Evaluate trained memory weights on any OMCQ or converted SFT file against any memory bank."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from explicitlm.config import Config


def fill_from_weights(cfg: Config, weights: str) -> Config:
    """Backbone and bank paths recorded beside the weights fill the `model.*` keys left empty."""
    if not weights:
        return cfg
    path = Path(weights) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{weights} is not a weights folder (no adapter_config.json)")
    saved = json.loads(path.read_text())
    m = cfg.model
    m.qwen3_model_path = m.qwen3_model_path or saved.get("backbone_path", "")
    m.cache_path = m.cache_path or saved.get("bank_path", "")
    m.database_init_path = m.database_init_path or saved.get("database_init_path", "")
    # Shapes come from the weights; how widely to search (top_k, top_cells, probe_cells) stays a
    # config value, so one set of weights can be evaluated at several retrieval breadths.
    for key in ("knowledge_length", "knowledge_dim", "fusion_dim", "query_rank", "query_from", "max_cell_rows"):
        if key in saved.get("memory", {}):
            setattr(m, key, saved["memory"][key])
    cfg.training.seed = saved.get("memory", {}).get("seed", cfg.training.seed)
    if not m.qwen3_model_path:
        raise ValueError(f"{weights} does not record its backbone: set model.qwen3_model_path")
    return cfg


def load_questions(path: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Records from a converted SFT file (JSONL/Parquet) or raw OMCQ (JSON array or JSONL)."""
    from explicitlm.convert import _convert_chunk, _reason_key, plan_chunks, read_records

    path = Path(path)
    if path.suffix == ".parquet":
        return read_records(path), Counter()
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"{") and b'"conversations"' in head.split(b"\n", 1)[0]:
        return read_records(path), Counter()
    kind, chunks, truncated = plan_chunks(path)
    if truncated is not None:
        raise truncated
    records, rejected = [], Counter()
    with open(path, "rb") as fh:
        for c in chunks:
            fh.seek(c.start)
            good, bad, _ = _convert_chunk(fh.read(c.end - c.start), kind, c.first, c.count)
            for rec in good:
                rec["idx"] = len(records)
                records.append(rec)
            rejected.update(_reason_key(reason) for _, _, reason, _ in bad)
    return records, rejected


def evaluate(cfg: Config) -> dict[str, Any]:
    from explicitlm.pipeline import ensure_bank
    from explicitlm.train import build_model, evaluate_records, summarize

    import torch

    torch.set_num_threads(max(cfg.training.torch_threads, 1))
    cfg = fill_from_weights(cfg, cfg.eval.weights)
    records, rejected = load_questions(cfg.eval.data)
    if cfg.eval.max_samples:
        records = records[: cfg.eval.max_samples]
    bank = ensure_bank(cfg)
    tokenizer, model = build_model(cfg, adapter=cfg.eval.weights, bank=bank)
    sums = evaluate_records(model, tokenizer, records, cfg.model.max_seq_len, cfg.eval.batch_size)
    out = summarize(sums, prefix="")
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


def memory_checks(cfg: Config, weights: str, records: list[dict[str, Any]], bank: Any) -> dict[str, Any]:
    """Does the knowledge live in the memory? On the records whose uuid names a bank row:
    the bare backbone; the trained model with those rows removed from the bank; and with each row
    edited to name a wrong option, scored against that option (the share of answers that follow)."""
    from explicitlm.memory import MemoryBank
    from explicitlm.train import build_model, evaluate_records, summarize

    records = [r for r in records if bank.row_of(r.get("uuid") or "") >= 0]
    if not records:
        return {}
    L, max_len, bs = cfg.model.knowledge_length, cfg.model.max_seq_len, cfg.eval.batch_size
    tokenizer, bare = build_model(cfg, bank=bank)  # untrained memory modules: exactly the backbone

    def score(model, recs):
        return summarize(evaluate_records(model, tokenizer, recs, max_len, bs), prefix="")

    out: dict[str, Any] = {"questions": len(records), "bare_accuracy": score(bare, records)["accuracy"]}
    del bare
    rows = [{"uuid": u, "text": t} for u, t in zip(bank.uuids, bank.texts)]
    own = {r["uuid"] for r in records}
    _, without = build_model(cfg, adapter=weights, bank=MemoryBank.build([r for r in rows if r["uuid"] not in own], tokenizer, L))
    ablated = score(without, records)
    out["without_own_rows_accuracy"], out["without_own_rows_memory_read"] = ablated["accuracy"], ablated["memory_read"]
    del without
    edits, edited_records = {}, []
    for r in records:
        changed = edited_fact(bank.texts[bank.row_of(r["uuid"])], list(r["options"]), int(r["answer_index"]), r["uuid"])
        if changed is not None:
            edits[r["uuid"]] = changed[0]
            edited_records.append(dict(r, answer_index=changed[1]))
    if edited_records:
        edited_bank = MemoryBank.build([dict(r, text=edits.get(r["uuid"], r["text"])) for r in rows], tokenizer, L)
        _, edited = build_model(cfg, adapter=weights, bank=edited_bank)
        out["edited_questions"], out["edit_following"] = len(edited_records), score(edited, edited_records)["accuracy"]
    return out
