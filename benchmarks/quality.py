"""Does it learn what only a reader can do? The open protocol on real facts, beside the baselines.

    python benchmarks/quality.py --split dev     # tune here
    python benchmarks/quality.py --split test    # report once

On a fact pack (`omcq_train.json`, `knowledge_train.jsonl`, `triples_train.jsonl`, linked by uuid;
the shared real-fact pack by default); skips cleanly when the pack is absent.
1. Split by subject (`explicitlm.split`): train 70%, dev 15%, test 15%.
2. Train on the training subjects only: a tokenizer trained on their text; a bank of their sentences
   plus, for each, a second fact about its subject in a relation of the same kind (a hard negative,
   `explicitlm.factsets.second_fact`), whose object replaces a distractor of its question; each
   question in one wording drawn from the pack's, the wordings file's `train` ones and
   `--train-wordings` (`--wordings-per-fact` of them per fact), a person sometimes by last name;
   converted with `ray_jobs/convert.py`, trained with `ray_jobs/sft.py` (half the questions without
   options, `training.open_answer_share`).
3. Evaluate the held-out split, its sentences added to the bank after training, no retraining, in
   the pack's wording and in the wordings file's `test` wordings (never used in training):
   (a) accuracy and recall@1 in the pack's wording; (b) the same in the test wordings; both also on
   the facts whose sentences are longer than 16 tokens (the default model.knowledge_length);
   (c) its sentences absent; (d) each edited to name another option, answers that follow, and
   training-subject answers that change; (e) a bank of 2^20 rows (distractors re-pairing training
   subjects with other objects of their relation), built in a process of its own, loaded from its
   files, then (a) again;
   (f) which fact: a second fact about the subject in a relation of the same kind, naming o', an
   object of the question's relation not true of the subject, which replaces a distractor;
   (g) absent: only that second fact in the bank; answers that name o' (all, and those the system
   gave from memory);
   (h) other names: people asked by a last name no other subject shares;
   (i) edits without the crutch: each sentence edited to an object not among the options, asked
   again with that object in place of a distractor;
   (o1)-(o4) without options, answers generated and judged by exact match: (o1) the sentences added;
   (o2) each edited to a new object; (o3) absent, and absent beside the second fact (o' produced);
   (o4) the 2^20-row bank.
   Beside the trained model, on the same banks and questions: the same weights with
   model.min_trust=--gated ("model_gated") and with the exclusion's write cut ("model_no_exclusion",
   --no-ablate-exclusion leaves it out), the same modules untrained, the no-training word rule and
   BM25 retrieval with an option-in-row reader (`explicitlm.baselines`).
   (a, b), (f), (g), (o1) and (o3) are also given apart for the questions whose words tell their
   fact from its second fact, those whose words do not, and those whose words point to the second
   (`Facts.cue`), and every system's answer to each of their questions is kept under `<out>/answers/`.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The protocol's split by subject (`explicitlm.split.subject_side`): dev and test, the rest trains.
HELD_OUT = {"test": 0.15, "dev": 0.15}
SYSTEMS = ("model", "untrained", "rule", "bm25")
LONG_ROW = 16  # the default model.knowledge_length: (a, b) is also reported on facts with longer sentences


def run(cmd: list[str], log: Path) -> str:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return proc.stdout


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def record(fact: dict[str, Any], question: str, target: dict[str, Any] | None = None, answer: str | None = None):
    """The fact's question as a converted record, asked in `question`'s words, with `target`'s options
    (the fact's own by default) and `answer` as the right one (the fact's object by default)."""
    from explicitlm.data import LABELS, parse_options, parse_target

    t = dict(target or fact["target"], question=question)
    if answer is not None:
        t["correct_answer"] = f"{LABELS[parse_options(t['options'])[1].index(answer)]}:{answer}"
    return {**parse_target(t), "uuid": fact["uuid"], "subject": fact["subject"], "predicate": fact["predicate"]}


def note(out: Path, result: dict[str, Any]) -> None:
    """The figures so far, in case a long run is stopped (`--fit`: beside the held-out ones)."""
    (out / ("result_fit.json" if result.get("fit") else "result.json")).write_text(json.dumps(result, indent=1))


def build_bank_main(knowledge: str, bank: str, base: str, overrides: list[str]) -> None:
    """`--build-bank`: build a bank and its index in this process; print time and peak RSS."""
    from explicitlm.config import load_config
    from explicitlm.pipeline import ensure_bank

    t0 = time.time()
    cfg = load_config(
        None,
        [
            f"model.qwen3_model_path={base}",
            f"model.database_init_path={knowledge}",
            f"model.cache_path={bank}",
            *overrides,
        ],
    )
    rows = len(ensure_bank(cfg))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps({"rows": rows, "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(rss, 2)}))


def template_words(text: str) -> list[int]:
    """A wording's or sentence's word ids as the reader sees words (normalised and stemmed), its
    {s} and {o} left out (a cloze's blank is no word)."""
    from explicitlm.words import words

    return [i for _, _, i in words(re.sub(r"\{[so]\}", " ", text))]


def without_test_wordings(extra: dict[str, Any], wordings: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`extra` with every training wording left out that is within one word of one of its
    relation's test wordings, as the reader sees words (normalised and stemmed, the subject and blank
    left out), and how many were: the test's wordings stay unseen."""

    def near(a: list[int], b: list[int]) -> bool:  # word-level edit distance <= 1
        if abs(len(a) - len(b)) > 1:
            return False
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1] <= 1

    kept, dropped = {}, 0
    for r, v in extra.items():
        tests = wordings.get(r, {}).get("test") if isinstance(wordings.get(r), dict) else None
        if not isinstance(v, dict) or not tests:
            kept[r] = v
            continue
        seen = [template_words(t) for t in (tests.values() if isinstance(tests, dict) else tests)]
        kept[r] = dict(v)
        for key in ("questions", "clozes"):
            keep = [t for t in v.get(key, []) if not any(near(template_words(t), x) for x in seen)]
            dropped += len(v.get(key, [])) - len(keep)
            kept[r][key] = keep
    return kept, dropped


