"""The trainable set and its saved form, like a PEFT adapter folder.

`memory_parameters` names the trainable set once: it freezes everything else (`set_trainable`) and
selects what is saved. A saved adapter holds only the memory modules' trained tensors (safetensors)
beside a JSON config naming the backbone and memory settings; everything computed from a bank (word
counts, keys, cells) belongs to the bank it is used with. Loading an adapter onto another backbone or
memory shape fails with the differences listed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from explicitlm.config import MEMORY_MODULES
from explicitlm.errors import UserError
from explicitlm.model import ExplicitLM

ADAPTER_WEIGHTS = "memory_modules.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "explicitlm-adapter/4"
# Format 3 had no exclusion: its tensors are all there is of format 4 but the exclusion's, whose
# fusion output starts at zero, so it loads and answers exactly as it was trained.
_NO_EXCLUSION_FORMAT = "explicitlm-adapter/3"
_EXCLUSION = re.compile(r"\.xq?_\w+\.")  # the exclusion's modules: x_... (xq_head) in the gate and the fusion
# Formats 1 (retrieval by token-embedding keys) and 2 (a lexical gate over a coverage threshold) had
# another memory_gate: their fusion and norms can start a new training run, their gate cannot read.
_RETRAIN_FORMATS = ("explicitlm-adapter/1", "explicitlm-adapter/2")


def memory_parameters(
    model: nn.Module, modules: tuple[str, ...] | list[str] = MEMORY_MODULES
) -> dict[str, nn.Parameter]:
    """The one definition of the trainable set: parameters inside the named memory modules."""
    return {n: p for n, p in model.named_parameters() if any(f".{m}." in f".{n}" for m in modules)}


def set_trainable(model: ExplicitLM, modules: tuple[str, ...] | list[str] = MEMORY_MODULES) -> dict[str, nn.Parameter]:
    """Freeze everything but `modules` (the training loop reports the counts once, from rank 0)."""
    trainable = memory_parameters(model, modules)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return trainable


def freeze_summary(model: ExplicitLM, trainable: dict[str, nn.Parameter], modules) -> str:
    """One line: what is frozen and what trains (count, bytes, dtypes), and where the bank lives."""
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    n_train = sum(p.numel() for p in trainable.values())
    n_frozen = sum(p.numel() for p in frozen)
    bank = [t for _, t in model.memory_tensors()]
    return (
        f"freeze: frozen {n_frozen / 1e6:.2f}M ({_size(frozen)}), trainable {n_train / 1e6:.2f}M "
        f"({_size(trainable.values())}; {', '.join(modules)}), frozen share {n_frozen / (n_frozen + n_train):.1%}; "
        f"bank and index {sum(t.numel() * t.element_size() for t in bank) / 1e9:.3g} GB on {bank[0].device}"
    )


def _size(params) -> str:
    """'8.05 GB bfloat16': the bytes of some parameters, and their dtypes."""
    params = list(params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return f"{sum(p.numel() * p.element_size() for p in params) / 1e9:.3g} GB {'+'.join(dtypes)}"


def backbone_signature(model: ExplicitLM) -> dict[str, Any]:
    cfg = model.backbone.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "tokenizer_fingerprint": model.bank.tokenizer_fingerprint,
    }


def save_adapter(model: ExplicitLM, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Only the memory modules' tensors (safetensors) and a JSON config, like a PEFT adapter folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in memory_parameters(model).items()}
    tmp = folder / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / ADAPTER_WEIGHTS)
    config = {
        "format": ADAPTER_FORMAT,
        "backbone": backbone_signature(model),
        "backbone_path": str(getattr(model.backbone.config, "_name_or_path", "")),
        "memory": asdict(model.settings),
        "bank_rows": len(model.bank),
        **(extra or {}),
    }
    config.update({k: _relative_to_run(config[k], folder) for k in _PATH_KEYS if k in config})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


# The memory settings that fix the modules' shapes: recorded with the weights, read back from them.
SHAPE_KEYS = ("knowledge_length", "knowledge_dim", "reader_dim", "reader_encoder", "fusion_dim", "query_from")
# Memory settings added after weights of this format were first saved, with the value those weights have.
ADDED_KEYS = {"reader_encoder": 0}


def saved_setting(memory: dict[str, Any], key: str) -> Any:
    """A memory setting as the weights' `adapter_config.json` records it (its "memory" dict), or the
    value weights saved before the key have; None where neither is known."""
    return memory.get(key, ADDED_KEYS.get(key))


# Paths an adapter records (what `serve.weights` alone needs to find its backbone and bank).
_PATH_KEYS = ("backbone_path", "bank_path", "database_init_path")


def _relative_to_run(path: str, folder: Path) -> str:
    """A path inside the run folder (the weights folder's parent: base/, the bank, data/) relative to
    the weights folder, so that a copied or moved run still finds it; a path elsewhere as it is."""
    if not path:
        return path
    target, weights = Path(path).resolve(), folder.resolve()
    return os.path.relpath(target, weights) if weights.parent in target.parents else path


def adapter_paths(folder: str | Path, config: dict[str, Any]) -> dict[str, str]:
    """The backbone, bank and knowledge paths an adapter config records; relative ones resolved
    against its folder (absolute ones, as older adapters wrote them, as they are)."""
    out = {}
    for key in _PATH_KEYS:
        value = str(config.get(key) or "")
        out[key] = str((Path(folder) / value).resolve()) if value and not Path(value).is_absolute() else value
    return out


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise UserError(f"{folder} is not a weights folder (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return json.loads((folder / ADAPTER_CONFIG).read_text()), load_file(str(folder / ADAPTER_WEIGHTS))


def load_adapter_weights(model: ExplicitLM, folder: str | Path, start_from: bool = False) -> dict[str, Any]:
    """Load saved memory-module weights; a different backbone or memory shape is a clear error.

    start_from: the weights only initialise a training run, so an adapter of an older format gives
    what still fits (its fusion and norms) and the rest starts fresh."""
    config, tensors = read_adapter(folder)
    params = memory_parameters(model)
    fmt = config.get("format")
    if fmt in _RETRAIN_FORMATS:
        if not start_from:
            raise UserError(
                f"weights {folder} are of the older format {fmt} (no memory reader); retrain them, "
                f"starting from their fusion weights: ray_jobs/sft.py dataset.pretrained_sft_model_path={folder}"
            )
        params = {n: p for n, p in params.items() if ".memory_gate." not in n and not _EXCLUSION.search(n)}
        print(f"memory: {folder} is of format {fmt}: its fusion and norms start this run, its gate does not")
    elif fmt == _NO_EXCLUSION_FORMAT:
        params = {n: p for n, p in params.items() if not _EXCLUSION.search(n)}
    mine = backbone_signature(model)
    theirs = config.get("backbone", {})
    diffs = [f"{k}: adapter {theirs.get(k)!r} vs model {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    saved_mem = config.get("memory", {})
    keys = ("knowledge_length", "fusion_dim") if fmt in _RETRAIN_FORMATS else SHAPE_KEYS
    if start_from and not saved_setting(saved_mem, "reader_encoder") and model.settings.reader_encoder:
        # Weights from before the question encoder start a run with one: it starts fresh, and its
        # zero last layer leaves the model they were trained as.
        params = {n: p for n, p in params.items() if ".q_encoder." not in n}
        keys = tuple(k for k in keys if k != "reader_encoder")
    for k in keys:
        saved_k = saved_setting(saved_mem, k)
        if saved_k != getattr(model.settings, k):
            diffs.append(f"model.{k}: adapter {saved_k!r} vs model {getattr(model.settings, k)!r}")
    if diffs:  # the tensors' differences follow from these: name the settings alone
        raise UserError(f"weights {folder} do not fit this model: " + "; ".join(diffs[:6]))
    for n, p in params.items():
        if n not in tensors:
            diffs.append(f"{n}: missing from adapter")
        elif tensors[n].shape != p.shape:
            diffs.append(f"{n}: adapter shape {tuple(tensors[n].shape)} vs model {tuple(p.shape)}")
    if fmt not in _RETRAIN_FORMATS:  # a tensor this model has no place for: weights of a newer design
        everything = memory_parameters(model)
        diffs += [f"{n}: in the adapter, not in this model" for n in sorted(tensors) if n not in everything]
    if diffs:
        raise UserError(f"weights {folder} do not fit this model: " + "; ".join(diffs[:6]))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    return config
