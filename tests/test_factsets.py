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


def _pack(folder, facts):
    """A fact pack folder holding `facts` (load_pack's three files)."""
    import json

    folder.mkdir()
    keys = ("uuid", "subject", "predicate_id", "predicate", "object")
    (folder / "triples_train.jsonl").write_text("".join(json.dumps({k: f[k] for k in keys}) + "\n" for f in facts))
    (folder / "knowledge_train.jsonl").write_text(
        "".join(json.dumps({"uuid": f["uuid"], "text": f["sentence"]}) + "\n" for f in facts)
    )
    (folder / "omcq_train.json").write_text(
        json.dumps([{"target": [dict(f["target"], uuid=f["uuid"])]} for f in facts])
    )
    return folder


def test_a_wordings_file_names_its_own_test_wordings_and_every_benchmark_asks_in_them(tmp_path):
    """quality.py, memory.py and edits.py ask in the test wordings a file names: a list is named
    test_1, ...; the names asked are those every relation has, in the first relation's order."""
    import json
    from types import SimpleNamespace

    from benchmarks.edits import edit_set
    from benchmarks.memory import questions_and_bank
    from benchmarks.quality import Facts

    listed = {
        "_meta": {"note": "skipped"},
        "P19": {"pack_question": "Where was {s} born?", "test": ["{s} was born in ____.", "Name {s}'s birthplace."]},
        "P20": {
            "pack_question": "Where did {s} die?",
            "test": ["{s} died in ____.", "Where did {s} pass away?", "x {s}"],
        },
    }
    path = tmp_path / "listed.json"
    path.write_text(json.dumps(listed))
    wordings, forms = fs.load_wordings(path)
    assert forms == ("test_1", "test_2") and set(wordings) == {"P19", "P20"}
    assert Facts(FACTS, wordings, {}).asked(FACTS[0], "test_2") == "Name Ada Quillfeather's birthplace."

    # Names that differ between relations: only the shared one is asked, by every benchmark.
    named = {
        "P19": {"pack_question": "Where was {s} born?", "test": {"cloze": "{s} was born in ____.", "p19": "B {s}?"}},
        "P20": {"pack_question": "Where did {s} die?", "test": {"p20": "D {s}?", "cloze": "{s} died in ____."}},
    }
    path = tmp_path / "named.json"
    path.write_text(json.dumps(named))
    wordings, forms = fs.load_wordings(path)
    assert forms == ("cloze",)
    pack = _pack(tmp_path / "pack", FACTS)
    args = SimpleNamespace(pack=pack, wordings=path, split="train", facts=10, rows=len(FACTS) + 4)
    questions, uuids, rows, train, asked_in = questions_and_bank(args)
    worded = [f for f in FACTS if f["predicate_id"] in named]
    assert asked_in == ("pack", "cloze") and len(questions) == len(uuids) == 2 * len(train)
    assert set(uuids) <= {f["uuid"] for f in worded} and len(rows) == len(FACTS) + 4
    assert {q for q in questions if "____" in q} == {
        named[f["predicate_id"]]["test"]["cloze"].format(s=f["subject"]) for f in train
    }
    edits, locality = edit_set(pack, wordings, forms, {f["uuid"]: f["sentence"] for f in FACTS}, 1)
    assert edits and all(set(e["wordings"]) == {"cloze"} for e in edits)
    assert {e["uuid"] for e in edits} | {r["uuid"] for r in locality} <= {f["uuid"] for f in worded}


