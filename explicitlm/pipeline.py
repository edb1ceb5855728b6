"""Driver-side preparation shared by the jobs: the embedded default, data splits, the memory bank.

With no paths configured, `prepare` builds everything the main job needs under
`training.output_dir`: the tiny Qwen3 (`base/`), the sample world (`data/`), its conversion on Ray
Data, a split by subject into train and validation, and the memory bank. Paths the user gives are
used as they are.

On a cluster the driver runs on the head, and training workers run on other nodes that may not
have the driver's files. Nothing a worker reads is a driver-local path: the driver reads the
records into the object store (`read_records_dataset`), and puts the bank's files (and a starting
adapter's) there once (`share_files`), for each node to write to a local folder
(`materialise_files`). What workers read and write by path themselves is the backbone folder and
`training.output_dir`: those must be on storage every node can read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.base import is_base_folder, make_base
from explicitlm.config import Config, ConfigError, save_config
from explicitlm.errors import UserError
from explicitlm.split import subject_split
from explicitlm.world import write_world


def absolute_path(p: str) -> str:
    """A path as this process reads it, made absolute (for a process on another node or in another
    folder); an empty one, or a URI (s3://, gs://, ...), as it is."""
    return str(Path(p).expanduser().resolve()) if p and "://" not in p else p


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


def uploaded_working_dir() -> bool:
    """Whether this driver runs in the working dir `ray job submit --working-dir` uploaded: a
    temporary copy on the head, without the data `.rayignore` leaves out, gone after the job."""
    runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    return bool(runtime_env.get("working_dir")) and "working_dir_files" in Path.cwd().parts


def prepare(cfg: Config) -> Config:
    """Resolve (and where empty, build) every input of the SFT job; returns the filled-in config."""
    if uploaded_working_dir():
        for key, value in (
            ("training.output_dir", cfg.training.output_dir),
            ("model.cache_path", cfg.model.cache_path),
        ):
            if value and not Path(value).expanduser().is_absolute():
                raise ConfigError(
                    f"{key}={value} is a relative path, and this job runs in the temporary copy of its working dir "
                    f"that `ray job submit` made on the head: give an absolute path on storage that outlives the job "
                    f"(for training.output_dir, one every node can read, e.g. {key}=/mnt/shared/...)"
                )
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
        setattr(obj, key, absolute_path(getattr(obj, key)))
    if not m.cache_path:
        m.cache_path = str(out / "knowledge_cache.parquet")
    m.cache_path = absolute_path(m.cache_path)
    save_config(cfg, out / "config.yaml")
    return cfg


def ensure_bank(cfg: Config):
    """Build or load (and check) the memory bank that `model.*` names, and cache its index beside it
    (once, here, so that training workers load it instead of computing it each). The bank's row
    length is the config's from here on: model.knowledge_length=auto becomes the number the bank was
    built with, before any worker, weights or estimate reads it."""
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
    m.knowledge_length = bank.knowledge_length
    s = MemorySettings.from_model_config(m, seed=cfg.training.seed)
    bank_index(bank, s.knowledge_dim, s.seed, s.max_cell_rows, s.max_recent_rows, index_cache_path(m.cache_path))
    return bank


def bank_files(cache_path: str | Path) -> list[Path]:
    """The bank file and the files beside it whose names start with its name (its index and
    statistics caches, its edit log)."""
    path = Path(cache_path)
    return [path, *sorted(f for f in path.parent.glob(f"{glob_escape(path.name)}*") if f != path and f.is_file())]


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


SHARE_CHUNK_BYTES = 64 << 20


def share_files(files: list[Path]) -> dict[str, Any]:
    """Put files in the object store once, for the workers of every node to write locally
    (`materialise_files`): {"key", "files": {file name: [refs to byte chunks]}}. Chunks keep the
    driver's memory to one chunk at a time, however large the files are."""
    import numpy as np
    import ray

    digest = hashlib.sha256()
    shared: dict[str, list] = {}
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        refs = []
        with open(f, "rb") as fh:
            while chunk := fh.read(SHARE_CHUNK_BYTES):
                refs.append(ray.put(np.frombuffer(chunk, dtype=np.uint8)))
        shared[f.name] = refs
    return {"key": digest.hexdigest()[:16], "files": shared}


def materialise_files(shared: dict[str, Any], root: str | Path | None = None) -> Path:
    """Write shared files into a folder of this node and return it. Once per content per node: the
    workers of a node and their restarts reuse the folder."""
    import ray

    folder = Path(root or tempfile.gettempdir()) / "explicitlm-shared" / shared["key"]
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{shared['key']}."))
        for name, refs in shared["files"].items():
            with open(tmp / name, "wb") as fh:
                for ref in refs:
                    fh.write(memoryview(ray.get(ref)))
        try:
            os.rename(tmp, folder)  # atomic: another worker of this node may have finished first
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def share_inputs(cfg: Config) -> dict[str, Any]:
    """The driver's files the training workers need, in the object store (see `worker_inputs`)."""
    start = cfg.dataset.pretrained_sft_model_path
    return {
        "bank_files": share_files(bank_files(cfg.model.cache_path)),
        "adapter_files": share_files([f for f in sorted(Path(start).iterdir()) if f.is_file()]) if start else None,
    }


def worker_inputs(cfg: Config, loop_config: dict[str, Any]) -> tuple[Config, str, list[Path]]:
    """On a training worker: the config to load from (`model.cache_path` on this node's copy of the
    driver's bank), the starting adapter's folder here, and the copies to remove when done."""
    import copy

    local, adapter, copies = copy.deepcopy(cfg), cfg.dataset.pretrained_sft_model_path, []
    if loop_config.get("bank_files"):
        copies.append(materialise_files(loop_config["bank_files"]))
        local.model.cache_path = str(copies[-1] / Path(cfg.model.cache_path).name)
    if loop_config.get("adapter_files"):
        copies.append(materialise_files(loop_config["adapter_files"]))
        adapter = str(copies[-1])
    return local, adapter, copies


def read_records_dataset(path: str, batch_rows: int = 65536):
    """Ray Data over a converted Parquet file, its blocks in the object store.

    A local path may exist on the driver's node only, so the driver reads it, a batch of rows at a
    time, and puts each batch in the object store (Ray Data's own readers list and read files in
    tasks that may run on any node). A URI (s3://, gs://, ...) is read by Ray Data on any node.
    Either way the workers get rows, never paths."""
    import ray

    if "://" in path:
        return ray.data.read_parquet(path).materialize()
    f = pq.ParquetFile(path)
    refs = [ray.put(pa.Table.from_batches([b])) for b in f.iter_batches(batch_size=batch_rows)]
    return ray.data.from_arrow_refs(refs or [ray.put(f.schema_arrow.empty_table())])


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
