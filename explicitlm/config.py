"""Typed configuration: dataclass schema, YAML files under `configs/`, `section.key=value` overrides.

The schema is the single source of truth. YAML files set values, the command line overrides them;
an unknown key or a value of the wrong type stops the program before any work, naming the key and
the closest valid one. Key names of the reference implementation keep their meaning
(`model.qwen3_model_path`, `training.accumulation_steps`, ...).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import math
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from explicitlm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MEMORY_MODULES = ("memory_norm", "memory_gate", "gated_memory_fusion")


@dataclass
class ModelConfig:
    # Local Qwen3 folder (config.json, weights, tokenizer). Empty: build (once) and use the project's
    # tiny Qwen3 under `training.output_dir/base`.
    qwen3_model_path: str = ""
    # Memory bank file (Parquet). Empty: `training.output_dir/knowledge_cache.parquet`.
    cache_path: str = ""
    # Build the bank from `database_init_path` again even if `cache_path` exists (edits made to the
    # bank file are lost).
    recompute_cache: bool = False
    # Knowledge JSONL {"uuid","text"} or the reference's sentence_trex_data.json.
    database_init_path: str = ""
    # Longest training or scoring sequence in tokens; records whose answer it would cut are skipped.
    max_seq_len: int = 512
    # Upper bound on bank rows; the bank holds exactly the database's rows up to this many.
    knowledge_num: int = 1048576
    # Tokens per memory row (longer sentences are cut, and the bank's build says what they lost).
    # auto: the length that 99% of the bank's sentences fit whole, fixed when the bank is built and
    # kept in its file.
    knowledge_length: int | str = 16
    # Width of the retrieval space: every word's vector and every row's key (a multiple of 64).
    knowledge_dim: int = 256
    # Candidate rows each layer's reader reads per question (the best by TF-IDF cosine).
    top_k: int = 16
    # Rows the exact stage scores for each question (from the index's approximate ranking).
    candidates: int = 64
    # Rows found by inverted lists that the exact stage scores too: those containing the most of the
    # question's rarest words (IDF-weighted), up to this many. 0: the index's candidates alone. A bank
    # ranked whole (scan_rows) takes as many more of its ranking's best rows instead.
    posting_rows: int = 128
    # Sub-keys shortlisted per set; of those top_cells² cells, the probe_cells best are read.
    top_cells: int = 128
    # Cells of the product-key grid whose rows are ranked exactly.
    probe_cells: int = 128
    # Rows per cell before a row spills to its next-best cell (a full set of choices overflows).
    max_cell_rows: int = 16
    # Banks of at most this many rows are ranked whole by their keys (exact, and cheaper than a probe
    # or lists that would read a large share of them); 0: always probe.
    scan_rows: int = 8192
    # Rows edited since the cells were laid out are scanned exactly; past this many, they are laid out.
    max_recent_rows: int = 4096
    # Hidden width of each layer's fusion MLP.
    fusion_dim: int = 512
    # Width of each layer's reader (the attention between question and row tokens).
    reader_dim: int = 64
    # Width of a small MLP (GELU) beside the reader's linear projection of each question token, so
    # that the many words questions use can each be mapped to what rows say; 0: the projection alone.
    reader_encoder: int = 256
    # Answering (not training): a layer whose reader's trust (1 - P(no row answers)) is below this
    # writes nothing, instead of a write scaled down by the trust; 0 keeps every write soft.
    min_trust: float = 0.0
    # Answering (not training): false cuts the exclusion's write, so what the reader rules out is not
    # written down (the reading alone answers; what the exclusion adds, measured by quality.py).
    exclusion: bool = True
    # What each layer's reader reads of the question: "embeddings" (layer 0's input, token identity
    # intact; every layer reads memory once per forward, before the backbone runs) or "layer_input"
    # (that layer's input, for a pretrained backbone whose hidden states carry meaning).
    query_from: str = "embeddings"
    # Accepted for compatibility with the reference's configs; true is refused (edit the bank instead).
    use_ema_update: bool = False
    # The frozen backbone's weights: auto (bfloat16 on a GPU, float32 on a CPU), bfloat16 or float32.
    # The memory modules train in float32 either way, under bfloat16 autocast with a bf16 backbone.
    dtype: str = "auto"


@dataclass
class DatasetConfig:
    # Training questions: converted SFT records (JSONL or Parquet) or raw OMCQ, which is converted
    # first. Empty: the embedded sample world.
    sft_dataset_path: str = ""
    # Validation questions, in the same formats; scored at every epoch's end. Empty: none (with the
    # sample world: its held-out subjects).
    sft_val_dataset_path: str = ""
    # Weights folder (trained memory modules) to start training from.
    pretrained_sft_model_path: str = ""
    # Embedded default: how many sample facts (0: all).
    sample_facts: int = 0
    # Embedded default: the share of subjects held out for validation.
    val_fraction: float = 0.2


@dataclass
class TrainingConfig:
    # Everything a run writes: weights, bank, metrics, checkpoints; the same folder again resumes, with the
    # same settings for the keys that make the run what it is (`explicitlm.checkpoint.RUN_KEYS`).
    output_dir: str = "runs/default"
    # Peak AdamW learning rate (after warmup; cosine decay to the end).
    learning_rate: float = 2e-3
    # AdamW weight decay of the memory modules.
    weight_decay: float = 0.0
    # The readers' priors (the weights on a row's word statistics and the null biases, set large at
    # the start so that an untrained reader ranks rows as lexical retrieval does) train at this
    # multiple of the learning rate (and of the weight decay), so a run can let them move further
    # than AdamW's lr-sized steps do.
    prior_lr_scale: float = 1.0
    # Questions per micro-batch on each worker.
    batch_size: int = 16
    # Micro-batches per optimizer step (gradient accumulation).
    accumulation_steps: int = 1
    # Passes over the training questions.
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    # Optimizer steps of linear warmup.
    warmup_steps: int = 20
    # Gradient-norm clipping; 0: off.
    grad_clip: float = 1.0
    # Weight of the reading loss (which row answers, or none, and where its answer is; known from a
    # record's uuid) beside the answer's loss.
    retrieval_loss_weight: float = 1.0
    # Weight of the option loss (the right option's first token against the others', multiple-choice
    # questions only; `explicitlm.objective.option_loss`): what teaches memory to write a wrong option down.
    option_loss_weight: float = 1.0
    # Share of training questions whose own memory row is kept from the reader, so that it learns to
    # trust no row when the bank lacks the fact (their other rows about the subject stay).
    absent_rate: float = 0.2
    # Share of training questions whose rows that name a wrong option and not the right one (in
    # quality.py's data, the other fact about the subject) are kept from the reader, drawn apart from
    # absent_rate: without it the exclusion only ever sees the asked fact beside another and learns
    # to rule out whichever row the reader doubts, the asked fact's own in a wording training never used.
    others_absent_rate: float = 0.2
    # What a question whose own row is hidden (absent_rate) is taught to answer. "answer": the right
    # answer, as any question. "spread": no LM loss on its answer (the logged loss leaves it out) and,
    # asked with options, its option loss spread evenly over those no row the reader sees rules out;
    # asked without, nothing ("spread_choices": asked without, its answer). On the tiny backbone's dev
    # run, spread answered the facts in the bank better in unseen wordings and named a missing fact's
    # neighbour's object more often (benchmarks/HISTORY.md): a trade, not a gain.
    absent_target: str = "answer"
    # Share of a training question's tokens kept from the memory readers, drawn anew each pass (word
    # dropout): no one token's state can carry the reading, so wordings training never used might read
    # better. The backbone, the retrieval and the word features (whether a row's word occurs in the
    # question) still see every token. The masks follow from the seed, the worker, the step and the
    # micro-batch, so a resumed run draws the ones it would have drawn.
    word_dropout: float = 0.0
    # Weight of a second reading loss on every question: the null against every candidate row but the
    # question's own (what a question whose own row is hidden teaches), so that another fact about the
    # subject scores below "no row answers", not only below the asked fact's row. A question whose own
    # row is hidden already has that as its loss: it counts 1 + others_null times.
    others_null: float = 0.0
    # Share of training questions asked without options, their answer generated from memory (the
    # rest keep the reference's multiple-choice form).
    open_answer_share: float = 0.5
    # Memory modules that train, e.g. [gated_memory_fusion] freezes the gate; a bare name is a list of one.
    trainable_modules: list[str] = field(default_factory=lambda: list(MEMORY_MODULES))
    # Ray Train workers (data parallel).
    num_workers: int = 2
    # One GPU per worker (a cluster's GPU nodes).
    use_gpu: bool = False
    # Torch threads per worker.
    torch_threads: int = 1
    # Seeds the memory modules, the shuffling and, with the embedded default, the tiny base and the sample world.
    seed: int = 42
    # Optimizer steps between checkpoints (every epoch's end checkpoints too).
    checkpoint_every: int = 50
    # Restarts of a run whose worker died, from its latest checkpoint.
    max_failures: int = 2
    # Shuffle the training questions every epoch (seeded).
    shuffle: bool = True
    # Batch questions of about the same length together (within windows of 64 batches, the batches
    # then shuffled when `shuffle` is), so a batch pads little: the answer's length first, then the
    # prompt's (the whole sequence's with gradient_checkpointing). Every worker's i-th batch comes from
    # the same place of the same window, so the workers' batches at a step are about as long.
    group_by_length: bool = True
    # Option sequences per forward pass when scoring validation questions.
    eval_batch_size: int = 32
    max_eval_samples: int = 0  # 0 = all validation rows
    # Fault injection for tests: the last worker's process exits once, at this optimizer step.
    fail_at_step: int = 0
    # Recompute the backbone's activations in the backward pass instead of keeping them.
    gradient_checkpointing: bool = False
    # Memory of one worker's GPU in GB, for the estimate the job prints before it starts (a config
    # that cannot fit stops there). 0: unknown on the driver; each GPU worker checks its own device.
    gpu_memory_gb: float = 0.0
    # Extra Ray resources each training worker asks for (e.g. {"accelerator_type:A10G": 0.001}, or a
    # custom resource that pins workers to some nodes).
    worker_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    swanlab_mode: str = "offline"  # online | offline | local | disabled
    # SwanLab project name.
    project: str = "explicitlm"
    # SwanLab run name; empty: SwanLab picks one.
    run_name: str = ""
    # Optimizer steps between metric lines in metrics.jsonl and SwanLab.
    log_every: int = 10


@dataclass
class ServeConfig:
    # Weights folder to serve (`sft_latest/` of a run); its backbone and bank come with it.
    weights: str = ""
    # The server's own memory bank, which edits change. Empty: `{weights}/serving/<bank file name>`,
    # copied (with every file beside it whose name starts with the bank's) from the training bank
    # (`model.cache_path`) on first start. The training bank is never written by the server.
    cache_path: str = ""
    # Address to listen on; 127.0.0.1 is this machine only.
    host: str = "127.0.0.1"
    # Port to listen on.
    port: int = 8000
    # Most option sequences in one forward pass of the dynamic batcher.
    max_batch_size: int = 32
    # How long a batch waits for more requests, counted from its first request's arrival.
    batch_wait_timeout_s: float = 0.01
    # Device of the model: auto (cuda when available, else cpu), cpu or cuda.
    device: str = "auto"
    # auto: bfloat16 on CUDA and on CPUs with native bf16 matrix units (AVX512-BF16, AMX), else float32
    dtype: str = "auto"
    # Plain uvicorn: run the model in its own process, so HTTP handling and the forward pass do not
    # share one GIL. Ray Serve replicas are processes of their own already.
    model_process: bool = True
    # Torch threads of the model; 0: torch's default (the CPUs the process may use; a Ray Serve
    # replica gets its replica_cpus through OMP_NUM_THREADS).
    torch_threads: int = 0
    # On a CPU, the kernels oneDNN keeps, one per operation and batch shape (its primitive cache). Under
    # bfloat16 with batches of every size, the tiny model held about 1 GB more than float32 with the
    # library's 1,024; 256 saved about 0.4 GB of it and 64 about 0.5 GB, within a few percent of the
    # same speed (README, benchmarks/serve_memory.py). ONEDNN_PRIMITIVE_CACHE_CAPACITY, when set, wins.
    onednn_cache: int = 256
    # Ray Serve replicas.
    num_replicas: int = 1
    # CPUs per Ray Serve replica.
    replica_cpus: float = 1.0
    # GPUs per Ray Serve replica (1 on a GPU cluster).
    replica_gpus: float = 0.0
    # Most options a request may give (the token limit is model.max_seq_len): more get a 422.
    max_options: int = 26
    # Longest generated answer in tokens, for a question asked without options.
    max_new_tokens: int = 24
    # false: answer with the bare backbone (memory not read), to measure what memory costs and adds.
    memory: bool = True
    # Longest question a request may give, in characters.
    max_question_chars: int = 2000
    # Longest option a request may give, in characters.
    max_option_chars: int = 500
    # Longest memory row an edit may write, in characters.
    max_text_chars: int = 1000
    # The bank file is rewritten from memory (in the background) after this many logged edits.
    compact_every: int = 1000
    # At most one rewrite of the bank file per this many seconds (a million rows take seconds to write).
    compact_interval_s: float = 30.0
    # A memory search stops after this long and returns what it found, marked incomplete.
    search_timeout_s: float = 1.0
    # The longest a request waits for the model (an answer, the readiness probe) or for the bank's
    # owner (an edit): past it, a 504 with Retry-After (an edit's says how to learn its outcome).
    request_timeout_s: float = 30.0
    # Most questions waiting for the model beyond the batch it is answering: more get a 503 with
    # Retry-After (under Ray Serve, per model replica).
    max_queue: int = 256
    # Recent edits remembered across restarts: an edit sent again with the same Idempotency-Key gets
    # the first one's outcome, and GET /memory/rows/{uuid} says which of them last changed the row.
    edit_history: int = 10000
    # A file holding the key that editing and searching need (read by the server's own processes);
    # empty: the EXPLICITLM_API_KEY of the server's environment (under Ray, of each replica's process).
    api_key_file: str = ""


@dataclass
class EvalConfig:
    # Weights folder to evaluate (`sft_latest/` of a run); empty: the untrained memory (the backbone alone).
    weights: str = ""
    # Questions to score, as OMCQ (JSON array or JSONL) or converted records (JSONL or Parquet).
    data: str = ""
    # Option sequences per forward pass.
    batch_size: int = 32
    # Score at most this many questions; 0: all.
    max_samples: int = 0
    # choice: pick among each question's options; open: generate the answer without them, judged by
    # exact match after normalisation (case, accents, punctuation, leading articles) and token F1.
    mode: str = "choice"
    # Longest generated answer in tokens (eval.mode=open).
    max_new_tokens: int = 24
    # After training, on the validation questions whose uuid names a memory row: the bare
    # backbone, the trained model with those rows removed, and with each row edited to name a
    # wrong option (`explicitlm.evaluation.memory_checks`). Runs on the driver.
    memory_checks: bool = True
    # Where the evaluation's model runs: auto (cuda when the process running it sees one), cpu or cuda.
    device: str = "auto"
    # More than 0: evaluate in a Ray task holding this many GPUs (on a cluster, on a GPU worker, whose
    # node must see the weights, bank and data at the same paths: shared storage); 0: in this process.
    num_gpus: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(UserError, ValueError):
    """A config key or value is invalid; the message names the key."""


def field_help(schema: type) -> dict[str, str]:
    """Each field's description: the comment lines right above it and the comment at the end of its
    line, as written in the dataclass (the one place a key is described)."""
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):  # no source (a frozen build): keys without descriptions
        return {}
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        inline = comments.get(node.end_lineno)
        out[node.target.id] = " ".join(above + ([inline] if inline else []))
    return out


def schema_fields(schema: Any = Config, prefix: str = "") -> list[tuple[str, Any, str, Any]]:
    """Every leaf key of the schema: (dotted key, default, description, type)."""
    instance = schema() if isinstance(schema, type) else schema
    helps = field_help(type(instance))
    out = []
    for f in fields(instance):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            out.extend(schema_fields(value, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value, helps.get(f.name, ""), f.type))
    return out


def _valid_keys() -> list[str]:
    return [key for key, *_ in schema_fields()]


# What people call a key elsewhere (HF Trainer, torchtune, the reference's scripts) -> its name here.
_SYNONYMS = {
    "lr": "learning_rate",
    "learningrate": "learning_rate",
    "bs": "batch_size",
    "batch": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "epoch": "epochs",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "num_train_epochs": "epochs",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "grad_accum": "accumulation_steps",
    "gradient_accumulation_steps": "accumulation_steps",
    "grad_accumulation": "accumulation_steps",
    "max_grad_norm": "grad_clip",
    "clip_grad": "grad_clip",
    "warmup": "warmup_steps",
    "num_warmup_steps": "warmup_steps",
    "wd": "weight_decay",
    "workers": "num_workers",
    "gpu": "use_gpu",
    "gpus": "use_gpu",
    "cuda": "use_gpu",
    "threads": "torch_threads",
    "out": "output_dir",
    "output": "output_dir",
    "out_dir": "output_dir",
    "save_dir": "output_dir",
    "save_steps": "checkpoint_every",
    "save_every": "checkpoint_every",
    "checkpoint_steps": "checkpoint_every",
    "model": "qwen3_model_path",
    "model_path": "qwen3_model_path",
    "model_name_or_path": "qwen3_model_path",
    "base_model": "qwen3_model_path",
    "backbone": "qwen3_model_path",
    "bank": "cache_path",
    "bank_path": "cache_path",
    "memory_bank": "cache_path",
    "knowledge_cache": "cache_path",
    "knowledge": "database_init_path",
    "knowledge_path": "database_init_path",
    "train_data": "sft_dataset_path",
    "train_file": "sft_dataset_path",
    "dataset_path": "sft_dataset_path",
    "val_data": "sft_val_dataset_path",
    "validation_file": "sft_val_dataset_path",
    "seq_len": "max_seq_len",
    "max_length": "max_seq_len",
    "topk": "top_k",
    "adapter": "weights",
    "weights_path": "weights",
    "checkpoint": "weights",
    "mode": "swanlab_mode",
    "swanlab": "swanlab_mode",
    "replicas": "num_replicas",
}


def _closeness(leaf: str, candidate: str) -> float:
    """How well an unknown key name matches a valid one, by meaning and by spelling (0 to 1)."""
    if _SYNONYMS.get(leaf) == candidate or leaf == candidate:
        return 1.0
    words = candidate.split("_")
    score = difflib.SequenceMatcher(None, leaf, candidate).ratio()
    if len(leaf) >= 2 and leaf == "".join(w[0] for w in words):  # an abbreviation: wd, bs
        score = max(score, 0.9)
    if leaf in words or leaf.replace("_", "") == candidate.replace("_", ""):
        score = max(score, 0.8)
    return score


def suggest_keys(key: str, n: int = 1) -> list[str]:
    """Valid keys closest to an unknown one: the key's name weighs most, then its section."""
    section, _, leaf = key.lower().replace("-", "_").rpartition(".")
    ranked = []
    for candidate in _valid_keys():
        c_section, _, c_leaf = candidate.rpartition(".")
        near = (
            1.0
            if not section or section == c_section
            else 0.8 + 0.15 * difflib.SequenceMatcher(None, section, c_section).ratio()
        )
        ranked.append((_closeness(leaf, c_leaf) * near, candidate))
    ranked.sort(key=lambda t: -t[0])
    return [k for score, k in ranked[:n] if score >= 0.6]


