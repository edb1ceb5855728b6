"""The learned decision on a tiny bank with two facts per subject: which of them is asked, and, when
only the other one is in the bank, not answering with its object.

Every person has a birthplace and a place of death, both in the bank; each question offers the other
fact's place as a distractor. Held-out people are asked after training: with both rows the reader
must pick the asked relation's row; with only the other row its object must be ruled out, which
needs the exclusion (abstaining alone leaves a random backbone at chance, 0.25); with only the asked
fact's row the answer must stand.
"""

import json
import random
from dataclasses import asdict

import pytest

from explicitlm.bank import MemoryBank
from explicitlm.data import LABELS, format_options, parse_target
from explicitlm.loading import build_model
from explicitlm.objective import record_question
from explicitlm.scoring import score_questions
from explicitlm.split import subject_split
from explicitlm.train import train_loop_per_worker
from tests.conftest import tiny_config

CITIES = (
    "Ulm Lima Oslo Kyiv Rome Porto Turin Graz Basel Lyon Nantes Bergen Malmo Aarhus Brno Gdansk Riga Tartu "
    "Split Cork Leeds Bari Nice Pisa Delft Ghent Bonn Kiel Linz Bremen"
).split()
FIRST = "Ada Bo Cy Dana Eli Fay Gus Hal Ida Jon Kai Lea Max Ned Ola Pia".split()
LAST = "Quill Smith Brook Stone Vance Moss Thorne Wells Hart Lowe Frost Grey Marsh".split()
ASK = {"born": "Where was {s} born?", "died": "Where did {s} die?"}
SAY = {"born": "{s} was born in {o}.", "died": "{s} died in {o}."}


def _world() -> tuple[list[dict], list[dict], list[dict]]:
    """(OMCQ items, bank rows, facts): each person born in one city and dead in another."""
    rng = random.Random(0)
    items, rows, facts = [], [], []
    for first in FIRST:
        for last in LAST:
            s = f"{first} {last}"
            born, died = rng.sample(CITIES, 2)
            for rel, obj, other in (("born", born, died), ("died", died, born)):
                uuid = f"{s}|{rel}"
                options = [obj, other, *rng.sample([c for c in CITIES if c not in (obj, other)], 2)]
                rng.shuffle(options)
                target = {
                    "question": ASK[rel].format(s=s),
                    "options": format_options(options),
                    "correct_answer": f"{LABELS[options.index(obj)]}:{obj}",
                    "uuid": uuid,
                    "subject": s,
                    "predicate": rel,
                }
                items.append({"target": [target]})
                rows.append({"uuid": uuid, "text": SAY[rel].format(s=s, o=obj)})
                facts.append({"uuid": uuid, "subject": s, "other": other})
    return items, rows, facts


@pytest.fixture(scope="module")
def two_facts(tmp_path_factory):
    from transformers import AutoTokenizer

    from explicitlm.base import make_base

    d = tmp_path_factory.mktemp("two_facts")
    items, rows, facts = _world()
    (d / "omcq.json").write_text(json.dumps(items))
    knowledge = d / "knowledge.jsonl"
    knowledge.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_base(
        d / "base",
        [i["target"][0]["question"] for i in items] + [r["text"] for r in rows],
        seed=0,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
    )
    from explicitlm.bank import load_or_build_bank

    load_or_build_bank(d / "bank.parquet", knowledge, AutoTokenizer.from_pretrained(d / "base"), 16, 10**6)
    records = [dict(parse_target(i["target"][0]), idx=k) for k, i in enumerate(items)]
    train = [r for r in records if subject_split(r["subject"], 0.25) == "train"]
    held = [r for r in records if subject_split(r["subject"], 0.25) != "train"]
    world = {"knowledge": knowledge}
    cfg = tiny_config(
        d / "base",
        d / "bank.parquet",
        world,
        d / "run",
        "training.epochs=8",
        "training.learning_rate=5e-3",
        "training.batch_size=8",
        "training.torch_threads=2",
        "training.absent_rate=0.3",
        "training.open_answer_share=0",
    )
    train_loop_per_worker({"config": asdict(cfg), "train_rows": train})
    return cfg, d / "run" / "sft_latest", AutoTokenizer.from_pretrained(d / "base"), held, rows, facts


def _answers(cfg, weights, tokenizer, held, bank_rows, exclusion=True):
    """The option each held-out question gets from a model over bank_rows."""
    bank = MemoryBank.build(bank_rows, tokenizer, cfg.model.knowledge_length)
    _, model = build_model(cfg, adapter=str(weights) if weights else None, bank=bank)
    model.settings.exclusion = exclusion  # False: the trained reader with its exclusion's write cut
    scored = score_questions(model, tokenizer, [record_question(r) for r in held], cfg.model.max_seq_len)
    return [r["options"][s.index] for r, s in zip(held, scored)]


def test_which_fact_and_the_other_fact_ruled_out(two_facts):
    cfg, weights, tokenizer, held, rows, facts = two_facts
    other = {f["uuid"]: f["other"] for f in facts}
    assert len(held) >= 60 and all(other[r["uuid"]] in r["options"] for r in held)
    right = [r["options"][r["answer_index"]] for r in held]
    both = _answers(cfg, weights, tokenizer, held, rows)
    which = sum(a == b for a, b in zip(both, right)) / len(held)

    # Each question with its own row gone: only the subject's other fact is left (a bank per relation
    # asked, without the held-out rows of that relation).
    absent = {}
    for name, w, x in (("trained", weights, True), ("no_exclusion", weights, False), ("untrained", "", True)):
        named = 0
        for rel in ("born", "died"):
            asked = [r for r in held if r["predicate"] == rel]
            gone = {r["uuid"] for r in asked}
            answers = _answers(cfg, w, tokenizer, asked, [row for row in rows if row["uuid"] not in gone], x)
            named += sum(a == other[r["uuid"]] for a, r in zip(answers, asked))
        absent[name] = named / len(held)
    # And the reverse: only the asked fact in the bank, its subject's other fact gone. Nothing is
    # left to rule out, and the exclusion must not rule out the answer itself.
    alone = 0
    for rel in ("born", "died"):
        asked = [r for r in held if r["predicate"] == rel]
        others = {r["uuid"] for r in held if r["predicate"] != rel}
        answers = _answers(cfg, weights, tokenizer, asked, [row for row in rows if row["uuid"] not in others])
        alone += sum(a == r["options"][r["answer_index"]] for a, r in zip(answers, asked))
    alone /= len(held)
    print(json.dumps({"which_fact": which, "alone": alone, "absent_named_other": absent}))
    assert which > 0.9
    assert alone > 0.9
    assert absent["untrained"] > 0.1  # the backbone alone picks it about one time in four
    assert absent["trained"] < 0.08 < absent["untrained"] - 0.1
    assert absent["no_exclusion"] > absent["trained"] + 0.1  # the exclusion is what rules it out
