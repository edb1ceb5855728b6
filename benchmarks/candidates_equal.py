"""Whether two checkouts retrieve the same candidates, to the bit, at 2^20 rows.

    python benchmarks/candidates_equal.py --other /path/to/other/checkout [--split dev]

A change meant as a rewrite (the same results in less time) is checked with it. For the questions
and the bank of `benchmarks/memory.py` (run that first: it builds and caches the bank), each checkout
runs `find_candidates` with the model's settings (the index's 64 candidates and the inverted lists'
128, the best 16 read) in its own process, importing its own `explicitlm`, and writes every question's
rows, validity and lexical features (safetensors). The last line is one JSON object: whether the two
are equal, and the largest difference of the lexical features (where the rows are equal); the exit
status is 1 when they are not. Both read the same cached index (memory.py's), so a change to how the
index is built is not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dump(args) -> None:
    """In a process whose explicitlm is the checkout's (PYTHONPATH): every question's candidates."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from explicitlm.bank import MemoryBank
    from explicitlm.config import ModelConfig
    from explicitlm.data import collate, encode, render_open_answer
    from explicitlm.index import bank_index
    from explicitlm.postings import Postings
    from explicitlm.retrieval import find_candidates

    # Every explicitlm module from the checkout: an editable install resolves a module the checkout
    # lacks from its own folder, which would compare a mixture.
    loaded = {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "explicitlm"}
    outside = sorted(n for n, f in loaded.items() if f and not Path(f).resolve().is_relative_to(Path(args.root)))
    if outside:
        raise SystemExit(f"{', '.join(outside)} loaded from outside {args.root}")
    print(f"candidates from {args.root} ({len(loaded)} modules)", flush=True)
    torch.set_num_threads(args.threads)
    questions = json.loads(Path(args.questions).read_text())
    out, cfg = Path(args.out), ModelConfig()
    bank_path = out / f"bank_{args.rows}.parquet"
    bank = MemoryBank.load(bank_path)
    index = bank_index(
        bank, cfg.knowledge_dim, 0, cfg.max_cell_rows, cfg.max_recent_rows, f"{bank_path}.index.safetensors"
    )
    postings = Postings.build(bank.word_ids)
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    encoded = [encode(tokenizer, q, q, render_open_answer("x"), "x", 512) for q in questions]
    batch = collate(encoded, tokenizer.pad_token_id)
    asked = batch["query_index"] >= 0
    words = batch["words"].gather(1, batch["query_index"].clamp(min=0)) * asked
    parts = {"rows": [], "valid": [], "lexical": []}
    for i in range(0, len(words), 256):
        c = find_candidates(
            bank, index, words[i : i + 256], cfg.candidates, cfg.top_k, cfg.top_cells, cfg.probe_cells, 0, 0,
            postings=postings, posting_rows=cfg.posting_rows,
        )  # fmt: skip
        for name in parts:
            parts[name].append(getattr(c, name))
    save_file({name: torch.cat(p).contiguous() for name, p in parts.items()}, args.dump)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", help="the other checkout's root folder")
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--split", choices=("dev", "test"), default="test")
    p.add_argument("--facts", type=int, default=500, help="held-out facts asked, in each of four wordings")
    p.add_argument("--pack", default=str(ROOT.parent / "shared" / "data" / "real_omcq_train"))
    p.add_argument("--wordings", default=str(ROOT / "benchmarks" / "wordings.json"))
    p.add_argument("--out", default="/tmp/explicitlm-memory", help="memory.py's --out: its bank and base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--questions", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dump:
        return dump(args)
    if not args.other:
        p.error("--other is required")
    if not (Path(args.pack) / "triples_train.jsonl").exists():
        print(json.dumps({"skipped": True, "reason": f"no pack at {args.pack}"}))
        return
    if not (Path(args.out) / f"bank_{args.rows}.parquet").exists():
        print(json.dumps({"skipped": True, "reason": f"no bank in {args.out}: run benchmarks/memory.py first"}))
        return
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))  # benchmarks.memory (only here: a dump imports its checkout's explicitlm)
    from benchmarks.memory import questions_and_bank

    questions = questions_and_bank(args)[0]  # this checkout's, asked of both
    common = ["--rows", str(args.rows), "--out", args.out, "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "questions.json").write_text(json.dumps(questions))
        got = []
        for name, root in (("this", ROOT), ("other", Path(args.other).resolve())):
            path = str(Path(tmp) / f"{name}.safetensors")
            cmd = [sys.executable, __file__, *common, "--questions", str(Path(tmp) / "questions.json")]
            cmd += ["--root", str(root), "--dump", path]
            path_before = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *([path_before] if path_before else [])])}
            subprocess.run(cmd, check=True, cwd=tmp, env=env)
            got.append(load_file(path))
    a, b = got
    equal = {name: torch.equal(a[name], b[name]) for name in a}
    result = {
        "questions": len(questions),
        "all_equal": all(equal.values()),
        "equal": equal,
        # Features of the same rows only: where the rows differ, their features are not comparable.
        "lexical_max_difference": float((a["lexical"] - b["lexical"]).abs().max()) if equal["rows"] else None,
    }
    print(json.dumps(result))
    if not result["all_equal"]:
        sys.exit(1)


if __name__ == "__main__":
    from explicitlm.cli import command

    sys.exit(command("candidates_equal.py", main))
