"""The per-worker memory estimate: its parts against counts and measurements, and a config that
cannot fit stopping before any worker starts."""

import json

import pytest
import torch
from transformers import Qwen3ForCausalLM

from explicitlm.adapter import memory_parameters, set_trainable
from explicitlm.base import tiny_qwen3_config
from explicitlm.data import collate, split_prompt
from explicitlm.estimate import (
    MemoryEstimateError,
    bank_device_bytes,
    count_backbone_params,
    estimate_from_shapes,
    fusion_activation_bytes,
    gate_activation_bytes,
    layer_activation_bytes,
    memory_module_params,
    qwen3_config,
)
from explicitlm.loading import build_model
from explicitlm.objective import encode_record, lm_loss
from tests.conftest import tiny_config


def test_published_shapes_give_the_published_parameter_counts():
    for name, total, non_embedding in (("0.6B", 0.6e9, 0.44e9), ("4B", 4.0e9, 3.6e9), ("8B", 8.2e9, 6.95e9)):
        c = qwen3_config(name)
        n = count_backbone_params(c)
        embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        assert abs(n - total) / total < 0.02 and abs(n - embeddings - non_embedding) / non_embedding < 0.02, name


@pytest.mark.parametrize("width, encoder", [(16, 0), (64, 0), (64, 32)])
def test_memory_module_and_bank_terms_match_the_model(tiny_base, bank_path, world, tmp_path, width, encoder):
    cfg = tiny_config(
        tiny_base,
        bank_path,
        world,
        tmp_path,
        "model.knowledge_dim=128",
        f"model.reader_dim={width}",
        f"model.reader_encoder={encoder}",
    )
    _, model = build_model(cfg)
    real = sum(p.numel() for p in memory_parameters(model).values())
    c = model.backbone.config
    m = cfg.model
    assert (
        memory_module_params(c.hidden_size, c.num_hidden_layers, m.reader_dim, m.fusion_dim, m.reader_encoder) == real
    )
    on_device = sum(t.numel() * t.element_size() for _, t in model.memory_tensors())
    predicted = bank_device_bytes(len(model.bank), m.knowledge_length, m.knowledge_dim)
    assert abs(predicted - on_device) / on_device < 0.1, (predicted, on_device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_term_bounds_what_autograd_keeps(dtype, tokenizer, bank_path, world, records, tmp_path):
    """Every tensor autograd saves for the backward pass of one training step of a frozen Qwen3
    with memory modules (the prompt without gradients, the answer with them), counted once per
    storage, parameters, buffers and the bank aside. The estimate is meant to be safe: never below
    that, and at most 1.5x it (attention is counted as GPU kernels keep it)."""
    D, L, F, B = 256, 2, 256, 16
    cfg = tiny_qwen3_config(len(tokenizer), D, L, intermediate_size=3 * D, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    _, model = build_model(
        tiny_config(tmp_path / "base", bank_path, world, tmp_path, f"model.fusion_dim={F}"), dtype=dtype
    )
    set_trainable(model)
    model.train()
    examples = [encode_record(tokenizer, r, 512, i % 2 == 1) for i, r in enumerate(records[:B])]
    prompt, answer = (collate(list(part), tokenizer.pad_token_id) for part in zip(*map(split_prompt, examples)))
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:B]])
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    fixed |= {t.untyped_storage().data_ptr() for _, t in model.memory_tensors()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    bf16 = dtype == torch.bfloat16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=bf16):
        out = model(prompt=prompt, answer=answer, target_rows=gold, hide=torch.zeros(B, dtype=torch.bool))
        (lm_loss(out.logits, answer["input_ids"], answer["loss_index"]) + out.retrieval_loss).backward()
    measured = sum(saved.values())
    s = 2 if bf16 else 4
    H, d, T_p, T_a = cfg.num_attention_heads, cfg.head_dim, prompt["input_ids"].shape[1], answer["input_ids"].shape[1]
    layer = layer_activation_bytes(D, 3 * D, H, cfg.num_key_value_heads, d, s)
    m = model.settings
    Q = prompt["query_index"].shape[1]
    memory = L * B * m.slots * fusion_activation_bytes(D, F, s) + 4 * B * m.top_k * m.knowledge_length * D
    memory += L * gate_activation_bytes(B, m.top_k, m.knowledge_length, Q, m.reader_dim, D, s, m.reader_encoder)
    logits = B * answer["loss_index"].shape[1] * cfg.vocab_size * (s + 8)
    predicted = (L + 1) * layer * B * T_a + L * s * 2 * H * d * B * (T_p + T_a) + memory + logits
    assert 0.65 < measured / predicted <= 1.0, (measured, predicted)


