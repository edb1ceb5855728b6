import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from explicitlm.adapter import load_adapter_weights, memory_parameters, save_adapter, set_trainable
from explicitlm.data import LABELS, collate, encode, render_answer, split_prompt
from explicitlm.errors import UserError
from explicitlm.loading import build_model
from explicitlm.objective import encode_record, lm_loss, record_question
from explicitlm.scoring import Question, generate_answers, memory_rows, open_prompt, score_questions
from tests.conftest import memory_forward, tiny_config


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
        ours = memory_forward(model, b).logits
        ref = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (ours - ref).abs().max().item() < 1e-5


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
    # The fusion's output, the reader's heads and its question encoder's last layer start at zero:
    # each step opens the next, and the third sees every gradient.
    for _ in range(3):
        opt.zero_grad()
        out = memory_forward(
            model, b, target_rows=gold, hide=torch.zeros(8, dtype=torch.bool), logits_index=b["loss_index"]
        )
        (lm_loss(out.logits, b["input_ids"], b["loss_index"]) + out.retrieval_loss).backward()
        grads = {n: p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in trainable.items()}
        opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
            assert torch.equal(p, frozen_before[n]), n
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]
    assert any("memory_gate.r_proj" in n for n in grads) and any("gated_memory_fusion" in n for n in grads)
    assert any(".q_encoder.0." in n for n in grads)  # the question encoder (model.reader_encoder) trains too


def test_hidden_other_facts_are_kept_from_the_reader_and_leave_nothing_to_rule_out(model_and_tok, records):
    """hide_others: the rows that name a wrong option leave the reading (weight 0, the own row kept)
    and the exclusion's target becomes its null; questions not drawn read exactly as without it."""
    from explicitlm.model import named_rows, option_rows

    _, tok, model = model_and_tok
    b = _batch(tok, records)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    model.train()
    with torch.no_grad():
        rows = memory_forward(model, b, target_rows=gold, hide=torch.zeros(8, dtype=torch.bool)).reads[0].rows
        # A "wrong option" for each question: every token of a candidate row that is not its own.
        other = rows.gather(1, (rows != gold[:, None]).float().argmax(1, keepdim=True)).squeeze(1)  # (B,)
        options = torch.cat([torch.full((8, 1), -1), model.bank.token_ids[other]], 1)  # (B, 1 + L)
        ids, mask = model.bank.token_ids[rows], model.bank.mask[rows].bool()
        named = named_rows(option_rows(ids, mask, options)) & (rows != gold[:, None])
        assert named.any(1).all()
        drawn = torch.arange(8) % 2 == 0

        def run(hide_others):
            out = memory_forward(
                model,
                b,
                target_rows=gold,
                hide=torch.zeros(8, dtype=torch.bool),
                option_tokens=options,
                hide_others=hide_others,
            )
            return out.reads[0].weights, out.exclusion_loss

        plain, x_plain = run(None)
        hidden, x_hidden = run(drawn)
        _, x_everyone = run(torch.ones(8, dtype=torch.bool))
        _, x_rest = run(~drawn)
        # Training's default pass (prompt, then answer from its cache) takes the same draw.
        encoded = [encode_record(tok, r, 512) for r in records[:8]]
        prompt, answer = (collate(list(p), tok.pad_token_id) for p in zip(*map(split_prompt, encoded)))
        split = model.answer_forward(prompt, answer, gold, torch.zeros(8, dtype=torch.bool), options, drawn)
    own = rows == gold[:, None]
    assert own.any(1).all()  # every question's own row is read
    assert (hidden[drawn][named[drawn]] == 0).all()
    assert (hidden[drawn][own[drawn]] > 0).all()  # the asked fact stays
    assert torch.equal(hidden[~drawn], plain[~drawn])
    assert torch.allclose(split.reads[0].weights, hidden)
    assert split.exclusion_loss.item() == pytest.approx(x_hidden.item(), rel=1e-5)
    # The option tokens a visible row rules out (for the option loss of a question whose fact is gone).
    for q in range(8):  # each option token a named row the question still sees holds, else -1
        held = {t for r in range(rows.shape[1]) if named[q, r] and not drawn[q] for t in ids[q, r][mask[q, r]].tolist()}
        expected = [t if t >= 0 and t in held else -1 for t in options[q].tolist()]
        assert split.ruled_out[q].tolist() == expected, q
    assert (split.ruled_out[~drawn] >= 0).any(1).all()
    # Each question's exclusion loss depends on its own draw only: the halves add up to all and none.
    # With nothing left to rule out its target is the null (-log P(null), not the named rows').
    assert x_everyone.item() != pytest.approx(x_plain.item())
    assert x_hidden.item() + x_rest.item() == pytest.approx(x_plain.item() + x_everyone.item(), rel=1e-5)


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


