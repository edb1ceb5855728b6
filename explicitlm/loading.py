"""From files to a model: a backbone folder, a memory bank and saved memory weights become an
ExplicitLM. What training, evaluation and serving share, apart from the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from explicitlm.adapter import load_adapter_weights
from explicitlm.bank import MemoryBank
from explicitlm.config import Config
from explicitlm.index import bank_index, index_cache_path
from explicitlm.model import ExplicitLM, MemorySettings


def config_from_dict(d: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def load_backbone(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Tokenizer and causal LM from a local folder: the tiny base and a real Qwen3 alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").exists():
        import socket

        raise FileNotFoundError(
            f"model.qwen3_model_path={path!r} is not a model folder on {socket.gethostname()}: every training "
            "worker loads the backbone itself, so it must sit at that path on every node (shared storage or the image)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    backbone.eval()
    return tokenizer, backbone


def backbone_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`model.dtype` -> the frozen backbone's dtype. auto: bfloat16 on a GPU (Qwen3-4B is 8 GB there
    instead of 16), float32 elsewhere. The memory modules keep float32 weights whatever this is."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def build_model(
    cfg: Config,
    device: torch.device | str = "cpu",
    adapter: str = "",
    bank: MemoryBank | None = None,
    dtype: torch.dtype | None = None,
    start_from: bool = False,
    bank_is_file: bool = False,
):
    """Backbone + memory bank (+ trained memory weights) -> (tokenizer, ExplicitLM) on `device`.

    The backbone is loaded in `dtype` (default: `model.dtype` for `device`); the memory modules are
    created in float32, the master weights an optimizer updates. The bank is `model.cache_path`
    unless one is given (bank_is_file: the given one was read from that file); a bank file's index is
    cached beside it. start_from: the adapter only initialises training (see `load_adapter_weights`)."""
    dtype = backbone_dtype(cfg.model.dtype, device) if dtype is None else dtype
    tokenizer, backbone = load_backbone(cfg.model.qwen3_model_path, dtype=dtype)
    cache = index_cache_path(cfg.model.cache_path) if bank is None or bank_is_file else None
    if bank is None:
        bank = MemoryBank.load(cfg.model.cache_path, tokenizer)
    s = MemorySettings.from_model_config(cfg.model, seed=cfg.training.seed)
    index = bank_index(bank, s.knowledge_dim, s.seed, s.max_cell_rows, s.max_recent_rows, cache)
    model = ExplicitLM(backbone, bank, s, index)
    if adapter:
        load_adapter_weights(model, adapter, start_from)
    return tokenizer, model.to(device)


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
    for key in ("knowledge_length", "knowledge_dim", "fusion_dim", "query_rank", "query_from", "values_from"):
        if key in saved.get("memory", {}):
            setattr(m, key, saved["memory"][key])
    cfg.training.seed = saved.get("memory", {}).get("seed", cfg.training.seed)
    if not m.qwen3_model_path:
        raise ValueError(f"{weights} does not record its backbone: set model.qwen3_model_path")
    return cfg
