"""Lifelong editing through HTTP: reliability, generalisation and locality after T edits, one at a time.

    python benchmarks/edits.py --weights DIR [--pack ../shared/data/real_omcq_train]
        [--wordings benchmarks/wordings.json] [--steps 100,1000,10000] [--locality 1500] [--open]

The server is `python -m serving` on the weights, on its own copy of their bank. The edits are
counterfactual: each takes a question of the pack whose fact has a bank row naming the answer, and
rewrites that row to name another option of the question (`explicitlm.evaluation.edited_fact`,
picked by a hash of the uuid). Questions about held-out subjects (the subject split of
`explicitlm.split`, 20%) come first, then the others; the first 1,500 are never edited and measure
locality. Edits are sent one at a time (PUT /memory/rows/{uuid}), and after the first T
of them (T cumulative: 100, then 1,000, then 10,000):
- reliability: the T edited questions, in the pack's wording, answered with the new object;
- generalisation: the same facts asked in the wordings' `test` set (each of its wordings, same
  options), answered with the new object; the mean over wordings, and each;
- locality: the unedited questions answered with the option they got before any edit; of those
  whose answer moved, the share with an edited row among the five rows the reader weighed most
  (/answer's "memory"; a row there may still have had little weight, so this is an upper bound on
  moves through reading an edited row, to compare with the share of the bank edited);
  `locality_unrelated`: the same over the unedited questions none of whose subject's facts in the
  same relation was edited (where a relation holds many objects, "twinned with", "shares a border
  with", an edit to one of the subject's others gives the question a new right answer);
  (--score-sample N: reliability and generalisation on a fixed random sample of N of the T);
- seconds per edit: the client's wall time of the edits since the previous T, and p50/p99 latency.
Before any edit it records the accuracy on the original objects of 500 of the edited facts, in every
wording, for context.

--open: questions without options, answers generated. Each row is edited to another object of its
relation that is not among the question's options and not true of its subject
(`explicitlm.factsets.new_object`); an answer follows the edit when it is the new object (exact match
after normalisation, `explicitlm.evaluation.exact_match`), and locality asks that an unedited
question's generated text stay as it was.
One JSON line per T, then one JSON object with all of them as the last line. With --out, each T's
moved unedited answers go to `moved_T.jsonl` there: the question, its answer before and after, and
the rows it weighed most (uuid, text, score: its weight, whether edited).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from explicitlm.data import parse_target
from explicitlm.evaluation import edited_fact, exact_match
from explicitlm.split import subject_split

ROOT = Path(__file__).resolve().parent.parent
KEY = os.environ.get("EXPLICITLM_API_KEY", "edits-benchmark-key")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edit_set(
    pack: Path, wordings: dict, forms: tuple[str, ...], bank_texts: dict[str, str], n_locality: int, seed: int = 0
):
    """(edits, locality): edits are dicts with the question, the options, the new sentence, the new
    object's index and the other wordings (the test wordings `forms` names); locality questions are
    never edited."""
    triples = {t["uuid"]: t for t in map(json.loads, open(pack / "triples_train.jsonl", encoding="utf-8"))}
    held_out, rest = [], []
    for item in json.load(open(pack / "omcq_train.json", encoding="utf-8")):
        rec = parse_target(item["target"][0])
        fact = triples.get(rec["uuid"])
        text = bank_texts.get(rec["uuid"])
        if fact is None or text is None or fact["predicate_id"] not in wordings:
            continue
        rec["subject"], rec["pid"] = fact["subject"], fact["predicate_id"]
        rec["sentence"] = text
        (held_out if subject_split(fact["subject"], 0.2) == "val" else rest).append(rec)
    rng = random.Random(seed)
    rng.shuffle(held_out)
    rng.shuffle(rest)
    ordered = held_out + rest  # held-out subjects first, when the bank has their sentences
    locality, pool = ordered[:n_locality], ordered[n_locality:]
    edits = []
    for rec in pool:
        changed = edited_fact(rec["sentence"], rec["options"], rec["answer_index"], rec["uuid"])
        if changed is None:
            continue
        other = {kind: wordings[rec["pid"]]["test"][kind].format(s=rec["subject"]) for kind in forms}
        edits.append({**rec, "new_text": changed[0], "new_index": changed[1], "wordings": other})
    return edits, locality


def open_edit_set(
    pack: Path, wordings: dict, forms: tuple[str, ...], bank_texts: dict[str, str], n_locality: int, seed: int = 0
):
    """edit_set for answers without options: each edit names an object that is not an option."""
    from explicitlm.factsets import load_pack, new_object, objects_by_relation, true_objects

    facts = [f for f in load_pack(pack) if f["uuid"] in bank_texts and f["predicate_id"] in wordings]
    objects, truth = objects_by_relation(facts), true_objects(facts)
    held_out, rest = [], []
    for f in facts:
        (held_out if subject_split(f["subject"], 0.2) == "val" else rest).append(f)
    rng = random.Random(seed)
    rng.shuffle(held_out)
    rng.shuffle(rest)
    ordered = held_out + rest
    records = []
    for f in ordered:
        rec = parse_target(f["target"])
        rec.update(subject=f["subject"], pid=f["predicate_id"], sentence=bank_texts[f["uuid"]])
        records.append((f, rec))
    locality = [rec for _, rec in records[:n_locality]]
    edits = []
    for f, rec in records[n_locality:]:
        changed = new_object(dict(f, sentence=rec["sentence"]), objects, truth)
        if changed is None:
            continue
        other = {kind: wordings[rec["pid"]]["test"][kind].format(s=rec["subject"]) for kind in forms}
        edits.append({**rec, "new_text": changed[0], "new_object": changed[1], "wordings": other})
    return edits, locality


async def answer_all(url: str, questions: list[dict], clients: int = 32, read: list | None = None) -> list:
    """The chosen option's index for each {"question", "options"}, in order, or the generated text
    of each {"question"}; None on an error. Given `read`, a list as long, fills it with the rows each
    answer weighed most (/answer's "memory": uuid, text and score, its weight, of each)."""
    out: list = [None] * len(questions)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(questions)):
        queue.put_nowait(i)
    errors: list[str] = []

    async def client(session) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with session.post(url + "/answer", json=questions[i]) as r:
                body = await r.json()
                if r.status == 200:
                    out[i] = body["index"] if questions[i].get("options") else body["text"]
                    if read is not None:
                        read[i] = body["memory"]
                elif len(errors) < 5:
                    errors.append(f"{r.status}: {body}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    if errors:
        print(f"answer errors (first {len(errors)}): {errors}", file=sys.stderr)
    return out


def ask(url: str, questions: list[dict], read: list | None = None) -> list:
    return asyncio.run(answer_all(url, questions, read=read))


def share(hits: list[bool]) -> float:
    return round(sum(hits) / max(len(hits), 1), 4)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True, help="a weights folder (adapter_config.json names backbone and bank)")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument("--steps", default="100,1000,10000", help="edit counts T at which to measure (cumulative)")
    p.add_argument("--locality", type=int, default=1500, help="unedited questions for locality")
    p.add_argument("--out", default="", help="folder for the server's bank copy (default: a temporary folder)")
    p.add_argument("--extra", nargs="*", default=[], help="more server overrides (key=value)")
    p.add_argument(
        "--score-sample",
        type=int,
        default=0,
        help="score reliability and generalisation on at most this many of the T edited facts, a fixed "
        "random sample (0: all of them)",
    )
    p.add_argument("--open", action="store_true", help="questions without options; edits to objects not offered")
    args = p.parse_args(argv)
    pack, wordings_path = Path(args.pack), Path(args.wordings)
    if not (pack / "omcq_train.json").exists() or not (pack / "triples_train.jsonl").exists():
        print(json.dumps({"skipped": True, "reason": f"no pack at {pack}"}))
        return
    from explicitlm.factsets import load_wordings

    wordings, forms = load_wordings(wordings_path)  # a missing or malformed file: one line, exit 2
    steps = sorted(int(x) for x in args.steps.split(","))

    from explicitlm.bank import MemoryBank
    from explicitlm.config import load_config
    from explicitlm.loading import fill_from_weights

    cfg = fill_from_weights(load_config(None, [f"serve.weights={args.weights}"]), args.weights)
    bank = MemoryBank.load(cfg.model.cache_path)
    edit_sets = open_edit_set if args.open else edit_set
    edits, locality = edit_sets(pack, wordings, forms, dict(zip(bank.uuids, bank.texts)), args.locality)
    del bank
    if len(edits) < steps[-1]:
        print(f"only {len(edits)} editable facts: measuring up to that many", file=sys.stderr)
        steps = [t for t in steps if t < len(edits)] + [len(edits)]
    folder = Path(args.out or tempfile.mkdtemp(prefix="explicitlm-edits-"))
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("bank.parquet*"):
        f.unlink()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            f"serve.weights={args.weights}",
            f"serve.cache_path={folder / 'bank.parquet'}",
            f"serve.port={port}",
            *args.extra,
        ],
        cwd=ROOT,
        env={**os.environ, "EXPLICITLM_API_KEY": KEY},
        stdout=open(folder / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        deadline = time.time() + 1800
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start; see {folder / 'server.log'}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        kinds = list(forms)
        used = edits[: steps[-1]]

        def asked(r, question=None):
            q = question or r["question"]
            return {"question": q} if args.open else {"question": q, "options": r["options"]}

        def pack_q(r):
            return asked(r)

        def right(got, r, edited: bool) -> bool:
            if args.open:
                return got is not None and exact_match(
                    got, r["new_object"] if edited else r["options"][r["answer_index"]]
                )
            return got == (r["new_index"] if edited else r["answer_index"])

        # Before any edit: locality's reference answers, and accuracy on the original facts.
        t0 = time.time()
        local_before = ask(url, [pack_q(r) for r in locality])
        sample = used[: min(len(used), 500)]
        before = {"pack": share([right(g, r, False) for g, r in zip(ask(url, [pack_q(r) for r in sample]), sample)])}
        for kind in kinds:
            got = ask(url, [asked(r, r["wordings"][kind]) for r in sample])
            before[kind] = share([right(g, r, False) for g, r in zip(got, sample)])
        print(f"before edits ({time.time() - t0:.0f} s): accuracy on original facts {before}", flush=True)
        done = 0
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            for T in steps:
                latencies = []
                t0 = time.time()
                for r in used[done:T]:
                    t = time.perf_counter()
                    resp = c.put(url + f"/memory/rows/{r['uuid']}", json={"text": r["new_text"]})
                    latencies.append(time.perf_counter() - t)
                    if resp.status_code != 200:
                        raise SystemExit(f"edit of {r['uuid']} failed: {resp.status_code} {resp.text}")
                wall = time.time() - t0
                n_new, done = T - done, T
                edited = used[:T]
                if args.score_sample and T > args.score_sample:
                    edited = random.Random(T).sample(edited, args.score_sample)
                reliability = share([right(g, r, True) for g, r in zip(ask(url, [pack_q(r) for r in edited]), edited)])
                general = {}
                for kind in kinds:
                    got = ask(url, [asked(r, r["wordings"][kind]) for r in edited])
                    general[kind] = share([right(g, r, True) for g, r in zip(got, edited)])
                local_read: list = [[]] * len(locality)
                local_after = ask(url, [pack_q(r) for r in locality], local_read)
                moved = [i for i, (a, b) in enumerate(zip(local_before, local_after)) if a != b and None not in (a, b)]
                edited_uuids = {r["uuid"] for r in used[:T]}
                # A subject's other facts in the same relation (cities twinned with Madrid, a country's
                # neighbours) answer its question too: edited, they give it a new right answer.
                edited_pairs = {(r["subject"], r["pid"]) for r in used[:T]}
                apart = [i for i, r in enumerate(locality) if (r["subject"], r["pid"]) not in edited_pairs]
                kept = [a == b and a is not None for a, b in zip(local_before, local_after)]
                latencies.sort()
                row = {
                    "edits": T,
                    "scored_edits": len(edited),
                    "reliability": reliability,
                    "generalisation": round(sum(general.values()) / len(general), 4),
                    "generalisation_per_wording": general,
                    "locality": share(kept),
                    # the same over the questions none of whose subject's facts in that relation was edited
                    "locality_unrelated": share([kept[i] for i in apart]),
                    "locality_unrelated_questions": len(apart),
                    # of the unedited questions whose answer moved, the share with an edited row among
                    # the rows the reader weighed most (/answer's "memory": its top 5); None if none moved
                    "moved_reading_edited_rows": share(
                        [any(m["uuid"] in edited_uuids for m in local_read[i]) for i in moved]
                    )
                    if moved
                    else None,
                    "seconds_per_edit": round(wall / max(n_new, 1), 4),
                    "edit_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                    "edit_p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                    "bank_version": httpx.get(url + "/memory").json()["version"],
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # each moved answer, before and after, with the rows it weighed most
                    with open(folder / f"moved_{T}.jsonl", "w") as f:
                        for i in moved:
                            rows = [{**m, "edited": m["uuid"] in edited_uuids} for m in local_read[i]]
                            moved_row = {**pack_q(locality[i]), "before": local_before[i], "after": local_after[i]}
                            f.write(json.dumps({**moved_row, "memory": rows}) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=300)
        if not args.out:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        json.dumps(
            {
                "weights": args.weights,
                "mode": "open" if args.open else "choice",
                "editable_facts": len(edits),
                "locality_questions": len(locality),
                "accuracy_before_edits": before,
                "steps": results,
            }
        )
    )


if __name__ == "__main__":
    from explicitlm.cli import command

    sys.exit(command("edits.py", main))