def test_the_question_encoder_starts_as_the_backbone_and_its_weights_carry_its_width(
    tiny_base, bank_path, world, tmp_path, records
):
    """model.reader_encoder adds an MLP beside the reader's question projection, starting at zero:
    its weights record the width, a model of another width refuses them, weights saved before the
    key existed load as width 0, and such weights start a run with the encoder as the model they were."""
    from explicitlm.loading import fill_from_weights

    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, "model.reader_encoder=32")
    tok, model = build_model(cfg)
    bare = AutoModelForCausalLM.from_pretrained(tiny_base)
    b = _batch(tok, records)
    with torch.no_grad():
        ref = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for p in memory_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.01)
    names = [n for n in memory_parameters(model) if ".q_encoder." in n]
    assert len(names) == 4 * model.backbone.config.num_hidden_layers  # two Linear layers' weight and bias
    folder = save_adapter(model, tmp_path / "encoder")
    plain = tiny_config(tiny_base, bank_path, world, tmp_path, "model.reader_encoder=0")
    assert fill_from_weights(plain, str(folder)).model.reader_encoder == 32
    _, reloaded = build_model(fill_from_weights(plain, str(folder)), adapter=str(folder))
    assert all(torch.equal(p, memory_parameters(reloaded)[n]) for n, p in memory_parameters(model).items())
    _, other = build_model(tiny_config(tiny_base, bank_path, world, tmp_path, "model.reader_encoder=0"))
    with pytest.raises(UserError, match="reader_encoder: adapter 32 vs model 0"):
        load_adapter_weights(other, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["memory"]["reader_encoder"]  # as a loader from before the key would read it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"q_encoder\.0\.weight: in the adapter, not in this model"):
        load_adapter_weights(other, folder)
    with torch.no_grad():
        for p in memory_parameters(other).values():
            p.add_(torch.randn_like(p) * 0.01)
    before = save_adapter(other, tmp_path / "before")  # width 0, as every earlier run saved it
    config = json.loads((before / "adapter_config.json").read_text())
    del config["memory"]["reader_encoder"]
    (before / "adapter_config.json").write_text(json.dumps(config))
    assert fill_from_weights(tiny_config(tiny_base, bank_path, world, tmp_path), str(before)).model.reader_encoder == 0
    load_adapter_weights(other, before)
    # They also start a training run of a model with the encoder, which then computes what they did.
    _, started = build_model(cfg, adapter=str(before), start_from=True)
    with torch.no_grad():
        moved = memory_forward(other, b).logits
        assert (moved - ref).abs().max() > 1e-3  # the weights change the answer: the check below can fail
        assert torch.equal(memory_forward(started, b).logits, moved)


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
    encoded = [encode(tok, q.user, q.question, render_answer(LABELS[i], t), t, 512) for i, t in enumerate(q.options)]
    b = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        logits = memory_forward(model, b).logits  # (B, T, V) at every position
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, b["input_ids"][:, 1:, None])[..., 0]  # (B, T - 1)
    at = b["option_mask"][:, 1:].bool()  # positions whose next token is the option's text
    return [float(lp[i][at[i]].mean()) for i in range(len(q.options))]


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


