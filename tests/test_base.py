import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from explicitlm.base import make_base

ROOT = Path(__file__).resolve().parent.parent


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_base_loads_through_from_pretrained_and_gives_logits(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Byte-level BPE keeps the leading space: answer tokens match memory-sentence tokens.
    assert tok.tokenize(" Paris")[0] in tok.tokenize("The capital of France is Paris.")


def test_make_base_is_deterministic(tmp_path):
    texts = ["The capital of France is Paris.", "What is the capital of Peru?"] * 50
    a = make_base(tmp_path / "a", texts, seed=3, vocab_size=400, hidden_size=64, num_layers=2)
    b = make_base(tmp_path / "b", texts, seed=3, vocab_size=400, hidden_size=64, num_layers=2)
    c = make_base(tmp_path / "c", texts, seed=4, vocab_size=400, hidden_size=64, num_layers=2)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_make_base_cli(tmp_path, world):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs" / "make_base.py"),
            "--output",
            str(out),
            "--text",
            world["knowledge"],
            "--vocab-size",
            "600",
            "--hidden-size",
            "64",
            "--layers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_pretrain_teaches_the_base_its_text_and_saves_it_in_place(tmp_path):
    from explicitlm.base import pretrain

    texts = [f"{c} is the capital of {k}." for c, k in [("Paris", "France"), ("Lima", "Peru"), ("Oslo", "Norway")]] * 40
    folder = make_base(tmp_path / "base", texts, seed=0, vocab_size=300, hidden_size=64, num_layers=1)
    before = _digest(folder)["model.safetensors"]
    tok = AutoTokenizer.from_pretrained(folder)
    x = tok(texts[:3], return_tensors="pt", padding=True)["input_ids"]
    loss_random = AutoModelForCausalLM.from_pretrained(folder)(input_ids=x, labels=x).loss.item()
    last = pretrain(folder, texts, steps=60, block=16, batch=8)
    assert _digest(folder)["model.safetensors"] != before
    with torch.no_grad():
        loss_trained = AutoModelForCausalLM.from_pretrained(folder)(input_ids=x, labels=x).loss.item()
    assert last < 2.0 and loss_trained < loss_random - 2.0, (last, loss_random, loss_trained)
    # Many passes over few blocks (60 steps of 8 over ~50): the same seed, the same weights.
    again = make_base(tmp_path / "again", texts, seed=0, vocab_size=300, hidden_size=64, num_layers=1)
    assert pretrain(again, texts, steps=60, block=16, batch=8) == last
    assert _digest(again)["model.safetensors"] == _digest(folder)["model.safetensors"]
    with pytest.raises(ValueError, match="at least one block of 16 tokens"):
        pretrain(again, ["Lima."], steps=1, block=16)
