import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from explicitlm.adapter import load_adapter_weights, memory_parameters, save_adapter, set_trainable
from explicitlm.bank import MemoryBank
from explicitlm.data import LABELS, collate, encode
from explicitlm.errors import UserError
from explicitlm.loading import build_model
from explicitlm.model import decoder_layers
from explicitlm.objective import encode_record, lm_loss
from explicitlm.scoring import Question, memory_rows, predict_mask, score_questions
from tests.conftest import tiny_config


@pytest.fixture()
def model_and_tok(tiny_base, bank_path, world, tmp_path):
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    tok, model = build_model(cfg)
    return cfg, tok, model


def _batch(tok, records, n=8):
    return collate([encode_record(tok, r, 512) for r in records[:n]], tok.pad_token_id)


def _forward(model, b, **kw):
    return model(b["input_ids"], b["attention_mask"], b["query_mask"], b["words"], b["choices_mask"], **kw)


def test_untrained_wrapper_equals_backbone(model_and_tok, tiny_base, records):
    _, tok, model = model_and_tok
    bare = AutoModelForCausalLM.from_pretrained(tiny_base)
    b = _batch(tok, records)
    with torch.no_grad():
        ours = _forward(model, b).logits
        ref = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (ours - ref).abs().max().item() < 1e-5


def test_memory_is_read_only_when_the_rows_are_about_the_question(
    tiny_base, bank_path, world, tmp_path, records, tokenizer
):
    """A question's own sentence is explained by the question apart from its answer; in a bank with
    no row naming its subject, the nearest rows keep a rare word the question lacks, fall below
    model.min_match, and the layer adds nothing: the backbone's exact logits. The weights are loaded
    onto the other bank as an adapter is: the statistics are that bank's own."""
    from explicitlm.readers import read_knowledge

    val = records[:48]
    subjects = {r["subject"] for r in val}
    rows = list(read_knowledge(world["knowledge"]))
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    tok, model = build_model(cfg, bank=MemoryBank.build(rows, tokenizer, 16))
    torch.manual_seed(0)
    for layer in decoder_layers(model.backbone):  # a fusion that changes the logits when it reads
        torch.nn.init.normal_(layer.gated_memory_fusion.out_proj.weight, std=0.05)
    save_adapter(model, tmp_path / "weights")
    without = [r for r in rows if not any(s in r["text"] for s in subjects)]
    _, model_without = build_model(
        cfg, adapter=str(tmp_path / "weights"), bank=MemoryBank.build(without, tokenizer, 16)
    )
    b = _batch(tok, val, n=len(val))
    reads = {}
    for name, m in (("with", model), ("without", model_without)):
        with torch.no_grad():
            prefix = m.prefill(b["input_ids"], b["attention_mask"], b["query_mask"], b["words"], b["choices_mask"])
            logits = _forward(m, b).logits
            bare = m.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        used = torch.stack([r.used for r in prefix.values])  # (layers, B)
        change = (logits - bare).abs().amax(dim=(1, 2))  # (B,)
        assert (change[used.sum(0) == 0] < 1e-5).all()  # no layer read: exactly the backbone
        assert (change[used.sum(0) > 0] > 1e-3).all()
        reads[name] = (torch.stack([r.match for r in prefix.values]).mean(0), used.float().mean().item())
    print({k: (m.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist(), u) for k, (m, u) in reads.items()})
    assert reads["with"][1] > 0.95 and reads["without"][1] < 0.1
    assert (reads["with"][0] > reads["without"][0]).all()


@pytest.mark.parametrize("scan_rows", [0, 1 << 20], ids=["probe", "scan"])
def test_training_step_touches_only_memory_modules(tiny_base, bank_path, world, tmp_path, records, scan_rows):
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, f"model.scan_rows={scan_rows}")
    tok, model = build_model(cfg)  # both candidate paths must pass the gradient
    trainable = set_trainable(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    b = _batch(tok, records)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    model.train()
    grads = {}
    for _ in range(2):  # the fusion output starts at zero: the second step sees every gradient
        opt.zero_grad()
        out = _forward(model, b, target_rows=gold)
        (lm_loss(out.logits, b["input_ids"], b["loss_mask"]) + out.retrieval_loss).backward()
        grads = {n: p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in trainable.items()}
        opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
            assert torch.equal(p, frozen_before[n]), n
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]
    assert any("memory_gate.query_up" in n for n in grads) and any("gated_memory_fusion" in n for n in grads)


def test_trainable_subset_is_a_config_value(model_and_tok):
    _, _, model = model_and_tok
    trainable = set_trainable(model, ["gated_memory_fusion"])
    assert trainable and all("gated_memory_fusion" in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "memory_gate" in n)


