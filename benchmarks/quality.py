"""Does it learn? Held-out accuracy on real facts, the memory ablation, and edit following.

    python benchmarks/quality.py [--pack ../shared/data/real_omcq_train] [--epochs 3] [--out /tmp/quality]

Runs on any OMCQ + knowledge pair (`omcq_train.json`, `knowledge_train.jsonl`, questions and
sentences sharing uuids); skips cleanly when the pack is absent.
1. Split by subject, 80/20, deterministic (the subject is the word span a question shares with its
   sentence that is rarest across the questions; the relation is the question with it taken out).
2. Build the tiny base with a tokenizer trained on the pack's text; convert with ray_jobs/convert.py;
   build the memory bank from all sentences, held-out ones included.
3. Train the memory modules only with ray_jobs/sft.py on the training subjects.
4. With ray_jobs/evaluate.py on the held-out questions: (a) the bare frozen backbone, (b) the trained
   model, (c) the trained model with the held-out sentences removed from the bank, (d) the trained
   model with each held-out sentence edited to name a wrong option, scored against that option,
   (e) retrieval recall@1/@k; accuracy per relation, training time and tokens/s; for (b) and (c) the
   share of layers that read memory (their rows matched the question, `model.min_match`).
The last line is one JSON object; a PNG of accuracy per relation is written beside the results.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from explicitlm.data import LABELS, parse_target
from explicitlm.evaluation import edited_fact
from explicitlm.readers import read_knowledge
from explicitlm.split import subject_split

ROOT = Path(__file__).resolve().parent.parent


def words(s: str) -> list[re.Match]:
    return list(re.finditer(r"\w+|[^\w\s]", s))


def subject_of(question: str, sentence: str, idf: dict[str, float], template_idf: float) -> str:
    """The run of words the question shares with its sentence that is rarest across all questions
    (sum of IDF), as written in the question: "Accra", not the template's "the capital of"."""
    q, s = words(question), words(sentence)
    ql, sl = [w.group().lower() for w in q], [w.group().lower() for w in s]
    best, best_score = None, 0.0
    for i in range(len(ql)):
        for j in range(len(sl)):
            if ql[i] != sl[j] or (i and j and ql[i - 1] == sl[j - 1]):
                continue  # not the start of a maximal shared run
            n = 0
            while i + n < len(ql) and j + n < len(sl) and ql[i + n] == sl[j + n]:
                n += 1
            score = sum(idf.get(w, 0.0) for w in ql[i : i + n])
            if score > best_score:
                best, best_score = (i, n), score
    if best is None:
        return ""
    i, n = best

    # Template words glued to the subject ("the native language of" + name) are lowercase words
    # that many questions share (IDF below template_idf): trim them off both ends.
    def is_template(w: re.Match) -> bool:
        return w.group().islower() and idf.get(w.group(), 0.0) < template_idf or not w.group()[0].isalnum()

    while n > 1 and is_template(q[i]):
        i, n = i + 1, n - 1
    while n > 1 and is_template(q[i + n - 1]):
        n -= 1
    return question[q[i].start() : q[i + n - 1].end()]


def question_idf(questions: list[str]) -> dict[str, float]:
    df: dict[str, int] = {}
    for text in questions:
        for w in {m.group().lower() for m in words(text)}:
            df[w] = df.get(w, 0) + 1
    return {w: math.log(len(questions) / c) for w, c in df.items()}


