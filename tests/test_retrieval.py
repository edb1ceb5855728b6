"""Memory that answers any wording and any bank, before any training: retrieval and the coverage
gate are lexical, so they can be checked on the untrained model (the fusion is zero, the logits are
the backbone's) with the question worded unlike the sample world's templates."""

import pytest
import torch

from explicitlm.adapter import save_adapter
from explicitlm.bank import MemoryBank
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


def _read(model, tok, pairs):
    scored = score_questions(model, tok, [q for _, q in pairs], 512)
    found = [s.memory[0][0][0] == model.bank.row_of(r["uuid"]) for (r, _), s in zip(pairs, scored)]
    used = [sum(s.used) / len(s.used) for s in scored]
    return sum(found) / len(found), sum(used) / len(used)


def test_any_wording_finds_its_row_and_reads_only_when_the_bank_has_the_fact(
    tiny_base, bank_path, world, tmp_path, records
):
    cfg = tiny_config(tiny_base, bank_path, world, tmp_path)
    tok, model = build_model(cfg)
    pairs = _questions(records)
    recall, read = _read(model, tok, pairs)
    assert recall > 0.9 and read > 0.9, (recall, read)
    # The same questions against a bank without their subjects' sentences: memory stays off.
    subjects = {r["subject"] for r, _ in pairs}
    rows = [r for r in read_knowledge(world["knowledge"]) if not any(s in r["text"] for s in subjects)]
    _, without = build_model(cfg, bank=MemoryBank.build(rows, tok, 16))
    _, read_without = _read(without, tok, [(dict(r, uuid=""), q) for r, q in pairs])
    assert read_without < 0.1, read_without


@pytest.mark.parametrize("size", ["one", "two", "identical", "fifty_times"])
def test_any_adapter_on_any_bank(tiny_base, bank_path, world, tmp_path, records, tokenizer, size):
    """Weights saved with the sample bank answer on a bank of one row, of fewer rows than sub-keys,
    of many identical sentences, and 50 times the size: no crash, every retrieved row a real row, and
    on the big bank the original questions still find their rows."""
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
                "text": r["text"].replace(subject[r["uuid"]], f"Nova{i} {subject[r['uuid']]}"),
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
        found = [s.memory[0][0][0] == big.bank.row_of(r["uuid"]) for r, s in zip(records[:24], scored)]
        assert sum(found) / len(found) > 0.9
