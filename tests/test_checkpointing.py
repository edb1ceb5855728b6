"""training.gradient_checkpointing: the backbone recomputes its activations, retrieval runs once per
forward, each loss counts once, and the gradients are the non-checkpointed run's."""

import pytest
import torch

from explicitlm.adapter import set_trainable
from explicitlm.config import ConfigError, load_config
from explicitlm.data import collate
from explicitlm.loading import build_model
from explicitlm.model import decoder_layers
from explicitlm.objective import encode_record, lm_loss
from explicitlm.scoring import predict_mask
from explicitlm.train import checkpoint_activations
from tests.conftest import tiny_config


def _step(cfg, records, checkpointing: bool):
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
    b = collate([encode_record(tok, r, 512) for r in records[:8]], tok.pad_token_id)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    out = model(
        b["input_ids"],
        b["attention_mask"],
        b["query_mask"],
        b["words"],
        b["choices_mask"],
        target_rows=gold,
        logits_mask=predict_mask(b["loss_mask"]),
    )
    loss = lm_loss(out.logits, b["input_ids"], b["loss_mask"])
    total = loss + out.retrieval_loss
    phase[0] = "backward"
    total.backward()
    grads = {n: p.grad.clone() for n, p in trainable.items()}
    return loss.item(), out.retrieval_loss.item(), grads, counted, len(decoder_layers(model.backbone))


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
    for name, g in grads.items():
        assert g.abs().sum() > 0 or "query_down" in name, name  # in the graph (query_up starts at zero)
        assert torch.allclose(grads_c[name], g, atol=1e-5), (name, (grads_c[name] - g).abs().max())


def test_checkpointing_refuses_per_layer_queries():
    with pytest.raises(ConfigError, match="training.gradient_checkpointing=true needs model.query_from=embeddings"):
        load_config(None, ["training.gradient_checkpointing=true", "model.query_from=layer_input"])
    assert load_config(None, ["training.gradient_checkpointing=true"]).training.gradient_checkpointing
