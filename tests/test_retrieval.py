"""The candidate stage, which has nothing to train: the rows each reader reads must include the
question's own for any wording and any bank, in one batched pass that never asks the device how many
rows it found (no host sync), and the same rows whether a question is asked alone or in a batch."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from explicitlm.adapter import save_adapter
from explicitlm.bank import MemoryBank
from explicitlm.data import collate, encode, render_open_answer
from explicitlm.loading import build_model
from explicitlm.readers import read_knowledge
from explicitlm.scoring import Question, score_questions
from tests.conftest import tiny_config

# Wordings the sample world never uses: the subject first, last, lower-cased, mid-sentence.
WORDINGS = {
    "capital": ["{s}'s capital is ____.", "name the capital city of {s}", "Which city serves as capital for {s}?"],
    "continent": ["{s} sits on the continent ____.", "Tell me which continent contains {s}."],
    "currency": ["{s} pays with the currency ____.", "What currency do people use in {s}?"],
    "calling_code": ["{s} has the telephone calling code ____.", "Dial which calling code to phone {s}?"],
    "city_country": ["{s} is a city in the country ____.", "Which country contains the city {s}?"],
}


def _questions(records, limit=120):
    out = []
    for r in records[:limit]:
        for template in WORDINGS[r["predicate"]]:
            text = template.format(s=r["subject"])
            out.append((r, Question(text[0].upper() + text[1:] if text[0] == "{" else text, list(r["options"]))))
    return out


def _question_words(tok, questions):
    b = collate([encode(tok, q, q, render_open_answer("x"), "x", 512) for q in questions], tok.pad_token_id)
    return b["words"].gather(1, b["query_index"].clamp(min=0)) * (b["query_index"] >= 0)  # (B, Q)


@pytest.mark.parametrize("search", ["model.scan_rows=8192", "model.scan_rows=0"], ids=["scan", "probe"])
def test_any_wording_brings_its_row_to_the_reader(tiny_base, bank_path, world, tmp_path, records, search):
    """Ranked whole, or probed through the index's cells plus the rows its rarest words name: the
    question's own row among the rows the reader reads, and most often the first by cosine."""
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, search)
    tok, model = build_model(cfg)
    pairs = _questions(records)
    words = _question_words(tok, [q.question for _, q in pairs])
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r, _ in pairs])
    c = model.candidates(words)
    among = ((c.rows == gold[:, None]) & c.valid).any(1).float().mean().item()
    first = (c.rows[:, 0] == gold).float().mean().item()
    assert among > 0.97 and first > 0.8, (among, first)


