"""A bfloat16 backbone (model.dtype) with float32 memory modules: loading, the freeze printout and
training on a CPU, through the same loop a GPU worker runs."""

import json
from dataclasses import asdict

import torch
from safetensors.torch import load_file

from explicitlm.adapter import freeze_summary, set_trainable
from explicitlm.config import MEMORY_MODULES
from explicitlm.data import collate
from explicitlm.loading import backbone_dtype, build_model
from explicitlm.objective import encode_record, lm_loss
from explicitlm.train import train_loop_per_worker
from tests.conftest import memory_forward, tiny_config


def test_model_dtype_loads_the_backbone_in_bf16_and_keeps_memory_modules_float32(
    tiny_base, bank_path, world, records, tmp_path, capsys
):
    assert backbone_dtype("auto", "cuda") == torch.bfloat16 and backbone_dtype("auto", "cpu") == torch.float32
    assert backbone_dtype("float32", "cuda") == torch.float32
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, "model.dtype=bfloat16")
    tok, model = build_model(cfg)
    trainable = set_trainable(model)
    line = freeze_summary(model, trainable, MEMORY_MODULES)
    backbone_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if n not in trainable)
    trainable_bytes = sum(p.numel() * 4 for p in trainable.values())
    # Bytes per part, with their dtypes: "frozen 0.21M (0.000418 GB bfloat16), trainable 0.07M (... float32; ...)".
    assert f"({backbone_bytes / 1e9:.3g} GB bfloat16)" in line and f"({trainable_bytes / 1e9:.3g} GB float32;" in line
    bank_bytes = sum(t.numel() * t.element_size() for _, t in model.memory_tensors())
    assert line.endswith(f"bank and index {bank_bytes / 1e9:.3g} GB on cpu")
    assert {p.dtype for n, p in model.named_parameters() if n not in trainable} == {torch.bfloat16}
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    b = collate([encode_record(tok, r, 512) for r in records[:8]], tok.pad_token_id)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory_forward(model, b, target_rows=gold, logits_index=b["loss_index"])
        loss = lm_loss(out.logits, b["input_ids"], b["loss_index"]) + out.retrieval_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())  # master weights
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_bf16_backbone_trains_on_cpu_through_the_training_loop(tiny_base, bank_path, world, records, tmp_path):
    cfg = tiny_config(
        tiny_base,
        bank_path,
        world,
        tmp_path,
        "model.dtype=bfloat16",
        "training.batch_size=8",
        "training.max_steps=12",
        "training.epochs=1",
        "training.learning_rate=5e-3",
        "training.warmup_steps=2",
        "logging.log_every=1",
    )
    train_loop_per_worker({"config": asdict(cfg), "train_rows": [dict(r) for r in records[:96]]})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and all(x == x and x < 50 for x in losses)  # finite
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns
    weights = load_file(str(tmp_path / "sft_latest" / "memory_modules.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    out_proj = [v for k, v in weights.items() if k.endswith("out_proj.weight")]
    assert out_proj and all(v.abs().max() > 0 for v in out_proj)  # zero-initialised, now trained


def test_weights_held_in_bf16_give_the_answers_of_autocast_over_float32_weights(
    tiny_base, bank_path, world, records, tmp_path
):
    """A server holds the readers' and fusions' weights in its autocast dtype (cast once at load):
    every product cast them to that dtype anyway, so the answers are the same."""
    from explicitlm.scoring import Question, generate_answers, score_questions

    tok, model = build_model(tiny_config(tiny_base, bank_path, world, tmp_path, "model.dtype=bfloat16"))
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # trained-like modules: the zero-initialised outputs would hide the fusion
        for name, p in model.named_parameters():
            if "memory_gate" in name or "gated_memory_fusion" in name:
                p.normal_(0, 0.05)
    qs = [Question(r["question"], r["options"]) for r in records[:6]]
    opened = [Question(r["question"], []) for r in records[:6]]

    def answers():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scored = score_questions(model, tok, qs, 512)
            generated = generate_answers(model, tok, opened, 512, 4)
        return [s.probabilities for s in scored], [g.text for g in generated]

    before = answers()
    model.memory_off = True
    bare = answers()
    model.memory_off = False
    assert max(abs(a - b) for x, y in zip(before[0], bare[0]) for a, b in zip(x, y)) > 1e-3  # memory shows
    model.hold_for_answers(torch.bfloat16)
    layer = model.backbone.model.layers[0]
    assert {p.dtype for p in layer.memory_gate.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in layer.gated_memory_fusion.parameters()} == {torch.bfloat16}
    assert layer.memory_norm.weight.dtype == torch.float32
    held = answers()
    assert max(abs(a - b) for x, y in zip(before[0], held[0]) for a, b in zip(x, y)) < 1e-6
    assert held[1] == before[1]
    # Without autocast the held modules compute in bf16 throughout: close to the same answers.
    alone = score_questions(model, tok, qs, 512)
    assert [s.index for s in alone] == [max(range(len(p)), key=p.__getitem__) for p in held[0]]
    assert max(abs(a - b) for s, y in zip(alone, held[0]) for a, b in zip(s.probabilities, y)) < 0.05
