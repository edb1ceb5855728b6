"""Shared fixtures: one tiny Qwen3 (saved and reloaded through from_pretrained), one small sample
world, one memory bank and one local Ray instance per test session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

QWEN3_CHAT_TEMPLATE = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"

os.environ.setdefault("SWANLAB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A few hundred real sample facts as OMCQ + knowledge files."""
    from explicitlm.world import write_world

    out = tmp_path_factory.mktemp("world")
    paths = write_world(out, seed=0, max_facts=400)
    return {"dir": out, **paths}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, world):
    """A 2-layer random Qwen3 with a tokenizer trained on the sample world, saved to a folder."""
    from explicitlm.base import make_base
    from explicitlm.readers import read_texts

    out = tmp_path_factory.mktemp("base")
    make_base(
        out, read_texts([world["omcq"], world["knowledge"]]), seed=0, vocab_size=2048, hidden_size=64, num_layers=2
    )
    return out


@pytest.fixture(scope="session")
def qwen3_template_base(tmp_path_factory, tiny_base):
    """The tiny base with Qwen3's own chat template where a Qwen3 folder keeps it (tokenizer_config.json's
    `chat_template`; tests/data/qwen3_chat_template.jinja is that of Qwen/Qwen3's tokenizer). It
    renders think blocks and splits an assistant turn on `</think>`; the tiny base's template does not."""
    out = tmp_path_factory.mktemp("qwen3_template_base")
    shutil.copytree(tiny_base, out, dirs_exist_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_CHAT_TEMPLATE.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_template_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_template_base)


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def bank_path(tmp_path_factory, world, tokenizer):
    from explicitlm.bank import load_or_build_bank

    path = tmp_path_factory.mktemp("bank") / "knowledge_cache.parquet"
    load_or_build_bank(path, world["knowledge"], tokenizer, 16, 10**6)
    return path


@pytest.fixture(scope="session")
def records(world):
    """The sample world's questions as converted SFT records (the parse path, no Ray)."""
    import json

    from explicitlm.data import parse_target

    rows = [parse_target(item["target"][0]) for item in json.load(open(world["omcq"]))]
    for i, r in enumerate(rows):
        r["idx"] = i
    return rows


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests listen on loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tiny_base, bank_path, world, tmp_path, *overrides):
    from explicitlm.config import load_config

    return load_config(
        None,
        [
            f"model.qwen3_model_path={tiny_base}",
            f"model.cache_path={bank_path}",
            f"model.database_init_path={world['knowledge']}",
            f"training.output_dir={tmp_path}",
            "logging.swanlab_mode=disabled",
            "model.fusion_dim=64",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, like the machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def memory_forward(model, b, **kw):
    """ExplicitLM's whole-sequence forward pass on a collated batch (`explicitlm.data.collate`)."""
    return model(b["input_ids"], b["attention_mask"], b["query_index"], b["words"], b["slots"], **kw)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, qwen3_template_base, bank_path, world, records):
    """Memory weights trained in-process for a few epochs, with their own copy of the bank, on the
    tiny base with Qwen3's chat template (served with it too). The serving tests under uvicorn and
    Ray Serve share them: uvicorn servers keep their bank beside the weights, Ray apps in folders of
    their own."""
    from dataclasses import asdict

    from explicitlm.train import train_loop_per_worker

    d = tmp_path_factory.mktemp("served")
    bank = d / "bank.parquet"
    shutil.copy(bank_path, bank)
    cfg = tiny_config(
        qwen3_template_base,
        bank,
        world,
        d,
        "training.epochs=4",
        "training.learning_rate=5e-3",
        "training.batch_size=8",
        "training.torch_threads=2",
    )
    train_loop_per_worker({"config": asdict(cfg), "train_rows": [dict(r) for r in records]})
    return {"weights": d / "sft_latest", "bank": bank, "dir": d}
