import json
from collections import Counter

from explicitlm.data import parse_options
from explicitlm.split import subject_split
from explicitlm.world import Fact, geography_facts, make_questions, write_world


def test_sample_world_is_real_and_large_enough():
    facts = geography_facts()
    assert 3000 <= len(facts) <= 6000
    by = {(f.subject, f.predicate): f.object for f in facts}
    assert by[("France", "capital")] == "Paris"
    assert by[("Japan", "continent")] == "Asia"
    assert len({f.predicate for f in facts}) >= 5


def test_questions_reference_format_and_no_true_distractor(world):
    items = json.load(open(world["omcq"]))
    knowledge = {json.loads(line)["uuid"]: json.loads(line) for line in open(world["knowledge"])}
    true = {(k["subject"], k["predicate"], k["object"]) for k in knowledge.values()}
    assert isinstance(items, list) and len(items) > 300
    for item in items:
        (t,) = item["target"]
        assert set(t) >= {"question", "options", "correct_answer", "uuid"}
        labels, texts = parse_options(t["options"])
        letter, answer = t["correct_answer"].split(":", 1)
        assert texts[labels.index(letter)] == answer
        row = knowledge[t["uuid"]]
        assert row["object"] == answer and answer in row["text"]
        for label, text in zip(labels, texts):
            if label != letter:
                assert (row["subject"], row["predicate"], text) not in true


def test_generator_deterministic_and_letters_uniform(tmp_path):
    a = write_world(tmp_path / "a", seed=1, max_facts=800)
    b = write_world(tmp_path / "b", seed=1, max_facts=800)
    assert open(a["omcq"], "rb").read() == open(b["omcq"], "rb").read()
    assert open(a["knowledge"], "rb").read() == open(b["knowledge"], "rb").read()
    letters = Counter(item["target"][0]["correct_answer"][0] for item in json.load(open(a["omcq"])))
    assert set(letters) == set("ABCD")
    assert min(letters.values()) > 0.15 * sum(letters.values())


def test_three_to_five_options():
    facts = geography_facts()[:600]
    qs = make_questions(facts, seed=0, min_options=3, max_options=5)
    sizes = Counter(len(parse_options(q["options"])[0]) for q in qs)
    assert set(sizes) == {3, 4, 5}


def test_split_by_subject_is_deterministic_and_whole():
    facts = [Fact(f"S{i}", p, "x") for i in range(200) for p in ("a", "b")]
    sides = {(f.subject, f.predicate): subject_split(f.subject, 0.2) for f in facts}
    assert all(sides[(f"S{i}", "a")] == sides[(f"S{i}", "b")] for i in range(200))
    share = sum(v == "val" for v in sides.values()) / len(sides)
    assert 0.1 < share < 0.3
