"""Choose the memory gate's settings on the dev split: `model.match_power` and `model.min_match`.

    python benchmarks/tune_gate.py --out /tmp/explicitlm-quality      # after quality.py --split dev

With the weights `benchmarks/quality.py` trained, for each match power: every dev question in the
pack's wording and the three unseen wordings, against the bank with its sentence (memory should be
read) and without it (memory should stay off); each layer's match is recorded. For each threshold
the last line reports, per wording, the share of layers that read memory with the sentence present
and absent, and the setting whose worst wording does best on both (read with >= off without).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/explicitlm-quality")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument("--powers", default="1,2,3")
    p.add_argument("--max-eval", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from explicitlm.bank import MemoryBank
    from explicitlm.config import load_config
    from explicitlm.loading import build_model, fill_from_weights
    from explicitlm.objective import record_question
    from explicitlm.scoring import score_questions
    from explicitlm.split import subject_side

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    weights = str(out / "run" / "sft_latest")
    wordings = json.load(open(args.wordings))
    facts = [f for f in quality.load_pack(Path(args.pack)) if f["predicate_id"] in wordings]
    side = {f["uuid"]: subject_side(f["subject"], {"test": 0.15, "dev": 0.15}) for f in facts}
    train = [f for f in facts if side[f["uuid"]] == "train"]
    dev = sorted((f for f in facts if side[f["uuid"]] == "dev"), key=lambda f: quality.pick(f["uuid"], 1 << 30))
    dev = dev[: args.max_eval]
    tok = AutoTokenizer.from_pretrained(out / "base")
    cfg = fill_from_weights(load_config(None, [f"model.qwen3_model_path={out / 'base'}"]), weights)
    banks = {
        "with": [{"uuid": f["uuid"], "text": f["sentence"]} for f in train + dev],
        "without": [{"uuid": f["uuid"], "text": f["sentence"]} for f in train],
    }
    forms = {"pack": lambda f: f["target"]["question"]}
    for form in quality.FORMS:
        forms[form] = lambda f, form=form: quality.worded(wordings[f["predicate_id"]]["test"][form], f["subject"])
    matches: dict = {}
    for power in [float(x) for x in args.powers.split(",")]:
        c = replace(cfg, model=replace(cfg.model, match_power=power, min_match=0.0))
        for name, rows in banks.items():
            _, model = build_model(c, adapter=weights, bank=MemoryBank.build(rows, tok, c.model.knowledge_length))
            for form, q in forms.items():
                questions = [record_question(quality.record(f, q(f))) for f in dev]
                scored = score_questions(model, tok, questions, c.model.max_seq_len)
                matches[(power, name, form)] = torch.tensor([s.match for s in scored])  # (questions, layers)
    table, best = [], None
    for power in [float(x) for x in args.powers.split(",")]:
        for threshold in [x / 20 for x in range(6, 19)]:
            row = {"match_power": power, "min_match": threshold}
            for form in forms:
                on = (matches[(power, "with", form)] >= threshold).float().mean().item()
                off = (matches[(power, "without", form)] < threshold).float().mean().item()
                row[form] = {"read_with": round(on, 3), "off_without": round(off, 3)}
            row["worst"] = min(min(v["read_with"], v["off_without"]) for k, v in row.items() if k in forms)
            table.append(row)
            if best is None or row["worst"] > best["worst"]:
                best = row
    for row in table:
        print(json.dumps(row))
    print(json.dumps({"dev_questions": len(dev), "best": best}))


if __name__ == "__main__":
    main()