def _qwen3_4b(**kw):
    c = qwen3_config("4B")
    args = dict(
        backbone_params=count_backbone_params(c),
        dtype=torch.bfloat16,
        autocast=True,
        batch_size=8,
        max_seq_len=512,
        knowledge_dim=128,
        reader_dim=64,
        fusion_dim=512,
        knowledge_length=16,
        bank_rows=2**20,
        gradient_checkpointing=False,
        world=4,
    )
    args.update(kw)
    return estimate_from_shapes(c, **args)


def test_qwen3_4b_on_a_24gb_gpu_names_the_knob_and_fits_once_turned():
    e = _qwen3_4b()
    assert 8.0e9 < e.weights < 8.1e9  # 4.02 B parameters in bf16
    assert 2.0 * e.weights == _qwen3_4b(dtype=torch.float32, autocast=False).weights
    assert 0.94e9 < e.bank < 0.96e9  # 2^20 rows x 901 bytes, and the sub-keys
    # The prompt runs without gradients: batch 8 x 512 fits an A10G, batch 32 does not.
    e.check(24 * 10**9, "an A10G")
    big = _qwen3_4b(batch_size=32)
    with pytest.raises(MemoryEstimateError) as err:
        big.check(24 * 10**9, "an A10G")
    message = str(err.value)
    assert f"{big.total / 1e9:.2f} GB" in message and "24.00 GB of an A10G" in message
    assert "training.gradient_checkpointing=true" in message and "training.batch_size=32" in message
    assert _qwen3_4b(batch_size=32, gradient_checkpointing=True).activations < big.activations
    # What the message offers: a smaller batch (16 with checkpointing, or 8) fits.
    _qwen3_4b(batch_size=16, gradient_checkpointing=True).check(24 * 10**9, "an A10G")
    with pytest.raises(MemoryEstimateError):
        _qwen3_4b(batch_size=16).check(24 * 10**9, "an A10G")
    # Weights dominate: a float32 backbone on a small batch is told to use bfloat16.
    small = _qwen3_4b(dtype=torch.float32, autocast=False, batch_size=1, max_seq_len=64, world=1)
    with pytest.raises(MemoryEstimateError, match="model.dtype=bfloat16"):
        small.check(16 * 10**9, "a T4")


def test_a_config_that_cannot_fit_stops_before_any_worker_starts(
    tiny_base, bank_path, world, records, tmp_path, capsys, ray_session, monkeypatch
):
    from ray_jobs import sft

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = [
        f"model.qwen3_model_path={tiny_base}",
        f"model.cache_path={bank_path}",
        f"model.database_init_path={world['knowledge']}",
        f"training.output_dir={tmp_path / 'run'}",
        f"dataset.sft_dataset_path={data}",
        "training.use_gpu=true",
        "training.gpu_memory_gb=0.5",
        "logging.swanlab_mode=disabled",
    ]
    # On this machine's own Ray, which has no GPU to give: one line, before anything else.
    assert sft.main(argv) == 2
    assert capsys.readouterr().err == (
        "explicitlm-sft: error: training.use_gpu=true but this machine's Ray has no GPU: drop it, or submit to a cluster\n"
    )
    # As a job submitted to a cluster (RAY_ADDRESS set), whose autoscaler could add the GPU nodes this
    # machine lacks: the job goes on to its memory estimate instead.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert sft.main(argv) == 2  # an expected mistake: one line, exit code 2
    captured = capsys.readouterr()
    assert "memory: estimate per GPU worker: weights" in captured.out
    assert "exceeds the 0.50 GB of a worker's GPU (training.gpu_memory_gb)" in captured.err
    assert not (tmp_path / "run" / "ray_results").exists()  # no trainer was built