def _key_error(key: str) -> ConfigError:
    close = suggest_keys(key)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if "." not in key:
        return ConfigError(f"unknown config key '{key}': keys are section.key{hint}")
    return ConfigError(f"unknown config key '{key}'{hint}; --help lists them")


def _expected(key: str) -> str:
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
    for k, default, _, kind in schema_fields():
        if k == key:
            if isinstance(default, list):
                return "a list like [a,b] (or one bare value)"
            return kinds.get(type(default), str(kind))
    return "another value"


def _merge(base: Any, update: Any, source: str, key: str | None = None) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise _key_error(key or e.full_key) from None
    except ValidationError as e:
        shown = OmegaConf.select(update, e.full_key, default=None) if e.full_key else None
        value = f"={shown}" if shown is not None and not OmegaConf.is_config(shown) else ""
        raise ConfigError(f"{source}: {e.full_key}{value}: expected {_expected(e.full_key)}") from None


def _list_override(cfg: Any, key: str, value: str) -> str:
    """`key=a` and `key=a,b` for a list key mean `key=[a]` and `key=[a,b]`."""
    if isinstance(OmegaConf.select(cfg, key, default=None), ListConfig) and not value.strip().startswith("["):
        return f"{key}=[{value}]"
    return f"{key}={value}"