def test_adapter_round_trip_and_mismatch(model_and_tok, tiny_base, bank_path, world, tmp_path):
    cfg, tok, model = model_and_tok
    with torch.no_grad():
        for p in memory_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.01)
    folder = save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["adapter_config.json", "memory_modules.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["backbone"]["hidden_size"] == 64
    # Only the memory modules: far smaller than the backbone.
    backbone_bytes = (tiny_base / "model.safetensors").stat().st_size
    assert (folder / "memory_modules.safetensors").stat().st_size < backbone_bytes
    _, reloaded = build_model(cfg, adapter=str(folder))
    for n, p in memory_parameters(model).items():
        assert torch.equal(p, memory_parameters(reloaded)[n]), n
    other = tiny_config(tiny_base, bank_path, world, tmp_path, "model.fusion_dim=32")
    _, wrong = build_model(other)
    with pytest.raises(UserError, match="fusion_dim"):
        load_adapter_weights(wrong, folder)


def test_scorer_deterministic_probabilities_and_inspect_edit(model_and_tok, records):
    _, tok, model = model_and_tok
    qs = [Question(r["question"], r["options"]) for r in records[:5]]
    a = score_questions(model, tok, qs, 512)
    b = score_questions(model, tok, list(reversed(qs)), 512)[::-1]
    for x, y in zip(a, b):
        assert x.index == y.index
        assert max(abs(s - t) for s, t in zip(x.scores, y.scores)) < 1e-4
        assert abs(sum(x.probabilities) - 1) < 1e-9
        assert len(x.memory) == 2 and len(x.memory[0]) == model.settings.top_k
    rows = memory_rows(model.bank, a[0])
    assert rows and {"uuid", "text", "score"} <= set(rows[0])
    # Edit a row at run time: the bank, keys and cells follow without a reload.
    uuid = records[0]["uuid"]
    i, old = model.set_memory_row(uuid, "The capital of Nowhere is Elsewhere.", tok)
    assert old and model.bank.texts[i] == "The capital of Nowhere is Elsewhere."
    assert model.bank.version == 1
    j, old2 = model.set_memory_row("new-row", "A brand new fact.", tok)
    assert old2 is None and j == len(model.bank) - 1 and model.index.keys.shape[0] == len(model.bank)


def _full_sequence_scores(model, tok, q: Question) -> list[float]:
    """Each option's mean log-likelihood from its whole sequence in one ordinary forward pass."""
    encoded = [encode(tok, q.user, q.question, LABELS[i], t, 512, q.options) for i, t in enumerate(q.options)]
    b = collate(encoded, tok.pad_token_id)
    at = predict_mask(b["option_mask"])
    with torch.no_grad():
        out = _forward(model, b, logits_mask=at)
    lp = torch.log_softmax(out.logits.float(), -1).gather(-1, b["input_ids"][:, 1:][at[:, :-1].bool()][:, None])[:, 0]
    rows = at.bool().nonzero(as_tuple=True)[0]
    return [float(lp[rows == i].mean()) for i in range(len(q.options))]


def test_shared_prompt_scores_equal_full_sequences(model_and_tok, records):
    """Scoring reads each prompt once and continues every option from its KV cache and memory values;
    that must give the full sequences' log-likelihoods, memory included, across chunk boundaries and
    option counts."""
    _, tok, model = model_and_tok
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero fusion, so the memory path shows in the logits
        for layer in model.backbone.model.layers:
            layer.gated_memory_fusion.out_proj.weight.normal_(0, 0.05)
    model.eval()
    qs = [Question(r["question"], r["options"]) for r in records[:6]]
    qs[1] = Question(qs[1].question, qs[1].options[:3])
    qs[2] = Question(qs[2].question, qs[2].options + ["a fifth, longer option text than the others"])
    scored = score_questions(model, tok, qs, 512, batch_size=9)  # chunks of 2-3 questions
    worst = max(abs(a - b) for q, s in zip(qs, scored) for a, b in zip(s.scores, _full_sequence_scores(model, tok, q)))
    assert worst < 1e-4, worst
    bare = [s.scores for s in score_questions(model, tok, qs, 512)]
    for layer in model.backbone.model.layers:
        torch.nn.init.zeros_(layer.gated_memory_fusion.out_proj.weight)
    assert (
        max(
            abs(a - b)
            for x, y in zip(bare, [s.scores for s in score_questions(model, tok, qs, 512)])
            for a, b in zip(x, y)
        )
        > 1e-3
    )


def test_weights_of_the_older_format_are_refused_with_the_way_forward(model_and_tok, tmp_path):
    """An adapter of format 1 (retrieval by token-embedding keys, the training bank's statistics
    inside it) cannot answer with lexical retrieval: one line says how to retrain from it, and a
    training run started from it takes its fusion and norms."""
    from safetensors.torch import load_file, save_file

    cfg, tok, model = model_and_tok
    with torch.no_grad():
        for p in memory_parameters(model).values():
            p.add_(0.01)
    folder = save_adapter(model, tmp_path / "old")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, format="explicitlm-adapter/1")))
    tensors = load_file(str(folder / "memory_modules.safetensors"))
    tensors["index.idf"] = torch.ones(10)  # what format 1 carried besides the modules
    save_file(tensors, str(folder / "memory_modules.safetensors"))
    with pytest.raises(UserError, match="pretrained_sft_model_path=") as e:
        build_model(cfg, adapter=str(folder))
    assert "\n" not in str(e.value)
    _, started = build_model(cfg, adapter=str(folder), start_from=True)
    mine, theirs = memory_parameters(model), memory_parameters(started)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine if "gated_memory_fusion" in n or "memory_norm" in n)
    assert all(not torch.equal(mine[n], theirs[n]) for n in mine if ".query_" in n)


def test_bank_index_and_lists_move_with_the_model_once_and_never_per_step(
    tiny_base, bank_path, world, tmp_path, records
):
    """The bank, its index and its inverted lists live on the model's device: forward passes and
    dtype casts copy none of them; a device move moves them all, once (`memory_moves`)."""
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    tok, model = build_model(cfg)
    moves = model.memory_moves
    b = collate([encode_record(tok, r, 512) for r in records[:8]], tok.pad_token_id)
    for _ in range(3):
        model(b["input_ids"], b["attention_mask"], b["query_mask"], b["words"], b["choices_mask"])
    model.to(torch.float32)
    model.float()
    assert model.memory_moves == moves
    names = {name.split(".")[0] for name, _ in model.memory_tensors()}
    assert names == {"bank", "index", "postings"}
    model.to("meta")
    assert model.memory_moves == moves + 1
    assert {t.device.type for _, t in model.memory_tensors()} == {"meta"}
