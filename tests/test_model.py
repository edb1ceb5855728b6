import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from explicitlm.adapter import load_adapter_weights, memory_parameters, save_adapter, set_trainable
from explicitlm.bank import MemoryBank
from explicitlm.data import LABELS, collate, encode
from explicitlm.index import ProductKeyIndex, n_sub_keys, rank_int8, take
from explicitlm.loading import build_model
from explicitlm.model import decoder_layers
from explicitlm.modules import pair_shortlist
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


def test_untrained_wrapper_equals_backbone(model_and_tok, tiny_base, records):
    _, tok, model = model_and_tok
    bare = AutoModelForCausalLM.from_pretrained(tiny_base)
    b = _batch(tok, records)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"], b["query_mask"]).logits
        ref = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (ours - ref).abs().max().item() < 1e-5


def test_memory_is_read_only_when_the_rows_match_the_question(
    tiny_base, bank_path, world, tmp_path, records, tokenizer
):
    """A question's own sentence contains most of its words; in a bank with no row naming its
    subject, the nearest rows fall below model.min_match and the layer adds nothing: the
    backbone's exact logits. The weights carry the IDF they were trained with, as an adapter does."""
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
            prefix = m.prefill(b["input_ids"], b["attention_mask"], b["query_mask"], b["question_mask"])
            logits = m(b["input_ids"], b["attention_mask"], b["query_mask"], question_mask=b["question_mask"]).logits
            bare = m.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        used = torch.stack([r.used for r in prefix.values])  # (layers, B)
        change = (logits - bare).abs().amax(dim=(1, 2))  # (B,)
        assert (change[used.sum(0) == 0] < 1e-5).all()  # no layer read: exactly the backbone
        assert (change[used.sum(0) > 0] > 1e-3).all()
        reads[name] = (torch.stack([r.match for r in prefix.values]).mean(0), used.float().mean().item())
    print({k: (m.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist(), u) for k, (m, u) in reads.items()})
    assert reads["with"][1] > 0.9 and reads["without"][1] < 0.1
    assert (reads["with"][0] > reads["without"][0]).all()


@pytest.mark.parametrize("scan_rows", [0, 1 << 20], ids=["probe", "scan"])
def test_training_step_touches_only_memory_modules(model_and_tok, records, scan_rows):
    _, tok, model = model_and_tok
    for layer in decoder_layers(model.backbone):
        layer.memory_gate.scan_rows = scan_rows  # both retrieval paths must pass the gradient
    trainable = set_trainable(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    b = _batch(tok, records)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    model.train()
    grads = {}
    for _ in range(2):  # the fusion output starts at zero: the second step sees every gradient
        opt.zero_grad()
        out = model(b["input_ids"], b["attention_mask"], b["query_mask"], gold)
        (lm_loss(out.logits, b["input_ids"], b["loss_mask"]) + out.retrieval_loss).backward()
        grads = {n: p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in trainable.items()}
        opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
            assert torch.equal(p, frozen_before[n]), n
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]
    assert any("memory_gate" in n for n in grads) and any("gated_memory_fusion" in n for n in grads)


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
    with pytest.raises(ValueError, match="fusion_dim"):
        load_adapter_weights(wrong, folder)