def load_config(config_name: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then `configs/{config_name}.yaml` (or a YAML path), then `key=value` overrides."""
    cfg = OmegaConf.structured(Config)
    if config_name:
        path = Path(config_name)
        if path.suffix not in (".yaml", ".yml"):  # a name: ./configs first, then the repository's
            local = Path("configs") / f"{config_name}.yaml"
            path = local if local.exists() else CONFIG_DIR / f"{config_name}.yaml"
        if not path.exists():
            names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
            raise ConfigError(f"config '{config_name}' not found ({path}); available: {', '.join(names)}")
        try:
            loaded = OmegaConf.load(path)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
        # A YAML's `???` marks a value the config has no default for; merging would keep the schema's.
        for key in OmegaConf.missing_keys(loaded):
            OmegaConf.update(cfg, key, MISSING)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"'{item}' is not of the form section.key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if "." not in key:
            raise _key_error(key)
        try:
            update = OmegaConf.from_dotlist([_list_override(cfg, key, value)])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"command line: {item}: not a value ({' '.join(str(e).split()[:8])})") from None
        cfg = _merge(cfg, update, "command line", key)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"{key} must be set for config '{config_name}': add {key}=... to the command line")
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Checks that need more than a type: ranges and choices."""
    for name in cfg.training.trainable_modules:
        if name not in MEMORY_MODULES:
            close = difflib.get_close_matches(name, MEMORY_MODULES, n=1, cutoff=0.4)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"training.trainable_modules: '{name}' is not a memory module{hint}; choose from "
                f"{', '.join(MEMORY_MODULES)}, e.g. training.trainable_modules=[memory_gate,gated_memory_fusion]"
            )
    if not cfg.training.trainable_modules:
        raise ConfigError(f"training.trainable_modules is empty; choose from {', '.join(MEMORY_MODULES)}")
    if cfg.logging.swanlab_mode not in ("online", "offline", "local", "disabled"):
        raise ConfigError(
            f"logging.swanlab_mode must be online, offline, local or disabled, got '{cfg.logging.swanlab_mode}'"
        )
    if cfg.eval.mode not in ("choice", "open"):
        raise ConfigError(f"eval.mode must be choice or open, got '{cfg.eval.mode}'")
    if cfg.model.knowledge_dim <= 0 or cfg.model.knowledge_dim % 64:
        raise ConfigError(f"model.knowledge_dim must be a positive multiple of 64, got {cfg.model.knowledge_dim}")
    if cfg.model.query_from not in ("embeddings", "layer_input"):
        raise ConfigError(f"model.query_from must be embeddings or layer_input, got '{cfg.model.query_from}'")
    if cfg.training.gradient_checkpointing and cfg.model.query_from == "layer_input":
        raise ConfigError(
            "training.gradient_checkpointing=true needs model.query_from=embeddings (layer_input retrieves inside each layer)"
        )
    if cfg.model.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be auto, float32 or bfloat16, got '{cfg.model.dtype}'")
    if cfg.training.gpu_memory_gb < 0:
        raise ConfigError(f"training.gpu_memory_gb must be 0 (unknown) or more, got {cfg.training.gpu_memory_gb}")
    if not cfg.training.prior_lr_scale > 0:  # NaN too
        raise ConfigError(f"training.prior_lr_scale must be a positive number, got {cfg.training.prior_lr_scale}")
    if cfg.serve.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"serve.dtype must be auto, float32 or bfloat16, got '{cfg.serve.dtype}'")
    if cfg.model.use_ema_update:
        raise ConfigError(
            "model.use_ema_update=true is not supported: SFT does not update the memory bank by EMA; "
            "the bank is explicit text, edit it instead"
        )
    if not (isinstance(cfg.model.reader_encoder, int) and cfg.model.reader_encoder >= 0):
        raise ConfigError(f"model.reader_encoder must be 0 or a positive width, got {cfg.model.reader_encoder!r}")
    L = cfg.model.knowledge_length
    if not (L == "auto" or (isinstance(L, int) and L > 0)):
        raise ConfigError(f"model.knowledge_length must be a positive number of tokens or auto, got {L!r}")
    positive = {
        "model.top_k": cfg.model.top_k,
        "model.reader_dim": cfg.model.reader_dim,
        "model.fusion_dim": cfg.model.fusion_dim,
        "model.candidates": cfg.model.candidates,
        "model.top_cells": cfg.model.top_cells,
        "model.probe_cells": cfg.model.probe_cells,
        "model.max_seq_len": cfg.model.max_seq_len,
        "training.batch_size": cfg.training.batch_size,
        "training.accumulation_steps": cfg.training.accumulation_steps,
        "training.checkpoint_every": cfg.training.checkpoint_every,
        "serve.max_question_chars": cfg.serve.max_question_chars,
        "serve.max_option_chars": cfg.serve.max_option_chars,
        "serve.max_text_chars": cfg.serve.max_text_chars,
        "serve.compact_every": cfg.serve.compact_every,
        "serve.search_timeout_s": cfg.serve.search_timeout_s,
        "serve.max_batch_size": cfg.serve.max_batch_size,
        "serve.request_timeout_s": cfg.serve.request_timeout_s,
        "serve.max_queue": cfg.serve.max_queue,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.serve.edit_history < 0:
        raise ConfigError(f"serve.edit_history must be 0 or more, got {cfg.serve.edit_history}")
    if cfg.serve.onednn_cache < 0:
        raise ConfigError(f"serve.onednn_cache must be 0 or more, got {cfg.serve.onednn_cache}")
    if cfg.serve.torch_threads < 0:
        raise ConfigError(f"serve.torch_threads must be 0 or more, got {cfg.serve.torch_threads}")
    if cfg.model.posting_rows < 0:
        raise ConfigError(f"model.posting_rows must be 0 or more, got {cfg.model.posting_rows}")
    for key, device in (("serve.device", cfg.serve.device), ("eval.device", cfg.eval.device)):
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{key} must be auto, cpu or cuda, got '{device}'")
    if not cfg.eval.num_gpus >= 0:
        raise ConfigError(f"eval.num_gpus must be 0 or more, got {cfg.eval.num_gpus}")
    if cfg.eval.num_gpus > 0 and cfg.eval.device == "cpu":
        raise ConfigError("eval.num_gpus > 0 holds GPUs for a model that eval.device=cpu keeps off them: drop one")
    if not 2 <= cfg.serve.max_options <= 26:
        raise ConfigError(
            f"serve.max_options must be 2 to 26 (options are labelled A to Z), got {cfg.serve.max_options}"
        )
    if cfg.serve.compact_interval_s < 0:
        raise ConfigError(f"serve.compact_interval_s must be 0 or more, got {cfg.serve.compact_interval_s}")
    if cfg.serve.replica_gpus < 0 or cfg.serve.replica_cpus < 0:
        raise ConfigError("serve.replica_cpus and serve.replica_gpus must be 0 or more")
    if cfg.model.scan_rows < 0:
        raise ConfigError(f"model.scan_rows must be 0 or more, got {cfg.model.scan_rows}")
    for key in ("absent_rate", "others_absent_rate", "open_answer_share"):
        if not 0.0 <= getattr(cfg.training, key) <= 1.0:
            raise ConfigError(
                f"training.{key} is a share of the training questions, 0 to 1; got {getattr(cfg.training, key)}"
            )
    if not (math.isfinite(cfg.training.others_null) and cfg.training.others_null >= 0):
        raise ConfigError(f"training.others_null is a loss weight, 0 or more; got {cfg.training.others_null}")
    if not 0.0 <= cfg.training.word_dropout < 1.0:
        raise ConfigError(
            f"training.word_dropout is a share of a question's tokens, 0 to below 1; got {cfg.training.word_dropout}"
        )
    if cfg.training.absent_target not in ("answer", "spread", "spread_choices"):
        raise ConfigError(
            f"training.absent_target must be answer, spread or spread_choices, got '{cfg.training.absent_target}'"
        )
    if cfg.training.num_workers < 1:
        raise ConfigError(f"training.num_workers must be at least 1, got {cfg.training.num_workers}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def parse_cli(argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """`[--config-name NAME] key=value ...` -> Config; exits with code 2 and one line on a config error.
    The installed commands use `explicitlm.cli.options.load_cli`, which knows their keys."""
    from explicitlm.cli.options import load_cli

    try:
        return load_cli(argv, default_config=default_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