def _saved_as_older(model, folder, fmt: str, **more):
    """The model's memory weights (moved off their start) saved as an older format would have them:
    that format in the config, no exclusion tensors, and `more` tensors besides."""
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        for p in memory_parameters(model).values():
            p.add_(0.01)
    folder = save_adapter(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["format"] == "explicitlm-adapter/4"
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, format=fmt)))
    tensors = load_file(str(folder / "memory_modules.safetensors"))
    old = {n: t for n, t in tensors.items() if ".x_" not in n}
    assert 0 < len(old) < len(tensors)
    save_file({**old, **more}, str(folder / "memory_modules.safetensors"))
    return folder


def test_weights_of_the_older_format_are_refused_with_the_way_forward(model_and_tok, tmp_path):
    """An adapter of format 1 (retrieval by token-embedding keys, the training bank's statistics
    inside it) cannot answer with lexical retrieval: one line says how to retrain from it, and a
    training run started from it takes its fusion and norms."""
    cfg, tok, model = model_and_tok
    # What format 1 carried besides the modules: the training bank's statistics.
    folder = _saved_as_older(model, tmp_path / "old", "explicitlm-adapter/1", **{"index.idf": torch.ones(10)})
    with pytest.raises(UserError, match="pretrained_sft_model_path=") as e:
        build_model(cfg, adapter=str(folder))
    assert "\n" not in str(e.value)
    _, started = build_model(cfg, adapter=str(folder), start_from=True)
    mine, theirs = memory_parameters(model), memory_parameters(started)
    kept = [n for n in mine if ("gated_memory_fusion" in n or "memory_norm" in n) and ".x_" not in n]
    assert kept and all(torch.equal(mine[n], theirs[n]) for n in kept)
    assert all(not torch.equal(mine[n], theirs[n]) for n in mine if ".memory_gate." in n or ".x_" in n)


def test_weights_without_the_exclusion_load_and_answer_as_they_were_trained(model_and_tok, tmp_path, records):
    """Format 3 had no exclusion. Its weights load (the exclusion keeps its zero write) and score
    exactly as a model whose exclusion writes nothing."""
    cfg, tok, model = model_and_tok
    folder = _saved_as_older(model, tmp_path / "v3", "explicitlm-adapter/3")
    _, loaded = build_model(cfg, adapter=str(folder))
    qs = [record_question(r) for r in records[:6]]
    for layer in model.backbone.model.layers:
        torch.nn.init.zeros_(layer.gated_memory_fusion.x_out_proj.weight)
    want = [s.scores for s in score_questions(model, tok, qs, 512)]
    got = [s.scores for s in score_questions(loaded, tok, qs, 512)]
    assert max(abs(a - b) for x, y in zip(want, got) for a, b in zip(x, y)) < 1e-5


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
        memory_forward(model, b)
    model.to(torch.float32)
    model.float()
    assert model.memory_moves == moves
    names = {name.split(".")[0] for name, _ in model.memory_tensors()}
    assert names == {"bank", "index", "postings"}
    model.to("meta")
    assert model.memory_moves == moves + 1
    assert {t.device.type for _, t in model.memory_tensors()} == {"meta"}


