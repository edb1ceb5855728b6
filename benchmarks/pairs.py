"""Where a quality run's (g) answers name the second fact's object: by pair of relations, and by how
often training met that pair.

    python benchmarks/pairs.py --out /tmp/q-dev [--system model] [--top 12]

Reads `<out>/answers/g.jsonl` (the answers `benchmarks/quality.py` keeps) and rebuilds, from the same
pack and wordings file (quality.py's defaults), each question's second fact and, for the training
split, how many training facts have a second fact in the same pair of relations (quality.py trains on
all of them unless `--max-train` cut it). Prints the pairs whose questions most often named o', then
one JSON line: for each bucket of training counts, the questions in it and the share naming o'.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = ((0, 0), (1, 9), (10, 49), (50, 199), (200, None))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a quality.py output folder (its answers/g.jsonl)")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument("--system", default="model", help="whose answers: model, model_no_exclusion, untrained, rule, bm25")
    p.add_argument("--top", type=int, default=12, help="pairs printed, most answers naming o' first")
    args = p.parse_args(argv)
    from benchmarks.quality import HELD_OUT, Facts
    from explicitlm.errors import UserError
    from explicitlm.factsets import load_pack, load_wordings
    from explicitlm.split import subject_side

    answers = Path(args.out) / "answers" / "g.jsonl"
    if not answers.exists():
        raise UserError(f"{answers} does not exist: run benchmarks/quality.py with set g into --out first")
    wordings, _ = load_wordings(args.wordings)
    facts = [f for f in load_pack(args.pack) if f["predicate_id"] in wordings]
    world, by_uuid = Facts(facts, wordings, {}), {f["uuid"]: f for f in facts}
    trained: Counter = Counter()
    for f in facts:
        if subject_side(f["subject"], HELD_OUT) == "train" and (s := world.second(f)):
            trained[f["predicate_id"], s["predicate_id"]] += 1
    asked, named = Counter(), Counter()
    for line in open(answers, encoding="utf-8"):
        a = json.loads(line)
        f = by_uuid.get(a["uuid"])
        s = world.second(f) if f is not None else None
        if s is None or s["object"] not in a["options"]:
            raise UserError(f"{answers}: question {a['uuid']} does not fit this pack and wordings file")
        pair = (f["predicate_id"], s["predicate_id"])
        asked[pair] += 1
        named[pair] += a[args.system] == a["options"].index(s["object"])
    for pair, n in sorted(asked.items(), key=lambda kv: (-named[kv[0]], kv[0]))[: args.top]:
        print(
            f"{pair[0]} beside {pair[1]}: {named[pair]} of {n} named o' (training met the pair {trained[pair]} times)"
        )
    buckets = {}
    for lo, hi in BUCKETS:
        inside = [pair for pair in asked if trained[pair] >= lo and (hi is None or trained[pair] <= hi)]
        n = sum(asked[pair] for pair in inside)
        label = f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"
        buckets[label] = {"questions": n, "named": round(sum(named[pair] for pair in inside) / n, 3) if n else None}
    total = sum(asked.values())
    print(
        json.dumps(
            {
                "system": args.system,
                "questions": total,
                "pairs": len(asked),
                "named": round(sum(named.values()) / max(total, 1), 3),
                "by_training_count": buckets,
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from explicitlm.cli import command

    sys.exit(command("pairs.py", main))