def test_a_bank_ranked_whole_takes_the_lists_share_from_its_ranking(tiny_base, bank_path, world, tmp_path, records):
    """A bank of at most model.scan_rows rows: its candidates are its key ranking's best
    candidates + posting_rows, as if it had no lists (the lists' rows join a probe's, as the tests
    with model.scan_rows=0 read them)."""
    from explicitlm.retrieval import find_candidates

    tok, model = build_model(tiny_config(tiny_base, bank_path, world, tmp_path, "model.scan_rows=8192"))
    s = model.settings
    assert len(model.index) <= s.scan_rows and model.postings is not None and s.posting_rows > 0
    words = _question_words(tok, [q.question for _, q in _questions(records, 40)])
    got = model.candidates(words)
    wide = find_candidates(
        model.bank, model.index, words, s.candidates + s.posting_rows, s.top_k, 0, 0, s.scan_rows, s.seed
    )
    assert torch.equal(got.rows, wide.rows) and torch.equal(got.valid, wide.valid)
    narrow = find_candidates(model.bank, model.index, words, s.candidates, s.top_k, 0, 0, s.scan_rows, s.seed)
    assert not torch.equal(got.rows, narrow.rows)  # the lists' share did widen the ranking's


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: a scalar read (.item(), int(), bool(),
    .tolist()), and the ops whose output size depends on the data (nonzero, unique, boolean-mask
    indexing, masked_select, repeat_interleave without an output size)."""

    SYNCING = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.masked_select",
    )

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None
        )
        repeat = name.startswith("aten.repeat_interleave") and (kwargs or {}).get("output_size") is None
        if name.startswith(self.SYNCING) or bool_index or repeat:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("search", ["model.scan_rows=8192", "model.scan_rows=0"], ids=["scan", "probe"])
def test_reading_memory_never_waits_for_the_device(tiny_base, bank_path, world, tmp_path, records, search):
    """Candidates, the reader's features, every layer's reading, the span values and the fusion, in
    training (with targets, hidden rows and the reading loss): no op that needs the host to learn a
    size or a value. The backbone's own attention-mask helper is transformers' and not counted: the
    hooks and the memory context are run here directly."""
    from explicitlm.objective import encode_record

    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, search)
    tok, model = build_model(cfg)
    model.set_memory_row(records[0]["uuid"], "An edited sentence about somewhere.", tok)  # the side lists too
    b = collate([encode_record(tok, r, 512, i % 2 == 1) for i, r in enumerate(records[:8])], tok.pad_token_id)
    gold = torch.tensor([model.bank.row_of(r["uuid"]) for r in records[:8]])
    hide = torch.tensor([i % 3 == 0 for i in range(8)])
    model.train()
    args = (b["input_ids"], b["query_index"], b["words"], b["slots"], gold, hide, False)
    model._context(*args)  # warm caches (the probe's pair shortlist is computed once per shape)
    guard = _HostSyncs()
    with guard:
        ctx = model._context(*args)
        model._ctx = ctx
        hidden = model._embeddings()[b["input_ids"]]
        for i, layer in enumerate(model.backbone.model.layers):
            hidden = model._layer_hook(i, layer, (hidden,), {}, (hidden,))[0]
        model._ctx = None
        loss = torch.stack(ctx.losses).mean() + hidden.sum()
    assert guard.ops == [], guard.ops
    loss.backward()  # and the graph it built is a real one


def test_a_batch_finds_what_each_question_finds_alone(tiny_base, bank_path, world, tmp_path, records):
    """The batched search (fixed shapes, padding) against one question at a time, with edits made
    after the build (rows on the side lists and scanned outside their cells)."""
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, "model.scan_rows=0")
    tok, model = build_model(cfg)
    for r in records[:5]:
        model.set_memory_row(r["uuid"], f"{r['subject']} was renamed Zorblat.", tok)
    model.set_memory_row("new", "Quuxland is a new country whose capital is Frobtown.", tok)
    questions = [r["question"] for r in records[:20]] + ["What is Zorblat?", "Which capital has Quuxland?"]
    words = _question_words(tok, questions)
    batch = model.candidates(words)
    for i in range(len(questions)):
        alone = model.candidates(_question_words(tok, [questions[i]]))
        got = [int(r) for r, v in zip(batch.rows[i], batch.valid[i]) if v]
        want = [int(r) for r, v in zip(alone.rows[0], alone.valid[0]) if v]
        assert got == want, (questions[i], got, want)
    assert model.bank.row_of("new") in batch.rows[-1].tolist()
    # The exact stage from the rows' word numbers (what the model runs) is the search's, to the bit.
    from explicitlm.retrieval import word_overlap

    row_words, qs = model.postings.row_words, words.sort(1).values
    by_number = word_overlap(model.bank, batch.rows, qs, row_words)
    by_search = word_overlap(model.bank, batch.rows, qs)
    assert all(torch.equal(a, b) for a, b in zip(by_number, by_search)) and by_number[0].max() > 0.5
    held = model.bank.word_ids[model.bank.first]  # every word held, once a row: the counts agree
    assert torch.equal(row_words.idf(row_words.number(held)), model.bank.counts.idf(held))


@pytest.mark.parametrize("size", ["one", "two", "identical", "fifty_times"])
def test_any_adapter_on_any_bank(tiny_base, bank_path, world, tmp_path, records, tokenizer, size):
    """Weights saved with the sample bank answer on a bank of one row, of fewer rows than sub-keys,
    of many identical sentences, and 50 times the size: no crash, every retrieved row a real row, and
    on the big bank the original questions still bring their rows to the reader."""
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path, "model.scan_rows=0")
    _, model = build_model(cfg)
    torch.manual_seed(0)
    for layer in model.backbone.model.layers:  # a non-zero fusion: the memory path runs for real
        torch.nn.init.normal_(layer.gated_memory_fusion.out_proj.weight, std=0.05)
    save_adapter(model, tmp_path / "weights")
    rows = list(read_knowledge(world["knowledge"]))
    subject = {r["uuid"]: r["subject"] for r in records}
    bank_rows = {
        "one": rows[:1],
        "two": rows[:2],
        "identical": rows[:50] + [{"uuid": f"c{i}", "text": "One sentence, many copies."} for i in range(300)],
        "fifty_times": rows
        + [
            {
                "uuid": f"d{i}-{r['uuid']}",
                "text": r["text"].replace(subject[r["uuid"]], f"Nova{i}"),
            }
            for i in range(50)
            for r in rows
            if r["uuid"] in subject
        ],
    }[size]
    tok, big = build_model(cfg, adapter=str(tmp_path / "weights"), bank=MemoryBank.build(bank_rows, tokenizer, 16))
    qs = [Question(r["question"], list(r["options"])) for r in records[:24]]
    scored = score_questions(big, tok, qs, 512)
    assert all(0 <= row < len(bank_rows) for s in scored for layer in s.memory for row, _ in layer)
    assert all(abs(sum(s.probabilities) - 1) < 1e-6 for s in scored)
    if size == "fifty_times":
        assert len(bank_rows) > 19000 and big.index.n1 > model.index.n1
        # Among the rows the reader reads (the copies, cut shorter at 16 tokens, can rank above it).
        found = [big.bank.row_of(r["uuid"]) in [row for row, _ in s.memory[0]] for r, s in zip(records[:24], scored)]
        assert sum(found) / len(found) > 0.9


def test_span_values_read_each_slot_and_every_reading_in_one_product():
    """A sure span at tokens 2-3 of row 1 (weight .75) writes those tokens to slots 0-1, then the end
    of turn with the whole weight; the exclusion's reading (no end token) writes nothing past its
    span. Reading both in one product gives what each gives alone."""
    from explicitlm.retrieval import span_values

    torch.manual_seed(0)
    B, R, L, D, S = 2, 3, 6, 5, 4
    rows = torch.randn(B, R, L, D)
    end_token = torch.randn(D)
    sure = torch.full((B, R, L), -1e4)
    start, end = sure.clone(), sure.clone()
    start[:, :, 2], end[:, :, 3] = 0.0, 0.0
    weights = torch.tensor([[0.0, 0.75, 0.0]]).expand(B, R)
    other = torch.softmax(torch.randn(B, R), 1) * 0.5
    (values, mass), (x_values, x_mass) = span_values(rows, start, end, S, [(weights, end_token), (other, None)])
    torch.testing.assert_close(values[:, 0], 0.75 * rows[:, 1, 2])
    torch.testing.assert_close(values[:, 1], 0.75 * rows[:, 1, 3])
    torch.testing.assert_close(values[:, 2:], (0.75 * end_token).expand(B, 2, D))
    torch.testing.assert_close(mass, torch.full((B, S), 0.75))
    torch.testing.assert_close(x_values[:, 2:], torch.zeros(B, 2, D))
    torch.testing.assert_close(x_mass, torch.cat([other.sum(1, keepdim=True).expand(B, 2), torch.zeros(B, 2)], 1))
    [(alone, alone_mass)] = span_values(rows, start, end, S, [(other, None)])
    torch.testing.assert_close(x_values, alone)
    torch.testing.assert_close(x_mass, alone_mass)
