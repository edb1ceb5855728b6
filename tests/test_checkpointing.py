"""Training's two ways to save work, against the plain whole-sequence pass: the prompt without
gradients and the answer from its cache (the default), and training.gradient_checkpointing (the
backbone recomputes its activations, retrieval runs once per forward). Each gives the plain pass's
losses and gradients."""

import pytest
import torch

from explicitlm.adapter import set_trainable
from explicitlm.config import ConfigError, load_config
from explicitlm.data import collate, split_prompt
from explicitlm.loading import build_model
from explicitlm.model import decoder_layers
from explicitlm.objective import encode_record, lm_loss
from explicitlm.train import checkpoint_activations
from tests.conftest import memory_forward, tiny_config


def _step(cfg, records, checkpointing: bool = False, split: bool = False):
    tok, model = build_model(cfg)
    torch.manual_seed(0)
    for layer in decoder_layers(model.backbone):  # a fusion that reads memory, so every gradient flows
        torch.nn.init.normal_(layer.gated_memory_fusion.out_proj.weight, std=0.05)
    trainable = set_trainable(model)
    model.train()
    if checkpointing:
        checkpoint_activations(model.backbone)
    phase = ["forward"]
    counted = {"attention": [], "gate": [], "layer": []}
    for layer in decoder_layers(model.backbone):
        for name, module in (("attention", layer.self_attn), ("gate", layer.memory_gate), ("layer", layer)):
            module.register_forward_hook(lambda *_, n=name: counted[n].append(phase[0]))
    # Half the questions without options, as training asks them.
    encoded = [encode_record(tok, r, 512, open_answer=i % 2 == 1) for i, r in enumerate(records[:8])]
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    if split:
        prompt, answer = (collate(list(p), tok.pad_token_id) for p in zip(*map(split_prompt, encoded)))
        out = model(prompt=prompt, answer=answer, target_rows=gold)
        loss = lm_loss(out.logits, answer["input_ids"], answer["loss_index"])
    else:
        b = collate(encoded, tok.pad_token_id)
        out = memory_forward(model, b, target_rows=gold, logits_index=b["loss_index"])
        loss = lm_loss(out.logits, b["input_ids"], b["loss_index"])
    total = loss + out.retrieval_loss
    phase[0] = "backward"
    total.backward()
    grads = {n: p.grad.clone() for n, p in trainable.items()}
    return loss.item(), out.retrieval_loss.item(), grads, counted, len(decoder_layers(model.backbone))


def _some_gradient_in_each_module(grads):
    """A first step's gradients reach every kind of memory module (the reader's heads start at zero,
    so some of its projections get theirs from the second step on)."""
    for module in ("memory_norm", "memory_gate", "gated_memory_fusion"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if module in n), module


def test_checkpointed_gradients_equal_the_plain_ones_and_retrieval_runs_once(
    tiny_base, bank_path, world, tmp_path, records
):
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    loss, retrieval, grads, counted, L = _step(cfg, records, checkpointing=False)
    loss_c, retrieval_c, grads_c, counted_c, _ = _step(cfg, records, checkpointing=True)
    # The backbone really recomputes: each layer's attention runs again in the backward pass, but
    # layer 0's, whose input and weights need no gradient (its memory modules act on its output)...
    assert counted["attention"] == ["forward"] * L
    assert counted_c["attention"] == ["forward"] * L + ["backward"] * (L - 1)
    # ... while the memory hooks on each layer's output, and retrieval, run once per forward.
    for name in ("gate", "layer"):
        assert counted_c[name] == counted[name] == ["forward"] * L, name
    assert loss_c == loss and retrieval_c == retrieval  # each loss counted once, as without checkpointing
    assert grads_c.keys() == grads.keys() and len(grads) > 0
    _some_gradient_in_each_module(grads)
    for name, g in grads.items():
        assert torch.allclose(grads_c[name], g, atol=1e-5), (name, (grads_c[name] - g).abs().max())


def test_the_answer_from_the_prompts_cache_gives_the_whole_sequences_losses_and_gradients(
    tiny_base, bank_path, world, tmp_path, records
):
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    for query_from in ("embeddings", "layer_input"):
        cfg.model.query_from = query_from
        loss, retrieval, grads, _, _ = _step(cfg, records)
        loss_s, retrieval_s, grads_s, _, _ = _step(cfg, records, split=True)
        assert loss_s == pytest.approx(loss, abs=1e-5) and retrieval_s == pytest.approx(retrieval, abs=1e-5)
        assert grads_s.keys() == grads.keys()
        _some_gradient_in_each_module(grads)
        for name, g in grads.items():
            assert torch.allclose(grads_s[name], g, atol=1e-5), (query_from, name, (grads_s[name] - g).abs().max())


def test_checkpointing_refuses_per_layer_queries():
    with pytest.raises(ConfigError, match="training.gradient_checkpointing=true needs model.query_from=embeddings"):
        load_config(None, ["training.gradient_checkpointing=true", "model.query_from=layer_input"])
    assert load_config(None, ["training.gradient_checkpointing=true"]).training.gradient_checkpointing
