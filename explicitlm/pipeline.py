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
from explicitlm.errors import UserError
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
            n_train, n_val = split_by_subject(
                data / "all.parquet", data / "train.parquet", data / "val.parquet", d.val_fraction
            )
            print(
                f"prepare: sample world in {data}: {summary.converted:,} questions converted on Ray Data, "
                f"split by subject into {n_train:,} train and {n_val:,} validation"
            )
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
    """Build or load (and check) the memory bank that `model.*` names."""
    from transformers import AutoTokenizer

    from explicitlm.bank import load_or_build_bank

    if not cfg.model.cache_path:
        raise ValueError("no memory bank: set model.cache_path (and model.database_init_path to build it)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path)
    return load_or_build_bank(
        cfg.model.cache_path,
        cfg.model.database_init_path,
        tokenizer,
        cfg.model.knowledge_length,
        cfg.model.knowledge_num,
        cfg.model.recompute_cache,
    )


def to_parquet_records(path: str, out_dir: Path) -> str:
    """A question file as converted records in Parquet with `idx`: Parquet is used as it is, JSONL
    records are rewritten once, raw OMCQ is converted first (Ray Data)."""
    from explicitlm.convert import SFT_SCHEMA, convert
    from explicitlm.readers import check_parquet_records, question_format, read_records

    if question_format(path) == "omcq":
        target = out_dir / "data" / (Path(path).stem + ".sft.parquet")
        if target.exists() and target.stat().st_mtime >= Path(path).stat().st_mtime:
            return str(target)  # converted by an earlier call or run
        summary = convert(path, target, fmt="parquet", progress=False)
        if summary.truncated_at is not None or not summary.converted:
            problem = (
                f"ends mid-array after byte {summary.truncated_at}"
                if summary.truncated_at is not None
                else f"has no usable question (all {summary.items:,} items rejected: "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(summary.rejected.items()))
                + ")"
            )
            raise UserError(f"{path} {problem}; see explicitlm-convert --input {path} for the rows it rejects")
        rejected = sum(summary.rejected.values())
        print(
            f"prepare: {path} is raw OMCQ: converted {summary.converted:,} questions to {target}"
            + (f" ({rejected:,} rejected rows in {summary.rejects})" if rejected else "")
        )
        return str(target)
    if path.endswith(".parquet"):
        check_parquet_records(path)
        return path
    target = out_dir / (Path(path).stem + ".parquet")
    rows = read_records(path)
    for r in rows:
        for k in ("subject", "predicate", "uuid"):
            r[k] = r.get(k) or ""
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), target)
    return str(target)