class Facts:
    """The pack, its split, and the sets built from it (`explicitlm.factsets`)."""

    def __init__(self, facts: list[dict[str, Any]], wordings: dict[str, Any], extra: dict[str, Any]):
        from explicitlm import factsets as fs

        self.all, self.wordings, self.extra = facts, wordings, extra
        self.kinds = fs.relation_kinds(facts)
        self.truth = fs.true_objects(facts)
        self.objects = fs.objects_by_relation(facts)
        self.sentences = {
            r: w["pack_sentence"] for r, w in wordings.items() if isinstance(w, dict) and "pack_sentence" in w
        }
        self.names = fs.last_names(facts)
        self._vocab: dict[str, set[int]] = {}

    def pool(self, relation: str) -> list[str]:
        """The wordings training asks a relation's facts in."""
        w, extra = self.wordings[relation], self.extra.get(relation, {})
        return [w["pack_question"], *w.get("train", []), *extra.get("questions", []), *extra.get("clozes", [])]

    def cue(self, f: dict[str, Any], second: dict[str, Any], question: str) -> int:
        """Whether a question about fact f, beside its second fact, holds words that tell the two
        apart as the reader's word features see words (stemmed; the subject's own words left out):
        words of f's sentence that the second's lacks, and words training's questions of f's
        relation use and the second's relation's do not, each one for f; the same words the other
        way, each one against. 1: more for f, -1: more against, 0: as many (often none). Both kinds
        are open to a reader whose embeddings carry no meaning: the first through its word-overlap
        features, the second learned from training's questions."""

        def ids(text: str) -> set[int]:
            return set(template_words(text))

        for r in (f["predicate_id"], second["predicate_id"]):
            if r not in self._vocab:
                self._vocab[r] = set().union(*map(ids, self.pool(r)))
        subject = ids(f["subject"])
        asked = ids(question) - subject
        own, theirs = ids(f["sentence"]) - subject, ids(second["text"]) - subject
        own_q, theirs_q = self._vocab[f["predicate_id"]], self._vocab[second["predicate_id"]]
        lead = len(asked & (own - theirs)) + len(asked & (own_q - theirs_q))
        lead -= len(asked & (theirs - own)) + len(asked & (theirs_q - own_q))
        return (lead > 0) - (lead < 0)

    def second(self, f: dict[str, Any]) -> dict[str, Any] | None:
        from explicitlm.factsets import second_fact

        return second_fact(f, self.kinds, self.objects, self.truth, self.sentences)

    def asked(self, f: dict[str, Any], form: str, subject: str | None = None) -> str:
        """The fact's question in a wording: "pack" (the pack's own, or its template for another
        name) or one of the test forms."""
        from explicitlm.factsets import worded

        w = self.wordings[f["predicate_id"]]
        if form == "pack":
            return f["target"]["question"] if subject is None else worded(w["pack_question"], subject)
        return worded(w["test"][form], subject or f["subject"])

    def training(
        self, train: list[dict[str, Any]], per_fact: int = 3, name_share: int = 4
    ) -> tuple[list[dict], list[dict]]:
        """(OMCQ items, bank rows) for training: each fact asked in `per_fact` wordings drawn from its
        relation's pool (no wording twice), a person by last name one time in `name_share`, beside a
        second fact about its subject whose object is an option."""
        from explicitlm.factsets import pick, with_option, worded

        items, rows = [], []
        for f in train:
            pool = self.pool(f["predicate_id"])
            order = sorted(range(len(pool)), key=lambda i: pick(f"wording:{f['uuid']}:{i}", 1 << 30))
            name = self.names.get(f["subject"])
            target = f["target"]
            second = self.second(f)
            if second is not None:
                rows.append({"uuid": second["uuid"], "text": second["text"]})
                target = with_option(f, second["object"], "train:" + f["uuid"])
            rows.append({"uuid": f["uuid"], "text": f["sentence"]})
            extras = {"subject": f["subject"], "predicate": f["predicate"], "uuid": f["uuid"]}
            for k, i in enumerate(order[:per_fact]):
                subject = name if name and pick(f"name:{f['uuid']}:{k}", name_share) == 0 else f["subject"]
                question = worded(pool[i], subject)
                items.append({"target": [dict(target, question=question, **extras)]})
        return items, rows


