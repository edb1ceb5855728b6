"""Typed configuration: dataclass schema, YAML files under `configs/`, `section.key=value` overrides.

The schema is the single source of truth. YAML files set values, the command line overrides them;
an unknown key or a value of the wrong type stops the program before any work, naming the key and
the closest valid one. Key names of the reference implementation keep their meaning
(`model.qwen3_model_path`, `training.accumulation_steps`, ...).
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MEMORY_MODULES = ("memory_norm", "memory_gate", "gated_memory_fusion")


@dataclass
class ModelConfig:
    # Empty: build (once) and use the project's tiny Qwen3 under `training.output_dir/base`.
    qwen3_model_path: str = ""
    # Memory bank file (safetensors + JSON sidecar). Empty: `training.output_dir/knowledge_cache`.
    cache_path: str = ""
    recompute_cache: bool = False
    # Knowledge JSONL {"uuid","text"} or the reference's sentence_trex_data.json.
    database_init_path: str = ""
    max_seq_len: int = 512
    # Upper bound on bank rows; the bank holds exactly the database's rows up to this many.
    knowledge_num: int = 1048576
    knowledge_length: int = 16
    # Width of the retrieval space (query and key); 0: the backbone's hidden size (identity init).
    knowledge_dim: int = 0
    top_k: int = 8
    # Sub-keys shortlisted per set; of those top_cells² cells, the probe_cells best are read.
    top_cells: int = 128
    probe_cells: int = 2048
    max_cell_rows: int = 16
    # Banks of at most this many rows are ranked whole (exact, and cheaper than a probe that would
    # read a large share of them); 0: always probe.
    scan_rows: int = 8192
    # A layer reads memory only when its retrieved rows contain at least this share of the
    # question's words (IDF-weighted, averaged over the rows by their retrieval weights); below it
    # the layer adds nothing. 0: always read.
    min_match: float = 0.5
    fusion_dim: int = 512
    # Rank of the trained correction to the query map (identity + low rank).
    query_rank: int = 128
    # What each layer's query reads over the question tokens: "embeddings" (layer 0's input,
    # token identity intact) or "layer_input" (that layer's own input hidden states).
    query_from: str = "embeddings"
    use_ema_update: bool = False


@dataclass
class DatasetConfig:
    # Converted SFT records (JSONL or Parquet). Empty: the embedded sample world.
    sft_dataset_path: str = ""
    sft_val_dataset_path: str = ""
    # Adapter folder (trained memory-module weights) loaded before training.
    pretrained_sft_model_path: str = ""
    # Embedded default: how many sample facts, and the share of subjects held out.
    sample_facts: int = 0
    val_fraction: float = 0.2


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    accumulation_steps: int = 1
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    warmup_steps: int = 20
    grad_clip: float = 1.0
    retrieval_loss_weight: float = 1.0
    trainable_modules: list[str] = field(default_factory=lambda: list(MEMORY_MODULES))
    num_workers: int = 2
    use_gpu: bool = False
    torch_threads: int = 1
    seed: int = 42
    checkpoint_every: int = 50
    max_failures: int = 2
    shuffle: bool = True
    eval_batch_size: int = 32
    max_eval_samples: int = 0  # 0 = all validation rows
    # Fault injection for tests: the last worker's process exits once, at this optimizer step.
    fail_at_step: int = 0


@dataclass
class LoggingConfig:
    swanlab_mode: str = "offline"  # online | offline | local | disabled
    project: str = "explicitlm"
    run_name: str = ""
    log_every: int = 10


@dataclass
class ServeConfig:
    weights: str = ""
    # The server's own memory bank, which edits change. Empty: `{weights}/serving/<bank file name>`,
    # copied (with every file beside it whose name starts with the bank's) from the training bank
    # (`model.cache_path`) on first start. The training bank is never written by the server.
    cache_path: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    # auto: cuda when available, else cpu
    device: str = "auto"
    # auto: bfloat16 on CUDA and on CPUs with native bf16 matrix units (AVX512-BF16, AMX), else float32
    dtype: str = "auto"
    # Plain uvicorn: run the model in its own process, so HTTP handling and the forward pass do not
    # share one GIL. Ray Serve replicas are processes of their own already.
    model_process: bool = True
    # Torch threads of the model; 0: torch's default (the CPUs the process may use; a Ray Serve
    # replica gets its replica_cpus through OMP_NUM_THREADS).
    torch_threads: int = 0
    num_replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # Request limits (the token limit is model.max_seq_len): longer requests get a 422.
    max_options: int = 26
    max_question_chars: int = 2000
    max_option_chars: int = 500
    max_text_chars: int = 1000
    # The bank file is rewritten from memory (in the background) after this many logged edits.
    compact_every: int = 1000
    # A memory search stops after this long and returns what it found, marked incomplete.
    search_timeout_s: float = 1.0


@dataclass
class EvalConfig:
    weights: str = ""
    data: str = ""
    batch_size: int = 32
    max_samples: int = 0
    # After training, on the validation questions whose uuid names a memory row: the bare
    # backbone, the trained model with those rows removed, and with each row edited to name a
    # wrong option (`explicitlm.evaluation.memory_checks`). Runs on the driver.
    memory_checks: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key."""


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        value = getattr(schema, f.name)
        if is_dataclass(value):
            keys.extend(_valid_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _key_error(key: str) -> ConfigError:
    valid = _valid_keys(Config())
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # compare the last component too: training.lr -> training.learning_rate
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.5)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _merge(base: Any, update: Any, source: str, key: str | None = None) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise _key_error(key or e.full_key) from None
    except ValidationError as e:
        raise ConfigError(f"{source}: bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None


def load_config(config_name: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then `configs/{config_name}.yaml` (or a YAML path), then `key=value` overrides."""
    cfg = OmegaConf.structured(Config)
    if config_name:
        path = Path(config_name)
        if path.suffix not in (".yaml", ".yml"):
            path = CONFIG_DIR / f"{config_name}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in CONFIG_DIR.rglob("*.yaml"))
            raise ConfigError(f"config '{config_name}' not found ({path}); available: {', '.join(names)}")
        try:
            loaded = OmegaConf.load(path)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key = item.split("=", 1)[0].strip()
        if "." not in key:
            raise _key_error(key)
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), "command line", key)
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Checks that need more than a type: ranges and choices."""
    bad_modules = set(cfg.training.trainable_modules) - set(MEMORY_MODULES)
    if bad_modules or not cfg.training.trainable_modules:
        raise ConfigError(
            f"training.trainable_modules must be a non-empty subset of {list(MEMORY_MODULES)}, got {cfg.training.trainable_modules}"
        )
    if cfg.logging.swanlab_mode not in ("online", "offline", "local", "disabled"):
        raise ConfigError(
            f"logging.swanlab_mode must be online, offline, local or disabled, got '{cfg.logging.swanlab_mode}'"
        )
    if cfg.model.query_from not in ("embeddings", "layer_input"):
        raise ConfigError(f"model.query_from must be embeddings or layer_input, got '{cfg.model.query_from}'")
    if cfg.serve.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"serve.dtype must be auto, float32 or bfloat16, got '{cfg.serve.dtype}'")
    if cfg.model.use_ema_update:
        raise ConfigError(
            "model.use_ema_update=true is not supported: SFT does not update the memory bank by EMA; "
            "the bank is explicit text, edit it instead"
        )
    positive = {
        "model.knowledge_length": cfg.model.knowledge_length,
        "model.top_k": cfg.model.top_k,
        "model.top_cells": cfg.model.top_cells,
        "model.probe_cells": cfg.model.probe_cells,
        "model.max_seq_len": cfg.model.max_seq_len,
        "training.batch_size": cfg.training.batch_size,
        "training.accumulation_steps": cfg.training.accumulation_steps,
        "training.checkpoint_every": cfg.training.checkpoint_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.serve.torch_threads < 0:
        raise ConfigError(f"serve.torch_threads must be 0 or more, got {cfg.serve.torch_threads}")
    if cfg.serve.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"serve.device must be auto, cpu or cuda, got '{cfg.serve.device}'")
    if not 2 <= cfg.serve.max_options <= 26:
        raise ConfigError(
            f"serve.max_options must be 2 to 26 (options are labelled A to Z), got {cfg.serve.max_options}"
        )
    serve_positive = {
        "serve.max_question_chars": cfg.serve.max_question_chars,
        "serve.max_option_chars": cfg.serve.max_option_chars,
        "serve.max_text_chars": cfg.serve.max_text_chars,
        "serve.compact_every": cfg.serve.compact_every,
        "serve.search_timeout_s": cfg.serve.search_timeout_s,
        "serve.max_batch_size": cfg.serve.max_batch_size,
    }
    for key, value in serve_positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.serve.replica_gpus < 0 or cfg.serve.replica_cpus < 0:
        raise ConfigError("serve.replica_cpus and serve.replica_gpus must be 0 or more")
    if cfg.model.scan_rows < 0:
        raise ConfigError(f"model.scan_rows must be 0 or more, got {cfg.model.scan_rows}")
    if not 0.0 <= cfg.model.min_match <= 1.0:
        raise ConfigError(f"model.min_match is a share of the question's words, 0 to 1; got {cfg.model.min_match}")
    if cfg.model.knowledge_dim < 0:
        raise ConfigError(f"model.knowledge_dim must be 0 (the hidden size) or positive, got {cfg.model.knowledge_dim}")
    if cfg.training.num_workers < 1:
        raise ConfigError(f"training.num_workers must be at least 1, got {cfg.training.num_workers}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def parse_cli(argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """`[--config-name NAME] key=value ...` -> Config; exits with code 2 on a config error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = default_config
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print("usage: [--config-name NAME] section.key=value ...\n\nconfig keys and defaults:\n")
            print(to_yaml(Config()))
            raise SystemExit(0)
        if arg == "--config-name":
            if i + 1 >= len(argv):
                raise SystemExit("error: --config-name needs a value")
            name = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        else:  # the reference's `--section.key=value` spelling works too
            overrides.append(arg[2:] if arg.startswith("--") and "=" in arg else arg)
        i += 1
    try:
        return load_config(name, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