def test_a_wordings_file_that_does_not_fit_stops_with_one_line_before_anything_runs(tmp_path, capsys):
    """Each way a wordings file can be wrong is a UserError naming the relation and what it lacks; as
    the benchmark's command, one line on stderr and exit code 2, before any training."""
    import json

    from benchmarks.quality import main as quality_main
    from explicitlm.cli import command
    from explicitlm.errors import UserError

    path = tmp_path / "wordings.json"
    ok = {"pack_question": "Q {s}?", "test": ["{s} ____."]}
    bad = {
        "no {s}": ({"P19": dict(ok, pack_question="Where was he born?")}, "'Where was he born?' has no {s}"),
        "another field": ({"P19": dict(ok, test=["{s} died in {o}."])}, "has a field other than {s}"),
        "a stray brace": ({"P19": dict(ok, train=["{s} {"])}, "has a field other than {s}"),
        "train not a list": ({"P19": dict(ok, train="{s}?")}, "'train' must be a list"),
        "no test": ({"P19": {"pack_question": "Q {s}?"}}, "relation 'P19' has no test wordings"),
        "a test named pack": ({"P19": dict(ok, test={"pack": "{s}"})}, "'pack' names the pack's own wording"),
        "no pack question": ({"P19": {"test": ["{s} ____."]}}, "relation 'P19' has no 'pack_question'"),
        "no shared name": (
            {"P19": dict(ok, test={"a": "{s}"}), "P20": dict(ok, test={"b": "{s}"})},
            "no test wording name is shared by every relation",
        ),
        "not an object": ([ok], "expected a JSON object"),
        "not JSON": ("{", "wordings file"),
    }
    for case, (obj, message) in bad.items():
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        try:
            fs.load_wordings(path)
        except UserError as e:
            assert message in str(e), (case, str(e))
        else:
            raise AssertionError(f"{case}: accepted")
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "triples_train.jsonl").write_text("")
    path.write_text(json.dumps(bad["no test"][0]))
    argv = ["--pack", str(tmp_path / "pack"), "--wordings", str(path), "--out", str(tmp_path / "q")]
    assert command("quality.py", quality_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quality.py: error: wordings file") and "no test wordings" in err[0]
    assert not (tmp_path / "q").exists()  # stopped before its output folder was made


def test_pairs_counts_the_answers_naming_the_second_fact_s_object_by_how_often_training_met_the_pair(tmp_path, capsys):
    """benchmarks/pairs.py: each (g) question's pair of relations, the share of answers naming o' and
    how many training facts had a second fact in that pair; a folder of another pack is refused."""
    import json

    from benchmarks.pairs import main as pairs_main
    from benchmarks.quality import Facts
    from explicitlm.cli import command
    from explicitlm.split import subject_side

    wordings = {r: {"pack_question": "Q {s}?", "pack_sentence": t, "test": ["{s} ____."]} for r, t in SENTENCES.items()}
    (tmp_path / "w.json").write_text(json.dumps(wordings))
    pack = _pack(tmp_path / "pack", FACTS)
    world = Facts(FACTS, wordings, {})
    asked = [(f, s) for f in FACTS if (s := world.second(f)) is not None]
    assert len(asked) >= 3
    (tmp_path / "q" / "answers").mkdir(parents=True)
    with open(tmp_path / "q" / "answers" / "g.jsonl", "w") as fh:
        for k, (f, s) in enumerate(asked):  # the first question's answer names o', the others do not
            options = [s["object"], "Nowhere"]
            fh.write(json.dumps({"uuid": f["uuid"], "options": options, "model": 0 if k == 0 else 1}) + "\n")
    argv = ["--out", str(tmp_path / "q"), "--pack", str(pack), "--wordings", str(tmp_path / "w.json")]
    assert command("pairs.py", pairs_main, argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"] == len(asked) and result["named"] == round(1 / len(asked), 3)
    trained = {}
    for f in FACTS:
        if subject_side(f["subject"], {"test": 0.15, "dev": 0.15}) == "train" and (s := world.second(f)):
            trained[f["predicate_id"], s["predicate_id"]] = trained.get((f["predicate_id"], s["predicate_id"]), 0) + 1
    count = trained.get((asked[0][0]["predicate_id"], asked[0][1]["predicate_id"]), 0)
    bucket = next(k for k, v in result["by_training_count"].items() if v["questions"] and v["named"])
    lo, _, hi = bucket.rstrip("+").partition("-")
    assert int(lo) <= count and (not hi or count <= int(hi))
    assert sum(v["questions"] for v in result["by_training_count"].values()) == len(asked)
    # Answers saved from another pack: one line, exit code 2.
    other = _pack(tmp_path / "other", FACTS[:1])
    assert (
        command(
            "pairs.py",
            pairs_main,
            ["--out", str(tmp_path / "q"), "--pack", str(other), "--wordings", str(tmp_path / "w.json")],
        )
        == 2
    )
    assert "does not fit this pack" in capsys.readouterr().err


def test_quality_s_backbone_option_refuses_a_folder_that_is_not_one_before_any_work(tmp_path, capsys):
    """`quality.py --backbone DIR` trains and scores on a given Qwen3 folder instead of the tiny one:
    a folder without a config, or one asked to be pretrained further, stops with one line, exit 2."""
    from benchmarks.quality import main as quality_main
    from explicitlm.cli import command

    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "triples_train.jsonl").write_text("")
    (tmp_path / "qwen").mkdir()
    common = ["--pack", str(tmp_path / "pack"), "--out", str(tmp_path / "q")]
    assert command("quality.py", quality_main, [*common, "--backbone", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"model folder {tmp_path / 'nope'} does not exist" in err and "set --backbone to a local Qwen3 folder" in err
    assert command("quality.py", quality_main, [*common, "--backbone", str(tmp_path / "qwen")]) == 2
    assert f"{tmp_path / 'qwen'} is not a model folder (no config.json)" in capsys.readouterr().err
    (tmp_path / "qwen" / "config.json").write_text("{}")
    argv = [*common, "--backbone", str(tmp_path / "qwen"), "--pretrain-base", "10"]
    assert command("quality.py", quality_main, argv) == 2
    assert "a given backbone is not trained further" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