class Systems:
    """The trained model, the same modules untrained, the word rule and BM25 on one bank: each
    system's answer to each question, and whether it answered from memory."""

    def __init__(
        self, cfg, weights: str, tokenizer, threads: int, gate: float = 0.0, ablate: bool = False, device: str = "cpu"
    ):
        self.cfg, self.weights, self.tokenizer, self.device = cfg, weights, tokenizer, device
        self.L = cfg.model.knowledge_length
        # The trained model again with one answering setting changed, as a system of its own:
        # "model_gated" (min_trust=gate, when > 0), "model_no_exclusion" (its exclusion's write cut).
        self.variants = {}
        if gate > 0:
            self.variants["model_gated"] = {"min_trust": gate}
        if ablate:
            self.variants["model_no_exclusion"] = {"exclusion": False}
        self.names = [*SYSTEMS, *self.variants]

    def _each(self, models: dict):
        """(system, model) pairs, the trained model's variants after it."""
        for system, model in models.items():
            yield system, model
            if system != "model":
                continue
            for name, changed in self.variants.items():
                before = {k: getattr(model.settings, k) for k in changed}
                vars(model.settings).update(changed)
                try:
                    yield name, model
                finally:
                    vars(model.settings).update(before)

    def models(self, rows: list[dict[str, str]], bank=None):
        from explicitlm.bank import MemoryBank
        from explicitlm.loading import build_model

        bank = bank if bank is not None else MemoryBank.build(rows, self.tokenizer, self.L)
        return {
            "model": build_model(self.cfg, adapter=self.weights, bank=bank, device=self.device)[1],
            "untrained": build_model(self.cfg, bank=bank, device=self.device)[1],
        }

    def choices(
        self, rows: list[dict[str, str]], sets: dict[str, list[dict]], models=None
    ) -> dict[str, dict[str, list]]:
        """{system: {wording: [(option index, from memory), ...]}} for every wording's records."""
        from explicitlm.baselines import BM25Reader, WordRule
        from explicitlm.objective import record_question
        from explicitlm.scoring import score_questions

        models = models or self.models(rows)
        texts = [r["text"] for r in rows]
        rule, bm25 = WordRule(texts), BM25Reader(texts)
        out: dict[str, dict[str, list]] = {s: {} for s in self.names}
        for name, recs in sets.items():
            for system, model in self._each(models):
                scored = score_questions(
                    model, self.tokenizer, [record_question(r) for r in recs], self.cfg.model.max_seq_len
                )
                out[system][name] = [(s.index, sum(s.used) > len(s.used) / 2) for s in scored]
            out["rule"][name] = [rule.answer(r["question"], r["options"], r["uuid"]) for r in recs]
            out["bm25"][name] = bm25.answers(
                [r["question"] for r in recs], [r["options"] for r in recs], [r["uuid"] for r in recs]
            )
        return out

    def open(self, rows: list[dict[str, str]], sets: dict[str, list[dict]], models=None) -> dict[str, dict[str, list]]:
        """{system: {wording: [(answer text, from memory), ...]}} without options."""
        from explicitlm.baselines import BM25Reader, WordRule
        from explicitlm.objective import record_question
        from explicitlm.scoring import generate_answers

        models = models or self.models(rows)
        texts = [r["text"] for r in rows]
        rule, bm25 = WordRule(texts), BM25Reader(texts)
        out: dict[str, dict[str, list]] = {s: {} for s in self.names}
        for name, recs in sets.items():
            questions = [record_question(r, open_answer=True) for r in recs]
            for system, model in self._each(models):
                made = generate_answers(model, self.tokenizer, questions, self.cfg.model.max_seq_len)
                out[system][name] = [(g.text, sum(g.used) > len(g.used) / 2) for g in made]
            out["rule"][name] = [(rule.open_answer(r["question"], bm25.stop), True) for r in recs]
            out["bm25"][name] = [(a, True) for a in bm25.open_answers([r["question"] for r in recs])]
        return out


