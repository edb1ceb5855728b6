"""The harder sets' construction (which fact, absent, other names, edits without the crutch), the
baselines they are measured against, and how open answers are judged: on a handmade pack."""

from explicitlm import factsets as fs
from explicitlm.baselines import BM25Reader, WordRule
from explicitlm.data import parse_options
from explicitlm.evaluation import exact_match, normalize_answer, token_f1

SENTENCES = {
    "P19": "{s} was born in {o}.",
    "P20": "{s} died in {o}.",
    "P17": "{s} is in {o}.",
    "P27": "{s} is a citizen of {o}.",
}


def _fact(uuid, subject, rel, obj, options):
    sentence = SENTENCES[rel].format(s=subject, o=obj)
    texts = ",".join(f"{'ABCD'[i]}:{o}" for i, o in enumerate(options))
    target = {
        "question": f"Q about {subject}?",
        "options": texts,
        "correct_answer": f"{'ABCD'[options.index(obj)]}:{obj}",
    }
    return {
        "uuid": uuid,
        "subject": subject,
        "predicate_id": rel,
        "predicate": rel,
        "object": obj,
        "sentence": sentence,
        "target": target,
    }


FACTS = [
    _fact("u1", "Ada Quillfeather", "P19", "Ulm", ["Ulm", "Paris", "Rome", "Oslo"]),
    _fact("u2", "Ada Quillfeather", "P20", "Paris", ["Paris", "Ulm", "Lima", "Oslo"]),
    _fact("u3", "Bo Smith", "P19", "Lima", ["Lima", "Rome", "Kyiv", "Ulm"]),
    _fact("u4", "Cy Smith", "P19", "Kyiv", ["Kyiv", "Oslo", "Paris", "Lima"]),
    _fact("u5", "Rome", "P17", "Italy", ["Italy", "Peru", "Norway", "France"]),
    _fact("u6", "Dee Varga", "P20", "Oslo", ["Oslo", "Rome", "Ulm", "Kyiv"]),
    _fact("u7", "Dee Varga", "P27", "Norway", ["Norway", "Italy", "Peru", "France"]),
]


def test_relations_of_the_same_kind_share_what_their_objects_are():
    kinds = fs.relation_kinds(FACTS)
    assert kinds["P19"] == ["P20"] and kinds["P20"] == ["P19"]  # places
    assert kinds["P17"] == ["P27"] and kinds["P27"] == ["P17"]  # countries
    # A relation the table does not know is paired by the objects it shares in the data.
    extra = FACTS + [_fact("u8", "Zed", "P19", "Ulm", ["Ulm", "Rome", "Oslo", "Lima"])]
    for f in extra[-1:]:
        f["predicate_id"] = "P9999"
    assert "P19" in fs.relation_kinds(extra)["P9999"]


def test_a_second_fact_names_an_object_of_the_question_s_relation_untrue_of_the_subject():
    kinds, objects, truth = fs.relation_kinds(FACTS), fs.objects_by_relation(FACTS), fs.true_objects(FACTS)
    for f in FACTS:
        second = fs.second_fact(f, kinds, objects, truth, SENTENCES)
        if second is None:
            continue
        other = second["predicate_id"]
        assert other in kinds[f["predicate_id"]] and other != f["predicate_id"]
        o2 = second["object"]
        assert o2 in objects[f["predicate_id"]] and o2 not in truth[(f["subject"], f["predicate_id"])]
        assert o2 not in truth.get((f["subject"], other), set())  # not true in its own relation either
        assert second["text"] == SENTENCES[other].format(s=f["subject"], o=o2)
        asked = fs.with_option(f, o2, "k")
        _, texts = parse_options(asked["options"])
        answer = asked["correct_answer"].split(":", 1)[1]
        assert o2 in texts and answer == f["object"] and len(texts) == 4  # o' replaced a distractor
    again = [fs.second_fact(f, kinds, objects, truth, SENTENCES) for f in FACTS]
    assert again == [fs.second_fact(f, kinds, objects, truth, SENTENCES) for f in FACTS]  # the same every run
    assert sum(s is not None for s in again) >= 3


def test_last_names_only_where_no_other_subject_shares_the_word():
    names = fs.last_names(FACTS)
    assert names == {"Ada Quillfeather": "Quillfeather", "Dee Varga": "Varga"}  # two Smiths: neither
    assert fs.last_name("Rome") is None and fs.last_name("John Smith Jr") is None


def test_an_edit_without_the_crutch_names_an_object_that_no_option_names():
    objects, truth = fs.objects_by_relation(FACTS), fs.true_objects(FACTS)
    edited = fs.new_object(FACTS[0], objects, truth)
    assert edited is not None
    text, new = edited
    assert new not in parse_options(FACTS[0]["target"]["options"])[1] and text == f"Ada Quillfeather was born in {new}."


def test_the_word_rule_reads_the_options_and_bm25_reads_the_best_row():
    rows = [f["sentence"] for f in FACTS]
    rule = WordRule(rows)
    assert rule.answer("Where was Ada Quillfeather born?", ["Paris", "Ulm", "Rome"], "k") == (1, True)
    # No row covers the question well enough: a guess, and not from memory.
    assert rule.answer("Where was Ed Nobody born?", ["Paris", "Ulm"], "k")[1] is False
    bm25 = BM25Reader(rows)
    assert bm25.top(["Where did Dee Varga die?"]) == [5]
    assert bm25.answers(["Where did Dee Varga die?"], [["Rome", "Oslo"]], ["k"]) == [(1, True)]
    assert bm25.open_answers(["Where did Dee Varga die?"]) == ["Oslo"]


