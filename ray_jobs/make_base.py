"""Build the tiny Qwen3 (tokenizer trained locally + random weights) that the embedded default uses.

    python ray_jobs/make_base.py --output runs/base [--text FILE ...] [--seed 0]

`AutoModelForCausalLM.from_pretrained(OUTPUT)` and `AutoTokenizer.from_pretrained(OUTPUT)` load it,
through the same code path as a downloaded Qwen3. Same seed and text give byte-identical files.
"""

from __future__ import annotations

import argparse

from explicitlm.base import make_base
from explicitlm.readers import read_texts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the model and tokenizer to")
    p.add_argument(
        "--text",
        nargs="*",
        default=None,
        help="text files (plain, JSON or JSONL) to train the tokenizer on; default: the sample world",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)
    texts = read_texts(args.text) if args.text else None
    out = make_base(
        args.output,
        texts,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
    )
    print(f"make_base: wrote a tiny Qwen3 to {out}")


if __name__ == "__main__":
    main()
