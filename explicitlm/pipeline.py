"""Driver-side preparation shared by the jobs: the embedded default, data splits, the memory bank.

With no paths configured, `prepare` builds everything the main job needs under
`training.output_dir`: the tiny Qwen3 (`base/`), the sample world (`data/`), its conversion on Ray
Data, a split by subject into train and validation, and the memory bank. Paths the user gives are
used as they are.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.base import is_base_folder, make_base
from explicitlm.config import Config, save_config
from explicitlm.split import subject_split
from explicitlm.world import write_world


def _abs(p: str) -> str:
    return str(Path(p).expanduser().resolve()) if p else p


def split_by_subject(records_path: Path, train_path: Path, val_path: Path, val_fraction: float) -> tuple[int, int]:
    """Every record of a subject lands on one side: no validation subject is ever trained on."""
    table = pq.read_table(records_path)
    subjects = table.column("subject").to_pylist()
    questions = table.column("question").to_pylist()
    is_val = [subject_split(s or q, val_fraction) == "val" for s, q in zip(subjects, questions)]
    mask = pa.array(is_val)
    train = table.filter(pa.compute.invert(mask))
    val = table.filter(mask)
    for t, p in ((train, train_path), (val, val_path)):
        t = t.set_column(t.schema.get_field_index("idx"), "idx", pa.array(range(len(t)), pa.int64()))
        pq.write_table(t, p)
    return len(train), len(val)


def prepare(cfg: Config) -> Config:
    """Resolve (and where empty, build) every input of the SFT job; returns the filled-in config."""
    out = Path(cfg.training.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.training.output_dir = str(out)
    m, d = cfg.model, cfg.dataset
    if not m.qwen3_model_path:
        m.qwen3_model_path = str(out / "base")
        if not is_base_folder(m.qwen3_model_path):
            print(f"prepare: building the tiny Qwen3 in {m.qwen3_model_path}")
            make_base(m.qwen3_model_path, seed=cfg.training.seed)
    if not d.sft_dataset_path:
        data = out / "data"
        if not (data / "train.parquet").exists():
            from explicitlm.convert import convert

            paths = write_world(data, seed=cfg.training.seed, max_facts=d.sample_facts)
            summary = convert(paths["omcq"], data / "all.parquet", fmt="parquet", progress=False)
            print(f"prepare: converted the sample world: {summary.as_dict()}")
            n_train, n_val = split_by_subject(
                data / "all.parquet", data / "train.parquet", data / "val.parquet", d.val_fraction
            )
            print(f"prepare: split by subject: {n_train} train, {n_val} validation questions")
        d.sft_dataset_path = str(data / "train.parquet")
        d.sft_val_dataset_path = str(data / "val.parquet")
        if not m.database_init_path:
            m.database_init_path = str(data / "knowledge.jsonl")
    for obj, key in (
        (m, "qwen3_model_path"),
        (m, "database_init_path"),
        (d, "sft_dataset_path"),
        (d, "sft_val_dataset_path"),
        (d, "pretrained_sft_model_path"),
    ):
        setattr(obj, key, _abs(getattr(obj, key)))
    if not m.cache_path:
        m.cache_path = str(out / "knowledge_cache.parquet")
    m.cache_path = _abs(m.cache_path)
    save_config(cfg, out / "config.yaml")
    return cfg


def ensure_bank(cfg: Config):
    """Build or load (and check) the memory bank that `model.*` names, and cache its index beside it
    (once, here, so that training workers load it instead of computing it each)."""
    from transformers import AutoTokenizer

    from explicitlm.bank import load_or_build_bank
    from explicitlm.index import bank_index, index_cache_path
    from explicitlm.model import MemorySettings

    if not cfg.model.cache_path:
        raise ValueError("no memory bank: set model.cache_path (and model.database_init_path to build it)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path)
    m = cfg.model
    bank = load_or_build_bank(
        m.cache_path, m.database_init_path, tokenizer, m.knowledge_length, m.knowledge_num, m.recompute_cache
    )
    s = MemorySettings.from_model_config(m, seed=cfg.training.seed)
    bank_index(bank, s.knowledge_dim, s.seed, s.max_cell_rows, s.max_recent_rows, index_cache_path(m.cache_path))
    return bank


def to_parquet_records(path: str, out_dir: Path) -> str:
    """A converted SFT file as Parquet with `idx` (JSONL is rewritten once; Parquet is used as is)."""
    from explicitlm.convert import SFT_SCHEMA
    from explicitlm.readers import read_records

    if path.endswith(".parquet"):
        return path
    target = out_dir / (Path(path).stem + ".parquet")
    rows = read_records(path)
    for r in rows:
        for k in ("subject", "predicate", "uuid"):
            r[k] = r.get(k) or ""
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), target)
    return str(target)
