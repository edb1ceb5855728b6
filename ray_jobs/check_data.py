"""Look at converted SFT data the way the model will see it.

    python ray_jobs/check_data.py --data-path sft.jsonl --qwen3-model-path DIR [--n 3] [--max-seq-len 512]

Renders a few records with the backbone's chat template, marks the tokens that carry loss ([...])
and the question tokens the memory query reads ({...}), then prints token-length statistics, how
many records would lose answer tokens at the sequence limit and the answer-letter distribution.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def run(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from explicitlm.data import LABELS
    from explicitlm.loading import check_backbone
    from explicitlm.objective import encode_record
    from explicitlm.readers import read_records
    from explicitlm.tracking import quiet_process

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True)
    p.add_argument("--qwen3-model-path", required=True)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=512)
    args = p.parse_args(argv)
    quiet_process()
    check_backbone(args.qwen3_model_path, "--qwen3-model-path")
    records = read_records(args.data_path)
    tok = AutoTokenizer.from_pretrained(args.qwen3_model_path)
    lengths, letters, cut = [], Counter(), 0
    for i, rec in enumerate(records):
        full = encode_record(tok, rec, 10**9)
        lengths.append(len(full.input_ids))
        letters[LABELS[int(rec["answer_index"])]] += 1
        cut += int(encode_record(tok, rec, args.max_seq_len).truncated)
        if i < args.n:
            # Decode runs of tokens with the same role together, so multi-byte characters stay whole.
            pieces, run, role = [], [], None
            for t, loss, q in zip(full.input_ids + [None], full.loss_mask + [0], full.query_mask + [0]):
                r = "loss" if loss else "query" if q else ""
                if (r != role or t is None) and run:
                    text = tok.decode(run)
                    pieces.append(f"[{text}]" if role == "loss" else f"{{{text}}}" if role == "query" else text)
                    run = []
                role = r
                if t is not None:
                    run.append(t)
            print(f"--- record {i} (uuid {rec.get('uuid', '')}): [loss]  {{query}}\n{''.join(pieces)}\n")
    lengths.sort()

    def pct(q: float) -> int:
        return lengths[min(int(q * len(lengths)), len(lengths) - 1)] if lengths else 0

    stats = {
        "records": len(records),
        "tokens_p50": pct(0.5),
        "tokens_p95": pct(0.95),
        "tokens_max": lengths[-1] if lengths else 0,
        "answer_cut_at_max_seq_len": cut,
        "max_seq_len": args.max_seq_len,
        "answer_letters": dict(sorted(letters.items())),
    }
    print(json.dumps(stats))
    return stats


def main(argv: list[str] | None = None) -> int:
    from explicitlm.cli import command

    return command("check_data", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
