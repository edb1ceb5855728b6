"""Question sets that only a reader passes, built from (subject, relation, object) facts.

A word-matching rule finds a row naming the question's subject and answers with the option that row
names. These sets ask what it cannot do:
- **which fact** (`second_fact`): the bank also holds a fact about the subject in another relation of
  the same kind ("X died in Toronto." beside "X was born in Ulm."), whose object is an object of the
  question's relation that is not true of the subject, and is one of the options;
- **absent**: only that second fact is in the bank;
- **other names** (`last_names`): a person asked by a last name no other subject shares;
- **edits** (`new_object`): the sentence edited to an object that is not among the options, the
  question asked again with that object in place of a distractor.
Training uses the same constructions on its own subjects (hard negatives, name variants); the
evaluation's subjects, wordings and second facts are never seen in training.

Relations are of the same kind when their objects are the same kind of thing: a Wikidata property's
value type where it is listed here (places, people, languages, ...), else a large share of shared
objects in the data. Every choice is a hash of a key, so the same facts give the same sets.

A fact is a dict with "uuid", "subject", "predicate_id", "object", "sentence" and "target" (the OMCQ
question: "question", "options", "correct_answer").
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from explicitlm.data import LABELS, format_options, parse_options

# Wikidata properties by the kind of their values.
VALUE_KINDS = {
    "place": ("P19", "P20", "P937", "P740", "P159", "P131", "P276", "P36", "P190", "P47", "P1376"),
    "country": ("P17", "P27", "P495", "P1001"),
    "language": ("P103", "P1412", "P37", "P364", "P407"),
    "person": ("P50", "P170", "P175", "P112", "P26", "P40", "P57", "P86", "P162", "P58", "P161"),
    "organisation": ("P108", "P69", "P127", "P176", "P178", "P449", "P264", "P463", "P102", "P54"),
    "role": ("P106", "P39", "P101"),
    "class": ("P31", "P279", "P361"),
}
# Properties whose subjects are people: their subjects can be asked by a last name.
PERSON_SUBJECTS = frozenset(
    ("P19", "P20", "P26", "P27", "P39", "P40", "P69", "P103", "P106", "P108", "P413", "P1303", "P1412", "P937")
)
_NAME_WORD = re.compile(r"^[A-Z][a-z'\-]{2,}$")
_NOT_SURNAMES = frozenset(("Jr", "Sr", "II", "III", "IV", "The", "Of", "De", "Van", "Von"))


def pick(key: str, n: int) -> int:
    """A choice among n that depends only on key (not on Python's per-process hash salt)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n


def worded(template: str, subject: str, obj: str = "") -> str:
    """A template with {s} (and {o}) filled, its first letter capitalised."""
    text = template.format(s=subject, o=obj)
    return text[0].upper() + text[1:]


def relation_kinds(facts: list[dict[str, Any]], min_shared: float = 0.5) -> dict[str, list[str]]:
    """Each relation -> the other relations whose objects are the same kind of thing, in a fixed order."""
    objects: dict[str, set[str]] = defaultdict(set)
    for f in facts:
        objects[f["predicate_id"]].add(f["object"])
    kind = {p: k for k, props in VALUE_KINDS.items() for p in props}
    out: dict[str, list[str]] = {}
    for r in sorted(objects):
        if r in kind:
            same = [o for o in sorted(objects) if o != r and kind.get(o) == kind[r]]
        else:
            same = [
                o
                for o in sorted(objects)
                if o != r and len(objects[r] & objects[o]) / max(min(len(objects[r]), len(objects[o])), 1) >= min_shared
            ]
        out[r] = same
    return out


def true_objects(facts: Iterable[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(subject, relation) -> every object the data gives for it."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for f in facts:
        out[(f["subject"], f["predicate_id"])].add(f["object"])
    return out


def objects_by_relation(facts: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for f in facts:
        key = (f["predicate_id"], f["object"])
        if key not in seen:
            seen.add(key)
            out[f["predicate_id"]].append(f["object"])
    return out


def options_of(fact: dict[str, Any]) -> tuple[list[str], int]:
    """The fact's question options and the index of its answer."""
    _, texts = parse_options(fact["target"]["options"])
    answer = fact["target"]["correct_answer"].split(":", 1)[1].strip()
    return texts, texts.index(answer)


def with_option(fact: dict[str, Any], new: str, key: str) -> dict[str, Any]:
    """The fact's OMCQ target with `new` in place of one distractor (the answer stays)."""
    texts, answer = options_of(fact)
    if new in texts:
        return dict(fact["target"])
    wrong = [i for i in range(len(texts)) if i != answer]
    texts = list(texts)
    texts[wrong[pick(key, len(wrong))]] = new
    return dict(fact["target"], options=format_options(texts), correct_answer=f"{LABELS[answer]}:{texts[answer]}")


def _object_for(
    fact: dict[str, Any],
    objects: dict[str, list[str]],
    truth: dict[tuple[str, str], set[str]],
    avoid: set[str],
    key: str,
) -> str | None:
    """An object of the fact's relation that is not true of its subject and not in `avoid`."""
    true = truth.get((fact["subject"], fact["predicate_id"]), set()) | {fact["object"]}
    pool = [o for o in objects.get(fact["predicate_id"], []) if o not in true and o not in avoid]
    return pool[pick(key, len(pool))] if pool else None


def second_fact(
    fact: dict[str, Any],
    kinds: dict[str, list[str]],
    objects: dict[str, list[str]],
    truth: dict[tuple[str, str], set[str]],
    sentences: dict[str, str],
) -> dict[str, Any] | None:
    """Another fact about the fact's subject, in a relation of the same kind, naming o': an object of
    the fact's relation that is not true of the subject. `sentences` maps a relation to its sentence
    template ("{s} died in {o}."). Returns {"uuid", "text", "object", "predicate_id"} or None."""
    others = [r for r in kinds.get(fact["predicate_id"], []) if r in sentences]
    if not others:
        return None
    r2 = others[pick("relation:" + fact["uuid"], len(others))]
    texts, _ = options_of(fact)
    o2 = _object_for(fact, objects, truth, set(texts), "second:" + fact["uuid"])
    if o2 is None or o2 in truth.get((fact["subject"], r2), set()):
        return None
    return {
        "uuid": f"{fact['uuid']}~{r2}",
        "text": worded(sentences[r2], fact["subject"], o2),
        "object": o2,
        "predicate_id": r2,
    }


def new_object(
    fact: dict[str, Any], objects: dict[str, list[str]], truth: dict[tuple[str, str], set[str]]
) -> tuple[str, str] | None:
    """The fact's sentence edited to another object of its relation that is not among its options
    and not true of its subject: (new sentence, new object), or None when the sentence does not name
    its object."""
    if fact["object"] not in fact["sentence"]:
        return None
    texts, _ = options_of(fact)
    new = _object_for(fact, objects, truth, set(texts), "edit:" + fact["uuid"])
    if new is None:
        return None
    return fact["sentence"].replace(fact["object"], new), new


def last_name(subject: str) -> str | None:
    """A person's last name, when the label looks like a personal name of two words or more."""
    words = subject.split()
    if len(words) < 2 or not all(w[:1].isupper() for w in words):
        return None
    last = words[-1].rstrip(".,")
    return last if _NAME_WORD.match(last) and last not in _NOT_SURNAMES else None


def last_names(facts: list[dict[str, Any]]) -> dict[str, str]:
    """Person subjects -> their last name, where no other subject in the data has that word in its
    name (so the last name alone names the subject)."""
    people = {f["subject"] for f in facts if f["predicate_id"] in PERSON_SUBJECTS}
    words: dict[str, set[str]] = defaultdict(set)
    for subject in {f["subject"] for f in facts}:
        for w in re.findall(r"[\w'\-]+", subject):
            words[w.casefold()].add(subject)
    out = {}
    for s in sorted(people):
        name = last_name(s)
        if name is not None and words.get(name.casefold()) == {s}:
            out[s] = name
    return out


def load_pack(pack: str | Path) -> list[dict[str, Any]]:
    """A fact pack folder (`omcq_train.json`, `knowledge_train.jsonl`, `triples_train.jsonl`, linked by
    uuid) -> one fact per uuid that has all three: its triple, sentence and OMCQ question."""
    import json

    from explicitlm.readers import read_knowledge

    pack = Path(pack)
    sentences = {r["uuid"]: r["text"] for r in read_knowledge(pack / "knowledge_train.jsonl")}
    targets = {item["target"][0]["uuid"]: item["target"][0] for item in json.load(open(pack / "omcq_train.json"))}
    facts = []
    for line in open(pack / "triples_train.jsonl", encoding="utf-8"):
        t = json.loads(line)
        if t["uuid"] in sentences and t["uuid"] in targets:
            facts.append({**t, "sentence": sentences[t["uuid"]], "target": targets[t["uuid"]]})
    return facts


def load_wordings(path: str | Path) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """A wordings file -> (relation -> its wordings, the test wordings' names).

    A JSON object: each relation's id -> {"pack_question": the pack's own wording as a template,
    "train": [templates training may use], "test": {name: template} or [templates]}; templates hold
    {s} where the subject goes; keys starting with "_" are notes. A list of test templates is named
    test_1, test_2, ...; the names scored are those every relation has, in the first relation's order.
    A file that does not fit is a `UserError` naming the relation and what it lacks."""
    import json

    from explicitlm.errors import UserError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"wordings file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"wordings file {path}: expected a JSON object of relation -> wordings")
    out: dict[str, dict[str, Any]] = {}
    for r, w in raw.items():
        if r.startswith("_"):
            continue
        test = w.get("test") if isinstance(w, dict) else None
        if isinstance(test, list):
            test = {f"test_{i + 1}": t for i, t in enumerate(test)}
        if not isinstance(test, dict) or not test:
            raise UserError(f"wordings file {path}: relation {r!r} has no test wordings (a 'test' object or list)")
        if "pack" in test:
            raise UserError(
                f"wordings file {path}: relation {r!r}: 'pack' names the pack's own wording, not a test one"
            )
        if not isinstance(w.get("train", []), list):
            raise UserError(f"wordings file {path}: relation {r!r}: 'train' must be a list of templates")
        if "pack_question" not in w:
            raise UserError(
                f"wordings file {path}: relation {r!r} has no 'pack_question' (its question as the pack asks it)"
            )
        templates = [w["pack_question"], *w.get("train", []), *test.values()]
        for t in templates:
            if not isinstance(t, str) or "{s}" not in t:
                raise UserError(f"wordings file {path}: relation {r!r}: template {t!r} has no {{s}} for the subject")
            try:  # a question names its subject, never its answer: {s} is the only field
                t.format(s="x")
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(
                    f"wordings file {path}: relation {r!r}: template {t!r} has a field other than {{s}} "
                    f"({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}"
                ) from None
        out[r] = {**w, "test": test}
    if not out:
        raise UserError(f"wordings file {path}: no relations")
    first = next(iter(out.values()))["test"]
    forms = tuple(name for name in first if all(name in w["test"] for w in out.values()))
    if not forms:
        raise UserError(f"wordings file {path}: no test wording name is shared by every relation")
    return out, forms


def repaired_sentences(train: list[dict[str, Any]], n: int) -> list[dict[str, str]]:
    """n sentences re-pairing the facts' subjects with other objects of the same relation (a bank's
    filler: sentences like the real ones, about no subject a question asks)."""
    objects: dict[str, list[str]] = {}
    for f in train:
        objects.setdefault(f["predicate_id"], [])
        if f["object"] not in objects[f["predicate_id"]]:
            objects[f["predicate_id"]].append(f["object"])
    usable = [f for f in train if f["object"] in f["sentence"] and len(objects[f["predicate_id"]]) > 1]
    out, k = [], 0
    while len(out) < n:
        for f in usable:
            others = objects[f["predicate_id"]]
            other = others[(others.index(f["object"]) + 1 + k) % len(others)]
            if other != f["object"]:
                out.append({"uuid": f"x{len(out)}", "text": f["sentence"].replace(f["object"], other)})
                if len(out) == n:
                    break
        k += 1
    return out