def run(cmd: list[str], log: Path) -> str:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return proc.stdout


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--out", default="/tmp/explicitlm-quality")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-eval", type=int, default=0, help="evaluate at most this many held-out questions")
    p.add_argument("--extra", nargs="*", default=[], help="more sft.py overrides")
    args = p.parse_args()
    pack = Path(args.pack)
    omcq, knowledge = pack / "omcq_train.json", pack / "knowledge_train.jsonl"
    if not omcq.exists() or not knowledge.exists():
        print(json.dumps({"skipped": True, "reason": f"no pack at {pack}"}))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    py = sys.executable

    # ---- 1. split by subject
    sentences = {r["uuid"]: r["text"] for r in read_knowledge(knowledge)}
    items = json.load(open(omcq, encoding="utf-8"))
    train_items, val_items = [], []
    idf = question_idf([item["target"][0]["question"] for item in items])
    template_idf = math.log(len(items) / 50)  # a word in more than 50 questions
    for item in items:
        t = item["target"][0]
        subject = subject_of(t["question"], sentences.get(t["uuid"], ""), idf, template_idf)
        relation = t["question"].replace(subject, "X") if subject else t["question"]
        t = dict(t, subject=subject, predicate=relation)
        (val_items if subject_split(subject.lower(), 0.2) == "val" else train_items).append({"target": [t]})
    val_subjects = {i["target"][0]["subject"].lower() for i in val_items}
    assert not any(i["target"][0]["subject"].lower() in val_subjects for i in train_items)
    # Relations with too few held-out questions are merged for the per-relation chart only.
    json.dump(train_items, open(out / "train.json", "w"), ensure_ascii=False)
    json.dump(val_items, open(out / "val.json", "w"), ensure_ascii=False)

    # ---- 2. base, conversion, memory
    base = out / "base"
    if not (base / "config.json").exists():
        run([py, "ray_jobs/make_base.py", "--output", str(base), "--text", str(omcq), str(knowledge)], log)
    for name in ("train", "val"):
        if not (out / f"{name}.parquet").exists():
            run(
                [
                    py,
                    "ray_jobs/convert.py",
                    "--input",
                    str(out / f"{name}.json"),
                    "--output",
                    str(out / f"{name}.parquet"),
                    "--no-progress",
                ],
                log,
            )
    common = [
        f"model.qwen3_model_path={base}",
        f"model.database_init_path={knowledge}",
        f"model.cache_path={out / 'bank_all.parquet'}",
    ]

    # ---- 3. train
    run_dir = out / "run"
    t0 = time.time()
    run(
        [
            py,
            "ray_jobs/sft.py",
            *common,
            f"dataset.sft_dataset_path={out / 'train.parquet'}",
            f"dataset.sft_val_dataset_path={out / 'val.parquet'}",
            f"training.output_dir={run_dir}",
            f"training.epochs={args.epochs}",
            "training.max_eval_samples=500",
            "eval.memory_checks=false",  # (a), (c), (d) below, through ray_jobs/evaluate.py
            *args.extra,
        ],
        log,
    )
    train_s = time.time() - t0
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    tok_s = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]

    # ---- 4. evaluate
    weights = run_dir / "sft_latest"
    ev = [py, "ray_jobs/evaluate.py", *common, "training.torch_threads=2"]
    if args.max_eval:
        ev.append(f"eval.max_samples={args.max_eval}")
    data = f"eval.data={out / 'val.parquet'}"
    bare = last_json(run(ev + [data], log))
    trained = last_json(run(ev + [data, f"eval.weights={weights}"], log))
    val_uuids = {i["target"][0]["uuid"] for i in val_items}
    with open(out / "knowledge_without_val.jsonl", "w", encoding="utf-8") as fh:
        for u, text in sentences.items():
            if u not in val_uuids:
                fh.write(json.dumps({"uuid": u, "text": text}, ensure_ascii=False) + "\n")
    ablated = last_json(
        run(
            [
                py,
                "ray_jobs/evaluate.py",
                f"model.qwen3_model_path={base}",
                f"model.database_init_path={out / 'knowledge_without_val.jsonl'}",
                f"model.cache_path={out / 'bank_without_val.parquet'}",
                "model.recompute_cache=true",
                "training.torch_threads=2",
                data,
                f"eval.weights={weights}",
            ]
            + ([f"eval.max_samples={args.max_eval}"] if args.max_eval else []),
            log,
        )
    )
    # (d) every held-out sentence names a wrong option of its question; the "right" answer is now that option.
    edited_items, edited_sentences, n_editable = [], dict(sentences), 0
    for item in val_items:
        t = item["target"][0]
        rec = parse_target(t)
        changed = edited_fact(sentences.get(t["uuid"], ""), rec["options"], rec["answer_index"], t["uuid"])
        if changed is None:
            continue
        text, pick = changed
        edited_sentences[t["uuid"]] = text
        edited_items.append({"target": [dict(t, correct_answer=f"{LABELS[pick]}:{rec['options'][pick]}")]})
        n_editable += 1
    json.dump(edited_items, open(out / "val_edited.json", "w"), ensure_ascii=False)
    with open(out / "knowledge_edited.jsonl", "w", encoding="utf-8") as fh:
        for u, text in edited_sentences.items():
            fh.write(json.dumps({"uuid": u, "text": text}, ensure_ascii=False) + "\n")
    edited = last_json(
        run(
            [
                py,
                "ray_jobs/evaluate.py",
                f"model.qwen3_model_path={base}",
                f"model.database_init_path={out / 'knowledge_edited.jsonl'}",
                f"model.cache_path={out / 'bank_edited.parquet'}",
                "model.recompute_cache=true",
                "training.torch_threads=2",
                f"eval.data={out / 'val_edited.json'}",
                f"eval.weights={weights}",
            ]
            + ([f"eval.max_samples={args.max_eval}"] if args.max_eval else []),
            log,
        )
    )

    per_relation = trained.get("per_predicate", {})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rel = sorted(per_relation.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(rel))))
        ax.barh([r[:50] for r, _ in rel], [v for _, v in rel])
        ax.axvline(0.25, color="grey", linestyle="--", label="chance")
        ax.set_xlabel("held-out accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy_per_relation.png", dpi=90)
    except Exception as e:  # noqa: BLE001 - the chart is a convenience
        print(f"no chart: {e}")
    result = {
        "train_questions": len(train_items),
        "heldout_questions": len(val_items),
        "bank_rows": len(sentences),
        "a_bare_backbone_accuracy": bare["accuracy"],
        "b_trained_accuracy": trained["accuracy"],
        "c_without_heldout_sentences_accuracy": ablated["accuracy"],
        "b_memory_read": trained.get("memory_read"),
        "c_memory_read": ablated.get("memory_read"),
        "d_edit_following": edited["accuracy"],
        "d_edited_questions": n_editable,
        "e_recall@1": trained.get("recall@1"),
        "e_recall@k": trained.get("recall@k"),
        "training_seconds": round(train_s, 1),
        "tokens_per_s": round(sum(tok_s[-5:]) / max(len(tok_s[-5:]), 1), 1),
        "per_relation": per_relation,
        "chart": str(out / "accuracy_per_relation.png"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