def test_bank_build_load_and_refuse(tokenizer, world, tmp_path, tiny_base):
    from explicitlm.bank import load_or_build_bank
    from explicitlm.readers import read_knowledge

    path = tmp_path / "bank.parquet"
    bank = load_or_build_bank(path, world["knowledge"], tokenizer, 16, 10**6)
    rows = list(read_knowledge(world["knowledge"]))
    assert len(bank) == len(rows) and bank.uuids[0] == rows[0]["uuid"] and bank.texts[0] == rows[0]["text"]
    assert bank.token_ids.shape == (len(rows), 16)
    lengths = [len(tokenizer(" " + r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert bank.truncated == sum(n > 16 for n in lengths)
    assert bank.mask.sum(1).tolist() == [min(n, 16) for n in lengths]
    again = MemoryBank.load(path)
    assert torch.equal(again.token_ids, bank.token_ids) and again.uuids == bank.uuids
    with pytest.raises(ValueError, match="knowledge_length"):
        load_or_build_bank(path, world["knowledge"], tokenizer, 8, 10**6)
    from explicitlm.base import make_base

    other = make_base(
        tmp_path / "other", ["completely different words"] * 20, vocab_size=300, hidden_size=64, num_layers=2
    )
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="another tokenizer"):
        load_or_build_bank(path, world["knowledge"], AutoTokenizer.from_pretrained(other), 16, 10**6)
    rebuilt = load_or_build_bank(path, world["knowledge"], tokenizer, 8, 10**6, recompute=True)
    assert rebuilt.knowledge_length == 8


def test_bank_rows_share_the_prompt_tokens_of_their_words(tokenizer, tmp_path):
    from explicitlm.data import render_user

    bank = MemoryBank.build([{"uuid": "u", "text": "Paris is the capital of France."}], tokenizer, 16)
    row = set(bank.token_ids[0][bank.mask[0]].tolist())
    prompt = set(
        tokenizer(render_user("What is Paris the capital of?", "A:France,B:Spain"), add_special_tokens=False)[
            "input_ids"
        ]
    )
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    # The subject opens the sentence but sits mid-question: both must give the same ids.
    assert set(paris) <= row and set(paris) <= prompt
    assert not set(tokenizer("Paris", add_special_tokens=False)["input_ids"]) <= row
    bank.save(tmp_path / "bank.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "bank.parquet")
    meta = json.loads(table.schema.metadata[b"explicitlm"])
    pq.write_table(
        table.replace_schema_metadata({"explicitlm": json.dumps(dict(meta, format="explicitlm-memory-bank/1"))}),
        tmp_path / "old.parquet",
    )
    with pytest.raises(ValueError, match="recompute_cache"):
        MemoryBank.load(tmp_path / "old.parquet")


def test_reference_knowledge_format(tmp_path, tokenizer):
    from explicitlm.readers import read_knowledge

    ref = [
        {
            "target": [
                {
                    "uuid": "u1",
                    "sentence": "Paris is the capital of France.",
                    "subject": "Paris",
                    "predicate": "capital of",
                    "object": "France",
                }
            ]
        }
    ]
    (tmp_path / "sentence_trex_data.json").write_text(json.dumps(ref))
    assert list(read_knowledge(tmp_path / "sentence_trex_data.json")) == [
        {"uuid": "u1", "text": "Paris is the capital of France."}
    ]


def test_every_row_is_reachable_through_the_index(model_and_tok):
    _, _, model = model_and_tok
    idx = model.index
    # A query equal to a row's own key must find that row among its candidates.
    q = idx.keys
    s1, s2 = q @ idx.sub1.T, q @ idx.sub2.T
    t1, i1 = s1.topk(16, dim=1)
    t2, i2 = s2.topk(16, dim=1)
    best = (t1[:, :, None] + t2[:, None, :]).flatten(1).topk(32, dim=1).indices
    cells = (i1[:, :, None] * idx.n2 + i2[:, None, :]).flatten(1).gather(1, best)
    cand, valid = idx.candidates(cells)
    found = ((cand == torch.arange(len(q))[:, None]) & valid).any(1).float().mean().item()
    assert found > 0.95
    # Candidates are exactly the rows of the probed cells, each once.
    for b in range(0, len(q), 37):
        want = sorted(torch.isin(idx.cell, cells[b]).nonzero().squeeze(1).tolist())
        assert sorted(cand[b][valid[b]].tolist()) == want
    assert idx.width <= model.settings.max_cell_rows
    assert torch.bincount(idx.cell).sum().item() == len(q)


def test_scan_and_probe_retrieve_the_same_rows(model_and_tok):
    _, _, model = model_and_tok
    gate, idx = decoder_layers(model.backbone)[0].memory_gate.eval(), model.index
    # Queries near rows' own keys: a narrow probe (16 of the grid's cells) reads the cells those
    # rows sit in, so its top rows must match ranking the whole bank for nearly every query.
    gate.top_cells, gate.probe_cells = 8, 16
    assert idx.n1 * idx.n2 > 10 * gate.probe_cells
    g = torch.Generator().manual_seed(0)
    h = idx.keys[::3] @ gate.key_projection + 0.01 * torch.randn(
        len(idx.keys[::3]), gate.key_projection.shape[1], generator=g
    )
    h, qw = h[:, None, :], torch.ones(len(h), 1)
    with torch.no_grad():
        gate.scan_rows = 0
        probe_rows, probe_w, _ = gate(h, qw, idx)
        gate.scan_rows = len(idx.keys)
        scan_rows, scan_w, _ = gate(h, qw, idx)
    same = (probe_rows[:, 0] == scan_rows[:, 0]).float().mean().item()
    assert same > 0.95, same
    assert torch.allclose(scan_w.sum(1), torch.ones(len(h)))


def test_int8_ranking_keeps_the_exact_best():
    # The probe ranks candidates with int8 keys on a CPU, then scores the best 32 exactly: the
    # exact top 8 of every query must be among its int8 top 32.
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(4096, 64, generator=g), dim=-1)
    idx = ProductKeyIndex(keys, n_sub_keys(len(keys)), max_cell_rows=16)
    q = torch.nn.functional.normalize(idx.keys[:40] + 0.3 * torch.randn(40, 64, generator=g), dim=-1)
    pos = torch.randint(0, len(keys), (40, 1500), generator=g)
    exact = (take(idx.keys, idx.order[pos]) @ q[:, :, None]).squeeze(-1)  # (40, 1500)
    approx = rank_int8(idx, pos, q, group=16)
    approx = approx * q.abs().amax(1, keepdim=True) / 127  # undo the query's own int8 scale
    assert (approx - exact).abs().max() < 0.01  # cosines; bf16 rounding is of the same size
    top8 = exact.topk(8, dim=1).indices
    top32 = approx.topk(32, dim=1).indices
    kept = torch.stack([torch.isin(top8[i], top32[i]).all() for i in range(len(q))])
    assert kept.all()


def test_pair_shortlist_keeps_the_best_cells():
    # Two best-first score lists: the shortlist must hold every pair of the exact top p of all c x c sums.
    g = torch.Generator().manual_seed(0)
    for c, p in [(16, 32), (128, 2048), (8, 64), (5, 3)]:
        t1 = torch.randn(4, c, generator=g).sort(dim=1, descending=True).values
        t2 = torch.randn(4, c, generator=g).sort(dim=1, descending=True).values
        full = (t1[:, :, None] + t2[:, None, :]).flatten(1).topk(min(p, c * c), dim=1).values
        a, b = pair_shortlist(c, c, p, "cpu")
        assert len(a) < c * c or p >= c * c
        short = (t1[:, a] + t2[:, b]).topk(min(p, len(a)), dim=1).values
        assert torch.equal(full, short)


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
    b = collate([encode(tok, q.user, q.question, LABELS[i], t, 512) for i, t in enumerate(q.options)], tok.pad_token_id)
    at = predict_mask(b["option_mask"])
    with torch.no_grad():
        out = model(
            b["input_ids"], b["attention_mask"], b["query_mask"], question_mask=b["question_mask"], logits_mask=at
        )
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