def test_generation_with_the_cache_equals_a_forward_without_it(model_and_tok, records):
    """Greedy answers read memory once and keep the KV cache; step by step, full forward passes over
    the growing sequence (every slot filled from the same reading) must give the same tokens."""
    _, tok, model = model_and_tok
    torch.manual_seed(1)
    with torch.no_grad():  # a fusion that writes memory, so that the memory path decides the tokens
        for layer in model.backbone.model.layers:
            layer.gated_memory_fusion.out_proj.weight.normal_(0, 0.2)
    model.eval()
    qs = [Question(r["question"], []) for r in records[:5]]
    made = generate_answers(model, tok, qs, 512, max_new_tokens=6, batch_size=3)
    for q, g in zip(qs, made):
        prompt = open_prompt(tok, q, 512)[0]
        ids, slots = list(prompt.input_ids), list(prompt.slots)
        tokens = []
        for step in range(6):
            e = type(prompt)(
                ids, [0] * len(ids), [0] * len(ids), prompt.query_mask + [0] * step, prompt.words + [0] * step, slots
            )
            b = collate([e], tok.pad_token_id)
            with torch.no_grad():
                token = int(memory_forward(model, b).logits[0, -1].argmax())
            tokens.append(token)
            if token == model.end_token_id:
                break
            ids, slots = ids + [token], slots + [step + 1]
        expected = tokens[: tokens.index(model.end_token_id)] if model.end_token_id in tokens else tokens
        assert g.tokens == expected, (g.tokens, expected)
    assert len({tuple(g.tokens) for g in made}) > 1  # the questions' memories differ, and so do the answers


def test_memory_off_is_the_bare_backbone(model_and_tok, records):
    """serve.memory=false: with a fusion that writes memory, scores and answers are the backbone's
    own (its full-sequence log-likelihoods, its greedy tokens), and no rows are reported."""
    _, tok, model = model_and_tok
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in model.backbone.model.layers:
            layer.gated_memory_fusion.out_proj.weight.normal_(0, 0.2)
    model.eval()
    qs = [Question(r["question"], r["options"]) for r in records[:4]]
    with_memory = score_questions(model, tok, qs, 512)
    model.memory_off = True
    try:
        bare = score_questions(model, tok, qs, 512)
        made = generate_answers(model, tok, [Question(q.question, []) for q in qs], 512, max_new_tokens=5)
    finally:
        model.memory_off = False
    assert all(not s.memory and not s.trust for s in bare) and all(not g.memory for g in made)
    assert max(abs(a - b) for s, t in zip(with_memory, bare) for a, b in zip(s.scores, t.scores)) > 1e-3
    for q, s in zip(qs, bare):  # the backbone alone, each option's whole sequence
        for oi, text in enumerate(q.options):
            e = encode(tok, q.user, q.question, render_answer(LABELS[oi], text), text, 512)
            logp = torch.log_softmax(model.backbone(torch.tensor([e.input_ids])).logits[0].float(), -1)
            at = [t - 1 for t, m in enumerate(e.option_mask) if m]
            expected = float(torch.stack([logp[t, e.input_ids[t + 1]] for t in at]).mean())
            assert s.scores[oi] == pytest.approx(expected, abs=1e-4)
    for q, g in zip(qs, made):
        ids = list(open_prompt(tok, Question(q.question, []), 512)[0].input_ids)
        expected = []
        for _ in range(5):
            token = int(model.backbone(torch.tensor([ids])).logits[0, -1].argmax())
            if token == model.end_token_id:
                break
            expected.append(token)
            ids.append(token)
        assert g.tokens == expected


