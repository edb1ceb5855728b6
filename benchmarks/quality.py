"""Does it learn, and does it answer any wording and any bank? The open protocol on real facts.

    python benchmarks/quality.py --split dev     # tune here
    python benchmarks/quality.py --split test    # report once

On the shared real-fact pack (`omcq_train.json`, `knowledge_train.jsonl`, `triples_train.jsonl`:
questions, sentences and the (subject, relation, object) behind each, linked by uuid); skips cleanly
when the pack is absent.
1. Split by subject (`explicitlm.split`): train 70%, dev 15%, test 15%.
2. Train on the training subjects only: a tokenizer trained on their text, a memory bank of their
   sentences, their questions each in one of three wordings (the pack's and two more from
   `benchmarks/wordings.json`), converted with `ray_jobs/convert.py` and trained with
   `ray_jobs/sft.py`.
3. Evaluate the held-out split, its sentences added to the bank after training, no retraining:
   (a) accuracy and retrieval recall@1 in the pack's wording, and the bare backbone's accuracy;
   (b) accuracy and memory read in three wordings training never used (a cloze with the subject
       first, a question with it last, another form);
   (c) accuracy in every wording with the held-out sentences absent from the bank;
   (d) every held-out sentence edited to name another option: the share of answers that follow, in
       every wording, and how many of 1,500 training-subject answers change;
   (e) a bank of 2^20 rows (the sentences plus distractors: training subjects re-paired with other
       objects of their relation, never a held-out subject), built from a knowledge JSONL in a
       process of its own (time, peak RSS), loaded from its cache (time), then (a) again.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORMS = ("cloze_subject_first", "subject_last", "other")


def run(cmd: list[str], log: Path) -> str:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return proc.stdout


def pick(key: str, n: int) -> int:
    """A choice among n that depends only on key (not on Python's per-process hash salt)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n


def worded(template: str, subject: str) -> str:
    text = template.format(s=subject)
    return text[0].upper() + text[1:]


def load_pack(pack: Path) -> list[dict[str, Any]]:
    """One fact per uuid: subject, relation id, object, sentence and the pack's question target."""
    from explicitlm.readers import read_knowledge

    sentences = {r["uuid"]: r["text"] for r in read_knowledge(pack / "knowledge_train.jsonl")}
    targets = {item["target"][0]["uuid"]: item["target"][0] for item in json.load(open(pack / "omcq_train.json"))}
    facts = []
    for line in open(pack / "triples_train.jsonl", encoding="utf-8"):
        t = json.loads(line)
        if t["uuid"] in sentences and t["uuid"] in targets:
            facts.append({**t, "sentence": sentences[t["uuid"]], "target": targets[t["uuid"]]})
    return facts


def record(fact: dict[str, Any], question: str, answer: str | None = None) -> dict[str, Any]:
    """The fact's question as a converted record, asked in `question`'s words (and, for an edited
    fact, with `answer` as the right option)."""
    from explicitlm.data import LABELS, parse_options, parse_target

    t = dict(fact["target"], question=question)
    if answer is not None:
        t["correct_answer"] = f"{LABELS[parse_options(t['options'])[1].index(answer)]}:{answer}"
    return {**parse_target(t), "uuid": fact["uuid"], "subject": fact["subject"], "predicate": fact["predicate"]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def distractors(train: list[dict[str, Any]], n: int) -> list[dict[str, str]]:
    """n sentences re-pairing training subjects with other objects of the same relation."""
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


def note(out: Path, result: dict[str, Any]) -> None:
    """The figures so far, in case a long run is stopped."""
    (out / "result.json").write_text(json.dumps(result, indent=1))


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


class Evaluator:
    """Trained weights scored on any bank: accuracy, memory read, recall@1, answers."""

    def __init__(self, cfg, weights: str):
        self.cfg, self.weights = cfg, weights

    def model(self, bank, weights: str | None = None):
        from explicitlm.loading import build_model

        return build_model(self.cfg, adapter=self.weights if weights is None else weights, bank=bank)

    def model_from_file(self, bank_path: Path):
        """The bank and its index loaded from their files, as a server or an evaluation job does."""
        from dataclasses import replace

        from explicitlm.loading import build_model

        cfg = replace(self.cfg, model=replace(self.cfg.model, cache_path=str(bank_path)))
        return build_model(cfg, adapter=self.weights)

    def score(self, model_and_tok, records: list[dict[str, Any]]) -> dict[str, Any]:
        from explicitlm.evaluation import evaluate_records, summarize

        tok, model = model_and_tok
        out = summarize(evaluate_records(model, tok, records, self.cfg.model.max_seq_len, 64), prefix="")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

    def answers(self, model_and_tok, records: list[dict[str, Any]]) -> list[int]:
        from explicitlm.objective import record_question
        from explicitlm.scoring import score_questions

        tok, model = model_and_tok
        return [s.index for s in score_questions(model, tok, [record_question(r) for r in records], 512)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument("--out", default="/tmp/explicitlm-quality")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-eval", type=int, default=1500, help="held-out facts scored (a fixed sample)")
    p.add_argument("--locality", type=int, default=1500, help="training-subject questions whose answers must not move")
    p.add_argument("--max-train", type=int, default=0, help="train on at most this many facts (0: all; a smoke run)")
    p.add_argument("--big-bank-rows", type=int, default=1 << 20, help="(e)'s bank size; 0 skips (e)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for evaluation")
    p.add_argument("--extra", nargs="*", default=[], help="more config overrides, for training and evaluation")
    p.add_argument("--build-bank", nargs=3, metavar=("KNOWLEDGE", "BANK", "BASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build_bank:
        return build_bank_main(*args.build_bank, args.extra)
    pack = Path(args.pack)
    if not (pack / "triples_train.jsonl").exists():
        print(json.dumps({"skipped": True, "reason": f"no pack at {pack}"}))
        return
    import torch

    from explicitlm.bank import MemoryBank
    from explicitlm.config import load_config
    from explicitlm.evaluation import edited_fact
    from explicitlm.index import index_cache_path
    from explicitlm.split import subject_side

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, py = out / "log.txt", sys.executable
    wordings = json.load(open(args.wordings))
    facts = [f for f in load_pack(pack) if f["predicate_id"] in wordings]
    side = {f["uuid"]: subject_side(f["subject"], {"test": 0.15, "dev": 0.15}) for f in facts}
    train = [f for f in facts if side[f["uuid"]] == "train"]
    held = [f for f in facts if side[f["uuid"]] == args.split]
    assert not {f["subject"] for f in train} & {f["subject"] for f in held}
    held = sorted(held, key=lambda f: pick(f["uuid"], 1 << 30))[: args.max_eval or None]
    train = sorted(train, key=lambda f: pick(f["uuid"], 1 << 30))[: args.max_train or None]
    result: dict[str, Any] = {"split": args.split, "train_facts": len(train), "heldout_facts_scored": len(held)}

    # ---- 2. train on the training subjects only, each question in one of three wordings
    def train_question(f):
        options = [f["target"]["question"]] + [worded(w, f["subject"]) for w in wordings[f["predicate_id"]]["train"]]
        return options[pick("wording:" + f["uuid"], len(options))]

    train_items = [
        {"target": [dict(f["target"], question=train_question(f), subject=f["subject"], predicate=f["predicate"])]}
        for f in train
    ]
    json.dump(train_items, open(out / "train.json", "w"), ensure_ascii=False)
    train_knowledge = write_jsonl(
        out / "knowledge_train.jsonl", [{"uuid": f["uuid"], "text": f["sentence"]} for f in train]
    )
    base = out / "base"
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
    cfg = load_config(None, [*common, f"training.torch_threads={args.threads}"])
    from explicitlm.loading import fill_from_weights

    cfg = fill_from_weights(cfg, weights)
    ev = Evaluator(cfg, weights)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    L = cfg.model.knowledge_length

    def bank_of(rows):
        return MemoryBank.build(rows, tokenizer, L)

    sentences = [{"uuid": f["uuid"], "text": f["sentence"]} for f in train + held]
    forms = {"pack": lambda f: f["target"]["question"]}
    forms.update(
        {form: (lambda f, form=form: worded(wordings[f["predicate_id"]]["test"][form], f["subject"])) for form in FORMS}
    )
    asked = {name: [record(f, q(f)) for f in held] for name, q in forms.items()}

    # ---- 3. (a), (b): the held-out sentences added after training
    full = ev.model(bank_of(sentences))
    a = ev.score(full, asked["pack"])
    result["a_accuracy"], result["a_recall@1"] = a["accuracy"], a.get("recall@1")
    result["a_memory_read"], result["a_per_relation"] = a["memory_read"], a["per_predicate"]
    result["a_bare_backbone_accuracy"] = ev.score(ev.model(bank_of(sentences), weights=""), asked["pack"])["accuracy"]
    note(out, result)
    for form in FORMS:
        b = ev.score(full, asked[form])
        result[f"b_{form}"] = {k: b.get(k) for k in ("accuracy", "memory_read", "recall@1")}
    # ---- (c) absent from the bank
    without = ev.model(bank_of([{"uuid": f["uuid"], "text": f["sentence"]} for f in train]))
    result["c_absent_accuracy"] = {name: ev.score(without, recs)["accuracy"] for name, recs in asked.items()}
    note(out, result)
    del without
    # ---- (d) every held-out sentence edited to name another option of its question
    edited_rows, edited_facts = [{"uuid": f["uuid"], "text": f["sentence"]} for f in train], []
    for f in held:
        rec = record(f, f["target"]["question"])
        changed = edited_fact(f["sentence"], rec["options"], rec["answer_index"], f["uuid"])
        if changed is None:
            edited_rows.append({"uuid": f["uuid"], "text": f["sentence"]})
            continue
        edited_rows.append({"uuid": f["uuid"], "text": changed[0]})
        edited_facts.append((f, rec["options"][changed[1]]))
    edited = ev.model(bank_of(edited_rows))
    result["d_edited_facts"] = len(edited_facts)
    result["d_edit_following"] = {
        name: ev.score(edited, [record(f, q(f), answer) for f, answer in edited_facts])["accuracy"]
        for name, q in forms.items()
    }
    local = sorted(train, key=lambda f: pick(f["uuid"], 1 << 30))[: args.locality]
    local = [record(f, f["target"]["question"]) for f in local]
    before, after = ev.answers(full, local), ev.answers(edited, local)
    result["d_locality_changed"] = round(sum(x != y for x, y in zip(before, after)) / len(local), 4)
    note(out, result)
    del full, edited

    # ---- (e) a bank of 2^20 rows
    if args.big_bank_rows:
        big_knowledge = out / f"knowledge_{args.big_bank_rows}.jsonl"
        big_bank = out / f"bank_{args.big_bank_rows}.parquet"
        if not big_knowledge.exists():
            rows = sentences + distractors(train, args.big_bank_rows - len(sentences))
            random.Random(0).shuffle(rows)
            write_jsonl(big_knowledge, rows)
        for stale in (big_bank, index_cache_path(big_bank)):
            stale.unlink(missing_ok=True)
        built = json.loads(
            run(
                [
                    py,
                    __file__,
                    "--build-bank",
                    str(big_knowledge),
                    str(big_bank),
                    str(base),
                    "--extra",
                    *args.extra,
                    f"training.seed={cfg.training.seed}",
                ],
                log,
            )
            .strip()
            .splitlines()[-1]
        )
        t0 = time.time()
        big = ev.model_from_file(big_bank)  # the bank and its index from their files
        load_s = time.time() - t0
        t0 = time.time()
        e = ev.score(big, asked["pack"])
        result["e_big_bank"] = {
            "rows": built["rows"],
            "build_seconds": built["seconds"],
            "build_peak_rss_gb": built["peak_rss_gb"],
            "load_seconds": round(load_s, 1),
            "accuracy": e["accuracy"],
            "recall@1": e.get("recall@1"),
            "memory_read": e["memory_read"],
            "eval_seconds": round(time.time() - t0, 1),
        }
    note(out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
