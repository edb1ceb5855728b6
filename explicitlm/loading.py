"""From files to a model: a backbone folder, a memory bank and saved memory weights become an
ExplicitLM. What training, evaluation and serving share, apart from the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from explicitlm.adapter import adapter_index_state, load_adapter_weights, read_adapter
from explicitlm.bank import MemoryBank
from explicitlm.config import Config
from explicitlm.errors import UserError
from explicitlm.model import ExplicitLM, MemorySettings


def config_from_dict(d: dict[str, Any]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def check_backbone(path: str, key: str = "model.qwen3_model_path") -> None:
    """A local model folder, or a UserError saying what is wrong (transformers would take a missing
    folder for a hub repo id and complain about its form). `key` is how the user named it."""
    folder = Path(path)
    if not path:
        raise UserError(f"no backbone: set {key} to a local Qwen3 folder")
    if not folder.is_dir():
        raise UserError(
            f"model folder {path} does not exist: set {key} to a local Qwen3 folder (config.json, weights, tokenizer)"
        )
    if not (folder / "config.json").exists():
        raise UserError(f"{path} is not a model folder (no config.json): give a folder saved with save_pretrained")


def load_backbone(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Tokenizer and causal LM from a local folder: the tiny base and a real Qwen3 alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_backbone(path)

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    backbone.eval()
    return tokenizer, backbone


def build_model(cfg: Config, device: torch.device | str = "cpu", adapter: str = "", bank: MemoryBank | None = None):
    """Backbone + memory bank (+ trained memory weights) -> (tokenizer, ExplicitLM) on `device`."""
    tokenizer, backbone = load_backbone(cfg.model.qwen3_model_path)
    bank = MemoryBank.load(cfg.model.cache_path) if bank is None else bank
    settings = MemorySettings.from_model_config(cfg.model, seed=cfg.training.seed)
    index_state = None
    if adapter:
        _, tensors = read_adapter(adapter)
        index_state = adapter_index_state(tensors)
    model = ExplicitLM(backbone, bank, settings, index_state)
    if adapter:
        load_adapter_weights(model, adapter)
    return tokenizer, model.to(device)


def fill_from_weights(cfg: Config, weights: str, backbone_key: str = "model.qwen3_model_path") -> Config:
    """Backbone and bank paths recorded beside the weights fill the `model.*` keys left empty;
    `backbone_key` is how the program lets a user name another backbone."""
    if not weights:
        return cfg
    from explicitlm.adapter import ADAPTER_CONFIG, adapter_paths

    saved = json.loads((check_weights(weights) / ADAPTER_CONFIG).read_text())
    recorded = adapter_paths(weights, saved)
    m = cfg.model
    m.qwen3_model_path = m.qwen3_model_path or recorded["backbone_path"]
    m.cache_path = m.cache_path or recorded["bank_path"]
    m.database_init_path = m.database_init_path or recorded["database_init_path"]
    # Shapes come from the weights; how widely to search (top_k, top_cells, probe_cells) stays a
    # config value, so one set of weights can be evaluated at several retrieval breadths.
    for key in ("knowledge_length", "knowledge_dim", "fusion_dim", "query_rank", "query_from", "max_cell_rows"):
        if key in saved.get("memory", {}):
            setattr(m, key, saved["memory"][key])
    cfg.training.seed = saved.get("memory", {}).get("seed", cfg.training.seed)
    if not m.qwen3_model_path:
        raise UserError(f"{weights} does not record its backbone: set model.qwen3_model_path")
    check_backbone(m.qwen3_model_path, backbone_key)
    return cfg


def check_weights(weights: str) -> Path:
    """A weights folder (adapter_config.json beside the safetensors), or a UserError with the likely fix."""
    from explicitlm.adapter import ADAPTER_CONFIG

    folder = Path(weights)
    if (folder / ADAPTER_CONFIG).exists():
        return folder
    if (folder / "sft_latest" / ADAPTER_CONFIG).exists():
        raise UserError(f"{weights} is a run folder, not a weights folder: did you mean {folder / 'sft_latest'}?")
    if not folder.exists():
        raise UserError(f"weights folder {weights} does not exist: give the sft_latest/ (or sft_best/) of a run")
    raise UserError(f"{weights} is not a weights folder (no {ADAPTER_CONFIG}): give the sft_latest/ of a run")