def test_word_dropout_keeps_a_draw_of_question_tokens_from_the_readers_in_training_only(model_and_tok, records):
    """training.word_dropout: in training each pass keeps a fresh draw of the question's tokens from
    every reader (the same draw in the prompt-then-answer pass; with a dropout seed, the seed's draw
    whatever torch's generator holds); answering reads every token."""
    _, tok, model = model_and_tok
    with torch.no_grad():  # heads that read the question's tokens (untrained they start at zero)
        for layer in model.backbone.model.layers:
            for head in (layer.memory_gate.q_head, layer.memory_gate.r_head):
                torch.nn.init.normal_(head.weight, std=0.5)
    b = _batch(tok, records)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    shown = torch.zeros(8, dtype=torch.bool)  # no question's own row hidden

    def weights(seed=0):
        torch.manual_seed(seed)
        with torch.no_grad():
            return memory_forward(model, b, target_rows=gold, hide=shown).reads[0].weights

    model.train()
    full = weights()
    model.word_dropout = 0.5
    dropped, again, other = weights(), weights(), weights(seed=1)
    assert torch.equal(dropped, again)  # the draw comes from torch's generator
    assert (dropped - full).abs().max().item() > 1e-3 and (other - dropped).abs().max().item() > 1e-3
    encoded = [encode_record(tok, r, 512) for r in records[:8]]
    prompt, answer = (collate(list(p), tok.pad_token_id) for p in zip(*map(split_prompt, encoded)))
    torch.manual_seed(0)
    with torch.no_grad():
        split = model.answer_forward(prompt, answer, gold, shown)
    assert torch.allclose(split.reads[0].weights, dropped, atol=1e-6)
    # Seeded (as the training loop seeds each micro-batch): the draw follows the seed, not the
    # generator's state, and another seed draws another.
    model.dropout_seed = 7
    seeded, seeded_again = weights(seed=0), weights(seed=1)
    model.dropout_seed = 8
    other_seeded = weights(seed=0)
    model.dropout_seed = None
    assert torch.equal(seeded, seeded_again)
    assert (seeded - full).abs().max().item() > 1e-3 and (other_seeded - seeded).abs().max().item() > 1e-3
    model.word_dropout = 0.5
    model.eval()  # answering reads every token, with or without target rows
    eval_dropped = weights()
    model.word_dropout = 0.0
    assert torch.equal(eval_dropped, weights())


def test_others_null_adds_the_null_against_every_row_but_the_own(model_and_tok, records):
    """training.others_null: each question's reading loss gains that weight times -log P(null) over
    the null and its rows without its own (a hidden question's loss, which it already is there)."""
    import math

    from explicitlm.modules import Reading, reading_loss

    scores = torch.tensor([[0.5, 2.0, 1.0, -math.inf], [1.0, 0.0, 3.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
    reading = Reading(scores, torch.zeros(3, 3, 4), torch.zeros(3, 3, 4), torch.zeros(3, 4))
    target, span = torch.tensor([1, 0, -1]), torch.full((3, 2), -1)  # row 0; the null; unknown (no loss)
    plain, weighted = reading_loss(reading, target, span), reading_loss(reading, target, span, 0.5)
    rest = [
        -torch.log_softmax(torch.tensor([0.5, 1.0]), 0)[0],  # the own row and the padding left out
        -torch.log_softmax(scores[1], 0)[0],  # a hidden question: the null among all its rows, again
    ]
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * sum(rest).item() / 2, rel=1e-6)
    _, tok, model = model_and_tok
    b = _batch(tok, records)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    model.train()
    with torch.no_grad():
        losses = []
        for weight in (0.0, 1.0):
            model.others_null = weight
            losses.append(
                memory_forward(model, b, target_rows=gold, hide=torch.zeros(8, dtype=torch.bool)).retrieval_loss
            )
    assert losses[1].item() > losses[0].item() + 0.1


def test_row_context_is_the_width_3_convolution():
    """`neighbours` computes what a Conv1d (kernel 3, padding 1) over each row's tokens computes."""
    from explicitlm.modules import neighbours

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 5, 3, padding=1)
    x = torch.randn(2, 3, 7, 8)
    ref = conv(x.reshape(6, 7, 8).transpose(1, 2)).transpose(1, 2).reshape(2, 3, 7, 5)
    assert torch.allclose(neighbours(conv, x), ref, atol=1e-5)
    x[:, :, 0] = 0  # a token's left neighbour counts: change it and only its right neighbour moves
    moved = neighbours(conv, x) - ref
    assert moved[:, :, :2].abs().amin(-1).amin() > 0  # the token itself and its right neighbour
    assert moved[:, :, 2:].abs().max() < 1e-5
