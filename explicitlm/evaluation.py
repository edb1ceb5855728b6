"""Evaluate trained memory weights on any OMCQ or converted SFT file against any memory bank."""

from __future__ import annotations

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