def test_open_answers_are_judged_after_normalisation():
    assert normalize_answer("  The Hague! ") == "hague"
    assert exact_match("São Paulo", "sao paulo") and exact_match("the Beatles", "Beatles")
    assert not exact_match("Paris, Texas", "Paris")
    assert token_f1("United States", "United States of America") == 2 * (1.0 * 0.5) / 1.5
    assert token_f1("", "Paris") == 0.0 and token_f1("Paris", "Paris") == 1.0


def test_a_question_s_cue_counts_the_words_that_tell_its_fact_from_the_other():
    """quality.py's split of (a, b), (f), (g) and the open sets: words of the fact's sentence that the
    second fact's lacks, and words only training's questions of the fact's relation use, count for
    it; the same the other way count against; as the reader sees words (stemmed), the subject's own
    words left out."""
    from benchmarks.quality import Facts

    wordings = {
        "P19": {"pack_question": "Where was {s} born?", "pack_sentence": SENTENCES["P19"], "train": []},
        "P20": {"pack_question": "Where did {s} die?", "pack_sentence": SENTENCES["P20"], "train": []},
    }
    extra = {"P19": {"questions": ["What is the birthplace of {s}?"]}, "P20": {"clozes": ["{s} passed away in ____."]}}
    world = Facts(FACTS, wordings, extra)
    assert world.pool("P20") == ["Where did {s} die?", "{s} passed away in ____."]
    fact = FACTS[0]  # Ada Quillfeather was born in Ulm.
    second = {"text": "Ada Quillfeather died in Rome.", "predicate_id": "P20"}
    assert world.cue(fact, second, "Which town was the birthplace of Ada Quillfeather?") == 1  # "was", "birthplace"
    assert world.cue(fact, second, "Where did Ada Quillfeather pass away?") == -1  # "did", "passes": P20's
    assert world.cue(fact, second, "Tell me where Ada Quillfeather's life began.") == 0  # no such word
    assert world.cue(fact, second, "Did Ada Quillfeather have a birthplace?") == 0  # one each way
    assert world.cue(fact, second, "Ulm, for Ada Quillfeather?") == 1  # a word of its sentence alone
    # The subject's own words are not the question's: "Passing" in a name is no cue to P20's "passed".
    passing = dict(fact, subject="Passing Smith", sentence="Passing Smith was born in Ulm.")
    other = {"text": "Passing Smith died in Rome.", "predicate_id": "P20"}
    assert world.cue(passing, other, "Tell me about Passing Smith.") == 0


def test_a_wordings_file_gives_its_own_test_wordings_and_a_bad_one_a_clear_error(tmp_path, capsys):
    """quality.py and memory.py ask in the test wordings a file names (a list is named test_1, ...; the
    names scored are those every relation has); a file that does not fit stops with one line naming
    the relation and what it lacks, before anything is trained."""
    import json

    from benchmarks.quality import Facts
    from benchmarks.quality import main as quality_main
    from explicitlm.cli import command
    from explicitlm.errors import UserError

    def write(obj):
        path = tmp_path / "wordings.json"
        path.write_text(json.dumps(obj))
        return path

    listed = {
        "_meta": {"note": "skipped"},
        "P19": {"pack_question": "Where was {s} born?", "test": ["{s} was born in ____.", "Name {s}'s birthplace."]},
        "P20": {
            "pack_question": "Where did {s} die?",
            "test": ["{s} died in ____.", "Where did {s} pass away?", "x {s}"],
        },
    }
    wordings, forms = fs.load_wordings(write(listed))
    assert forms == ("test_1", "test_2") and set(wordings) == {"P19", "P20"}
    world = Facts(FACTS, wordings, {})
    assert world.asked(FACTS[0], "test_2") == "Name Ada Quillfeather's birthplace."

    named = {
        "P19": {"pack_question": "Q {s}?", "test": {"cloze": "{s} ____.", "other": "O {s}?"}},
        "P20": {"pack_question": "Q {s}?", "test": {"other": "P {s}?", "cloze": "{s} _."}},
    }
    assert fs.load_wordings(write(named))[1] == ("cloze", "other")  # the first relation's order

    bad = {
        "no {s}": (
            {"P19": {"pack_question": "Where was he born?", "test": ["{s} ____."]}},
            "'Where was he born?' has no {s}",
        ),
        "no test": ({"P19": {"pack_question": "Q {s}?"}}, "relation 'P19' has no test wordings"),
        "no pack question": ({"P19": {"test": ["{s} ____."]}}, "relation 'P19' has no 'pack_question'"),
        "no shared name": (
            {
                "P19": {"pack_question": "Q {s}?", "test": {"a": "{s}"}},
                "P20": {"pack_question": "Q {s}?", "test": {"b": "{s}"}},
            },
            "no test wording name is shared by every relation",
        ),
    }
    for case, (obj, message) in bad.items():
        try:
            fs.load_wordings(write(obj))
        except UserError as e:
            assert message in str(e), case
        else:
            raise AssertionError(f"{case}: accepted")
    # As a command: one line, exit code 2, nothing trained (a pack folder with its triples is enough to get there).
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "triples_train.jsonl").write_text("")
    argv = ["--pack", str(tmp_path / "pack"), "--wordings", str(write(bad["no test"][0])), "--out", str(tmp_path / "q")]
    assert command("quality.py", quality_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quality.py: error: wordings file") and "no test wordings" in err[0]
    assert not (tmp_path / "q" / "train.json").exists()