def share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 4)


def per_system(answers: dict[str, dict[str, list]], measure) -> dict[str, dict[str, float]]:
    """{system: {wording: measure(wording, answers)}}."""
    return {system: {name: measure(name, got) for name, got in by_set.items()} for system, by_set in answers.items()}


CUES = (("cued", 1), ("uncued", 0), ("misleading", -1))


def by_cue(answers: dict[str, dict[str, list]], asked: dict[str, list[dict]], facts: list[dict], cue: dict, hit):
    """{cue: {"n": {wording: questions}, system: {wording: share of hit(answer, record, fact)}}} over
    the facts whose question in that wording has that cue (`cue[(wording, uuid)]`; a fact with no
    second fact has none); None where no question has it."""
    out: dict[str, Any] = {}
    for kind, want in CUES:
        picked = {
            name: [k for k, (_, f) in enumerate(zip(recs, facts, strict=True)) if cue.get((name, f["uuid"])) == want]
            for name, recs in asked.items()
        }
        out[kind] = {"n": {name: len(ks) for name, ks in picked.items()}}
        for system, by_set in answers.items():
            out[kind][system] = {
                name: share(hit(got[k], asked[name][k], facts[k]) for k in picked[name]) if picked[name] else None
                for name, got in by_set.items()
            }
    return out


def right_option(answer: tuple, record: dict, fact: dict) -> bool:
    """by_cue's hit for accuracy: the system chose the record's right option."""
    return answer[0] == record["answer_index"]


