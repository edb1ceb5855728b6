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
from explicitlm.errors import UserError
from explicitlm.index import bank_index, index_cache_path
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
        import socket

        raise UserError(
            f"model folder {path} does not exist on {socket.gethostname()}: set {key} to a local Qwen3 folder "
            "(config.json, weights, tokenizer); every training worker loads it, so on a cluster it must sit at "
            "that path on every node (shared storage or the image)"
        )
    if not (folder / "config.json").exists():
        raise UserError(f"{path} is not a model folder (no config.json): give a folder saved with save_pretrained")


def resolve_device(name: str, key: str) -> torch.device:
    """A device setting (`key`): auto (cuda when this process sees one), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


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


def backbone_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`model.dtype` -> the frozen backbone's dtype. auto: bfloat16 on a GPU (Qwen3-4B is 8 GB there
    instead of 16), float32 elsewhere. The memory modules keep float32 weights whatever this is."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """`serve.dtype` -> the served backbone's dtype. auto: bfloat16 on CUDA and on CPUs whose matrix
    units do bf16 natively (there it answers several times faster than float32), else float32.
    Training and evaluation follow `model.dtype` (`backbone_dtype`), float32 on any CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return (
            torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


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
    model = ExplicitLM(backbone, bank, s, index, end_token_id(tokenizer))
    if adapter:
        load_adapter_weights(model, adapter, start_from)
    return tokenizer, model.to(device)


def end_token_id(tokenizer: Any) -> int:
    """The token that ends an answer: the chat template's end of turn where the vocabulary has one
    (Qwen3's "<|im_end|>", also the tiny base's), else the tokenizer's end of sequence."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        return im_end
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither <|im_end|> nor an end-of-sequence token to end answers with")
    return tokenizer.eos_token_id


def fill_from_weights(cfg: Config, weights: str, backbone_key: str = "model.qwen3_model_path") -> Config:
    """Backbone and bank paths recorded beside the weights fill the `model.*` keys left empty;
    `backbone_key` is how the program lets a user name another backbone."""
    if not weights:
        return cfg
    from explicitlm.adapter import ADAPTER_CONFIG, SHAPE_KEYS, adapter_paths, saved_setting

    saved = json.loads((check_weights(weights) / ADAPTER_CONFIG).read_text())
    recorded = adapter_paths(weights, saved)
    m = cfg.model
    m.qwen3_model_path = m.qwen3_model_path or recorded["backbone_path"]
    m.cache_path = m.cache_path or recorded["bank_path"]
    m.database_init_path = m.database_init_path or recorded["database_init_path"]
    # Shapes come from the weights; how widely to search (top_k, top_cells, probe_cells) stays a
    # config value, so one set of weights can be evaluated at several retrieval breadths.
    for key in SHAPE_KEYS:
        value = saved_setting(saved.get("memory", {}), key)  # weights saved before a key: as trained
        if value is not None:
            setattr(m, key, value)
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