def dump(
    folder: Path, section: str, answers: dict[str, dict[str, list]], asked: dict[str, list[dict]], cue: dict
) -> None:
    """Every system's answer to every question of a set, to read the misses by:
    `<folder>/<section>.jsonl` (an option's index, or the text generated), beside the question, its
    options, the right option's index (an open set's: of the fact's own question) and its cue."""
    folder.mkdir(exist_ok=True)
    with open(folder / f"{section}.jsonl", "w", encoding="utf-8") as fh:
        for name, recs in asked.items():
            for k, r in enumerate(recs):
                row = {"wording": name, "cue": cue.get((name, r["uuid"]))}
                row |= {key: r[key] for key in ("uuid", "question", "options", "answer_index")}
                row |= {system: by[name][k][0] for system, by in answers.items()}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument(
        "--train-wordings",
        default=str(ROOT / "benchmarks" / "train_wordings.json"),
        help="more training wordings per relation ('' for none)",
    )
    p.add_argument("--out", default="/tmp/explicitlm-quality")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--backbone",
        default="",
        help="a Qwen3 folder (config, weights, tokenizer) to train and score the memory on, e.g. a "
        "pretrained Qwen3 with --extra model.query_from=layer_input; default: a tiny random Qwen3 built "
        "in <out>/base with a tokenizer of the training text",
    )
    p.add_argument(
        "--pretrain-base",
        type=int,
        default=0,
        help="train a new base as a causal LM for this many steps on the training facts' sentences and "
        "questions with their answers before the memory (explicitlm.base.pretrain); 0: the random base",
    )
    p.add_argument(
        "--wordings-per-fact", type=int, default=3, help="training questions per fact, each in another wording"
    )
    p.add_argument("--max-eval", type=int, default=1500, help="held-out facts scored (a fixed sample)")
    p.add_argument("--locality", type=int, default=1500, help="training-subject questions whose answers must not move")
    p.add_argument("--max-train", type=int, default=0, help="train on at most this many facts (0: all; a smoke run)")
    p.add_argument("--big-bank-rows", type=int, default=1 << 20, help="(e)'s bank size; 0 skips (e) and (o4)")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the scored models run (auto: cuda if seen)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for evaluation")
    p.add_argument("--sets", default="abcdfghio", help="which sets to score (letters; o: all open-answer sets)")
    p.add_argument(
        "--gated",
        type=float,
        default=0.5,
        help='also score the trained model with model.min_trust at this value, as "model_gated" (0: not)',
    )
    p.add_argument(
        "--ablate-exclusion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also score the trained model with its exclusion\'s write cut, as "model_no_exclusion"',
    )
    p.add_argument(
        "--fit",
        type=int,
        default=0,
        help="score this many training-subject facts in place of the held-out ones (--max-eval and (e) aside), "
        "after training on all (their sentences and second facts seen in training); figures to result_fit.json",
    )
    p.add_argument("--extra", nargs="*", default=[], help="more config overrides, for training and evaluation")
    p.add_argument("--build-bank", nargs=3, metavar=("KNOWLEDGE", "BANK", "BASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_bank:
        return build_bank_main(*args.build_bank, args.extra)
    pack = Path(args.pack)
    if not (pack / "triples_train.jsonl").exists():
        print(json.dumps({"skipped": True, "reason": f"no pack at {pack}"}))
        return
    from explicitlm.factsets import load_wordings

    wordings, test_forms = load_wordings(args.wordings)  # a file that does not fit stops here, one line
    if args.backbone:
        from explicitlm.errors import UserError
        from explicitlm.loading import check_backbone

        check_backbone(args.backbone, "--backbone")
        if args.pretrain_base:
            raise UserError("--backbone and --pretrain-base: a given backbone is not trained further; drop one")
    import torch

    from explicitlm.config import load_config
    from explicitlm.evaluation import edited_fact, exact_match
    from explicitlm.factsets import load_pack, new_object, pick, repaired_sentences, with_option
    from explicitlm.index import index_cache_path
    from explicitlm.loading import fill_from_weights
    from explicitlm.split import subject_side

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, py = out / "log.txt", sys.executable
    extra = json.load(open(args.train_wordings)) if args.train_wordings else {}
    extra, dropped = without_test_wordings(extra, wordings)
    own = {r: {"questions": v.get("train", [])} for r, v in wordings.items() if isinstance(v, dict)}
    own, dropped_own = without_test_wordings(own, wordings)
    for r, v in own.items():
        wordings[r]["train"] = v["questions"]
    dropped += dropped_own
    every = load_pack(pack)
    facts = [f for f in every if f["predicate_id"] in wordings]
    side = {f["uuid"]: subject_side(f["subject"], HELD_OUT) for f in facts}
    train = [f for f in facts if side[f["uuid"]] == "train"]
    held = [f for f in facts if side[f["uuid"]] == args.split]
    assert not {f["subject"] for f in train} & {f["subject"] for f in held}
    held = sorted(held, key=lambda f: pick(f["uuid"], 1 << 30))[: args.max_eval or None]
    train = sorted(train, key=lambda f: pick(f["uuid"], 1 << 30))[: args.max_train or None]
    world = Facts(facts, wordings, extra)
    result: dict[str, Any] = {"split": args.split, "train_facts": len(train), "heldout_facts_scored": len(held)}
    # The baselines' libraries too: a BM25 cell can move with bm25s's version.
    result["versions"] = {p: metadata.version(p) for p in ("torch", "transformers", "ray", "bm25s")}
    result["train_wordings_dropped_as_test"] = dropped
    # A relation the wordings file does not word cannot be asked in the test wordings: left out, counted.
    result["pack_facts_without_wordings"] = len(every) - len(facts)
    result["test_wordings"] = list(test_forms)
    result["backbone"] = args.backbone or "tiny random Qwen3 (<out>/base)"

    # ---- 2. train on the training subjects only
    items, train_rows = world.training(train, args.wordings_per_fact)
    json.dump(items, open(out / "train.json", "w"), ensure_ascii=False)
    train_knowledge = write_jsonl(out / "knowledge_train.jsonl", train_rows)
    base = Path(args.backbone) if args.backbone else out / "base"
    if not (base / "config.json").exists():
        run(
            [
                py,
                "ray_jobs/make_base.py",
                "--output",
                str(base),
                "--text",
                str(out / "train.json"),
                str(train_knowledge),
            ],
            log,
        )
    made = json.load(open(base / "pretrained.json")) if (base / "pretrained.json").exists() else {}
    # A base pretrained in place must match what its folder's memory was trained on, and be whole.
    if made.get("unfinished") or (made.get("steps", 0) != args.pretrain_base and (made or (out / "run").exists())):
        raise SystemExit(
            f"{base} was pretrained for {made.get('steps', 0)} steps"
            f"{' (interrupted)' if made.get('unfinished') else ''} and {out / 'run'} may hold memory trained "
            f"on it; --pretrain-base {args.pretrain_base} needs a fresh --out folder (or the same value)"
        )
    if args.pretrain_base and not made:
        from explicitlm.base import pretrain

        texts = [t["question"] + " " + t["correct_answer"].split(":", 1)[1] for i in items for t in i["target"]]
        texts += [r["text"] for r in train_rows]
        started = time.time()
        (base / "pretrained.json").write_text(json.dumps({"steps": args.pretrain_base, "unfinished": True}))
        loss = pretrain(base, texts, args.pretrain_base)
        made = {"steps": args.pretrain_base, "texts": len(texts), "loss": loss, "seconds": time.time() - started}
        json.dump(made, open(base / "pretrained.json", "w"))
    if made:
        result["base_pretrained"] = made
    if not (out / "train.parquet").exists():
        run(
            [
                py,
                "ray_jobs/convert.py",
                "--input",
                str(out / "train.json"),
                "--output",
                str(out / "train.parquet"),
                "--no-progress",
            ],
            log,
        )
    common = [f"model.qwen3_model_path={base}", *args.extra]
    run_dir = out / "run"
    if args.backbone and (run_dir / "sft_latest" / "adapter_config.json").exists():  # a rerun scores what it trained
        from explicitlm.adapter import ADAPTER_CONFIG, adapter_paths

        latest = run_dir / "sft_latest"
        trained_on = adapter_paths(latest, json.loads((latest / ADAPTER_CONFIG).read_text()))["backbone_path"]
        if trained_on and Path(trained_on).resolve() != base.resolve():
            raise SystemExit(
                f"{latest} was trained on {trained_on}, not {base}: give a fresh --out folder for another backbone"
            )
    t0 = time.time()
    if not (run_dir / "sft_latest").exists():
        run(
            [
                py,
                "ray_jobs/sft.py",
                *common,
                f"model.database_init_path={train_knowledge}",
                f"model.cache_path={out / 'bank_train.parquet'}",
                f"dataset.sft_dataset_path={out / 'train.parquet'}",
                f"training.output_dir={run_dir}",
                f"training.epochs={args.epochs}",
                "eval.memory_checks=false",
            ],
            log,
        )
        metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        tok_s = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        trained = {
            "training_seconds": round(time.time() - t0, 1),
            "training_tokens_per_s": round(sum(tok_s[-5:]) / max(len(tok_s[-5:]), 1), 1),
        }
        (out / "training.json").write_text(json.dumps(trained))
    if (out / "training.json").exists():  # a rerun scores the weights it trained before
        result.update(json.loads((out / "training.json").read_text()))
    weights = str(run_dir / "sft_latest")
    cfg = fill_from_weights(load_config(None, [*common, f"training.torch_threads={args.threads}"]), weights)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    from explicitlm.loading import resolve_device

    device = resolve_device(args.device, "--device")
    result["eval_device"] = str(device)
    systems = Systems(cfg, weights, tokenizer, args.threads, args.gated, args.ablate_exclusion, device)
    sets = set(args.sets)
    if args.fit:  # training subjects scored as if held out: what training fit, not what carries over
        if not 0 < args.fit < len(train):
            raise SystemExit(f"--fit {args.fit}: at most {len(train) - 1} training facts (the rest stay in the bank)")
        held, train = train[: args.fit], train[args.fit :]
        result.update(fit=True, heldout_facts_scored=len(held))

    own = [{"uuid": f["uuid"], "text": f["sentence"]} for f in held]
    train_sentences = [{"uuid": f["uuid"], "text": f["sentence"]} for f in train]
    full_rows = train_sentences + own
    forms = ("pack", *test_forms)

    def wordings_of(facts_, target=None, answer=None, subject=None):
        """{wording: records} for facts, each with its target and answer (functions of the fact)."""
        return {
            form: [
                record(
                    f,
                    world.asked(f, form, subject(f) if subject else None),
                    target(f) if target else None,
                    answer(f) if answer else None,
                )
                for f in facts_
            ]
            for form in forms
        }

    def accuracy(asked):
        return lambda name, got: share(i == r["answer_index"] for (i, _), r in zip(got, asked[name]))

    def keep(section: str, value: Any) -> None:
        result[section] = value
        note(out, result)

    plain = wordings_of(held)
    # A second fact about the subject, in a relation of the same kind ((f), (g), and the rows training
    # saw beside each fact); whether each question's words tell its fact from that one (Facts.cue),
    # and (a, b), (f), (g), (o1) and (o3) on the questions whose words do, do not, or point the other way.
    seconds = {f["uuid"]: s for f in held if (s := world.second(f)) is not None}
    paired = [f for f in held if f["uuid"] in seconds]
    cue = {(form, f["uuid"]): world.cue(f, seconds[f["uuid"]], world.asked(f, form)) for form in forms for f in paired}
    result["cue_share"] = {
        kind: {form: share(cue[(form, f["uuid"])] == want for f in paired) for form in forms} for kind, want in CUES
    }
    answers = out / ("answers_fit" if args.fit else "answers")  # each set's answers, question by question

    # ---- (a)-(d): the held-out sentences added, absent, edited
    if sets & set("abcd"):
        full = systems.models(full_rows)
        got = systems.choices(full_rows, plain, full)
        keep("a_b_accuracy", per_system(got, accuracy(plain)))
        keep("a_b_by_cue", by_cue(got, plain, held, cue, right_option))
        dump(answers, "a_b", got, plain, cue)
        # Facts whose sentence is longer than LONG_ROW tokens: a bank of rows that long loses its end
        # (often the object); model.knowledge_length=auto sizes rows to the sentences instead.
        spaced = [" " + f["sentence"].lstrip() for f in held]
        long = [len(ids) > LONG_ROW for ids in tokenizer(spaced, add_special_tokens=False)["input_ids"]]

        def long_accuracy(name, got_):
            return share(i == r["answer_index"] for (i, _), r, x in zip(got_, plain[name], long) if x)

        keep("a_b_long_rows", {"facts": sum(long), "tokens_over": LONG_ROW, "accuracy": per_system(got, long_accuracy)})
        from explicitlm.evaluation import evaluate_records, summarize

        a = summarize(evaluate_records(full["model"], tokenizer, plain["pack"], cfg.model.max_seq_len, 64), prefix="")
        keep("a_recall@1", a.get("recall@1"))
        keep("a_per_relation", a["per_predicate"])
    if "c" in sets:
        keep("c_absent_accuracy", per_system(systems.choices(train_sentences, plain), accuracy(plain)))
    if "d" in sets:
        edited_rows, edited_facts = list(train_sentences), []
        for f in held:
            rec = record(f, f["target"]["question"])
            changed = edited_fact(f["sentence"], rec["options"], rec["answer_index"], f["uuid"])
            edited_rows.append({"uuid": f["uuid"], "text": changed[0] if changed else f["sentence"]})
            if changed is not None:
                edited_facts.append((f, rec["options"][changed[1]]))
        new = dict((f["uuid"], a) for f, a in edited_facts)
        asked = wordings_of([f for f, _ in edited_facts], answer=lambda f: new[f["uuid"]])
        edited = systems.models(edited_rows)
        keep("d_edit_following", per_system(systems.choices(edited_rows, asked, edited), accuracy(asked)))
        local = [
            record(f, f["target"]["question"])
            for f in sorted(train, key=lambda f: pick(f["uuid"], 1 << 30))[: args.locality]
        ]
        loc = systems.choices(full_rows, {"local": local}, full)["model"]["local"]
        moved = systems.choices(edited_rows, {"local": local}, edited)["model"]["local"]
        keep("d_locality_changed", share(x[0] != y[0] for x, y in zip(loc, moved)))
        del edited
    if sets & set("abcd"):
        del full

    # ---- (f), (g): a second fact about the subject; (i): edits without the crutch
    second_rows = [{"uuid": s["uuid"], "text": s["text"]} for s in seconds.values()]
    beside = lambda f: with_option(f, seconds[f["uuid"]]["object"], "eval:" + f["uuid"])  # noqa: E731
    which = wordings_of(paired, target=beside)
    result["f_g_facts"] = len(paired)
    if "f" in sets:
        got = systems.choices(full_rows + second_rows, which)
        keep("f_which_fact_accuracy", per_system(got, accuracy(which)))
        keep("f_by_cue", by_cue(got, which, paired, cue, right_option))
        dump(answers, "f", got, which, cue)
    if "g" in sets:
        got = systems.choices(train_sentences + second_rows, which)

        def names_o_prime(answer, r, f) -> bool:
            return r["options"][answer[0]] == seconds[f["uuid"]]["object"]

        def names_other(name, got_, confident_only=False):
            return share(
                names_o_prime(a, r, f) and (a[1] or not confident_only) for a, r, f in zip(got_, which[name], paired)
            )

        keep("g_absent_names_second_object", per_system(got, names_other))
        keep("g_absent_names_second_object_from_memory", per_system(got, lambda n, g: names_other(n, g, True)))
        keep("g_by_cue", by_cue(got, which, paired, cue, names_o_prime))
        dump(answers, "g", got, which, cue)
    if "h" in sets:
        named = [f for f in held if f["subject"] in world.names]
        asked = wordings_of(named, subject=lambda f: world.names[f["subject"]])
        result["h_facts"] = len(named)
        keep("h_last_name_accuracy", per_system(systems.choices(full_rows, asked), accuracy(asked)))
    edits = {f["uuid"]: e for f in held if (e := new_object(f, world.objects, world.truth)) is not None}
    edited_rows = train_sentences + [
        {"uuid": f["uuid"], "text": edits[f["uuid"]][0] if f["uuid"] in edits else f["sentence"]} for f in held
    ]
    moved = [f for f in held if f["uuid"] in edits]
    if "i" in sets:
        asked = wordings_of(
            moved,
            target=lambda f: with_option(f, edits[f["uuid"]][1], "edit:" + f["uuid"]),
            answer=lambda f: edits[f["uuid"]][1],
        )
        result["i_facts"] = len(moved)
        keep("i_edit_following", per_system(systems.choices(edited_rows, asked), accuracy(asked)))

    # ---- (o1)-(o3): without options
    if "o" in sets:

        def em(expected):
            return lambda name, got: share(exact_match(t, expected(f)) for (t, _), f in zip(got, facts_of[name]))

        facts_of = {form: held for form in forms}
        got = systems.open(full_rows, plain)
        keep("o1_exact_match", per_system(got, em(lambda f: f["object"])))
        keep("o1_by_cue", by_cue(got, plain, held, cue, lambda a, r, f: exact_match(a[0], f["object"])))
        dump(answers, "o1", got, plain, cue)
        facts_of = {form: moved for form in forms}
        keep(
            "o2_edit_following",
            per_system(systems.open(edited_rows, wordings_of(moved)), em(lambda f: edits[f["uuid"]][1])),
        )
        facts_of = {form: held for form in forms}
        keep("o3_absent_exact_match", per_system(systems.open(train_sentences, plain), em(lambda f: f["object"])))
        facts_of = {form: paired for form in forms}
        asked = wordings_of(paired)
        got = systems.open(train_sentences + second_rows, asked)
        keep("o3_absent_names_second_object", per_system(got, em(lambda f: seconds[f["uuid"]]["object"])))
        o_prime = lambda a, r, f: exact_match(a[0], seconds[f["uuid"]]["object"])  # noqa: E731
        keep("o3_by_cue", by_cue(got, asked, paired, cue, o_prime))
        dump(answers, "o3_second", got, asked, cue)

    # ---- (e), (o4): a bank of 2^20 rows
    if args.big_bank_rows and not args.fit:  # its files are the held-out run's, kept in the same folder
        big_knowledge = out / f"knowledge_{args.big_bank_rows}.jsonl"
        big_bank = out / f"bank_{args.big_bank_rows}.parquet"
        if not big_knowledge.exists():
            rows = full_rows + repaired_sentences(train, args.big_bank_rows - len(full_rows))
            random.Random(0).shuffle(rows)
            write_jsonl(big_knowledge, rows)
        for stale in (big_bank, index_cache_path(big_bank)):
            stale.unlink(missing_ok=True)
        cmd = [
            py,
            __file__,
            "--build-bank",
            str(big_knowledge),
            str(big_bank),
            str(base),
            "--extra",
            *args.extra,
            f"training.seed={cfg.training.seed}",
        ]
        built = json.loads(run(cmd, log).strip().splitlines()[-1])
        from dataclasses import replace

        from explicitlm.loading import build_model

        t0 = time.time()
        _, big = build_model(
            replace(cfg, model=replace(cfg.model, cache_path=str(big_bank))), adapter=weights, device=device
        )
        load_s = time.time() - t0
        t0 = time.time()
        from explicitlm.evaluation import evaluate_records, summarize
        from explicitlm.objective import record_question
        from explicitlm.scoring import generate_answers

        e = summarize(evaluate_records(big, tokenizer, plain["pack"], cfg.model.max_seq_len, 64), prefix="")
        eval_s = time.time() - t0
        made = generate_answers(
            big, tokenizer, [record_question(r, open_answer=True) for r in plain["pack"]], cfg.model.max_seq_len
        )
        keep(
            "e_big_bank",
            {
                "rows": built["rows"],
                "build_seconds": built["seconds"],
                "build_peak_rss_gb": built["peak_rss_gb"],
                "load_seconds": round(load_s, 1),
                "accuracy": e["accuracy"],
                "recall@1": e.get("recall@1"),
                "memory_read": e["memory_read"],
                "eval_seconds": round(eval_s, 1),
                "o4_exact_match": share(exact_match(g.text, f["object"]) for g, f in zip(made, held)),
            },
        )
    note(out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    from explicitlm.cli import command

    sys.exit(command("quality.py", main))
