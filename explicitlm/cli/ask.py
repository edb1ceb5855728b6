"""Ask a question, get an answer: the quick start.

    explicitlm-ask --weights runs/default/sft_latest "What is the capital of France?"
    explicitlm-ask --weights runs/default/sft_latest "What is the capital of France?" \
        --options "A:Paris,B:Rome,C:Oslo,D:Lima"
    explicitlm-ask --weights runs/default/sft_latest          # interactive: a question, then its options

Without options it prints the answer generated from memory; with them, the chosen option and its
probability; then the memory rows the answer read (uuid and sentence, weighted over layers). The
backbone and the bank are the ones the weights recorded; --model and --bank take others (an edited
bank, say). Options are the reference's "A:x,B:y,..." string or texts separated by "|". Interactive
mode reads a question line and an options line (empty: no options) until an empty question or the
end of input, so it takes piped input too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from explicitlm.cli import command
from explicitlm.errors import UserError

NAME = "explicitlm-ask"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every expected mistake
        raise UserError(f"{message} (--help shows the usage)")


def parse_option_list(text: str) -> list[str]:
    """'A:Paris,B:Rome' or 'Paris | Rome' -> ['Paris', 'Rome']."""
    from explicitlm.data import RowError, parse_options

    text = text.strip()
    if "|" in text:
        options = [t.strip() for t in text.split("|")]
    else:
        try:
            options = parse_options(text)[1]
        except RowError as e:
            raise UserError(
                f"options {text[:60]!r} do not parse ({e}): write 'A:Paris,B:Rome' or 'Paris | Rome'"
            ) from None
    if len(options) < 2 or not all(options):
        raise UserError(f"give at least two non-empty options, got {options}")
    return options


class Asker:
    """The weights, their backbone and bank, loaded once; `ask` scores one question."""

    def __init__(self, weights: str, model: str = "", bank: str = "", top: int = 3, max_new_tokens: int = 24):
        from pathlib import Path

        from explicitlm.config import load_config
        from explicitlm.loading import build_model, fill_from_weights
        from explicitlm.pipeline import ensure_bank

        cfg = load_config()
        cfg.model.qwen3_model_path, cfg.model.cache_path = model, bank
        cfg = fill_from_weights(cfg, weights, backbone_key="--model")
        if not Path(cfg.model.cache_path or "").is_file():
            raise UserError(f"memory bank {cfg.model.cache_path!r} does not exist: give one with --bank")
        self.bank = ensure_bank(cfg)  # the bank file, checked against the backbone's tokenizer
        self.tokenizer, self.model = build_model(cfg, adapter=weights, bank=self.bank, bank_is_file=True)
        self.model.eval()
        self.cfg, self.top, self.max_new_tokens = cfg, top, max_new_tokens

    def ask(self, question: str, options: list[str] | None = None) -> dict[str, Any]:
        """One question: the option chosen among `options`, or without them the answer generated."""
        from explicitlm.data import LABELS
        from explicitlm.scoring import Question, generate_answers, memory_rows, score_questions

        if not question.strip():
            raise UserError("the question is empty")
        q = Question(question.strip(), options or [])
        if options:
            s = score_questions(self.model, self.tokenizer, [q], self.cfg.model.max_seq_len)[0]
            out = {
                "answer": f"{LABELS[s.index]}:{options[s.index]}",
                "label": LABELS[s.index],
                "index": s.index,
                "probability": s.probabilities[s.index],
                "options": options,
                "probabilities": s.probabilities,
            }
        else:
            s = generate_answers(self.model, self.tokenizer, [q], self.cfg.model.max_seq_len, self.max_new_tokens)[0]
            out = {"text": s.text, "finished": s.finished}
        return {
            "question": question.strip(),
            **out,
            "memory": memory_rows(self.bank, s, self.top),
            "memory_used": sum(s.used) > len(s.used) / 2,
            "memory_trust": sum(s.trust) / max(len(s.trust), 1),
            "layers_reading_memory": f"{sum(s.used)}/{len(s.used)}",
        }


def show(answer: dict[str, Any], out: TextIO) -> None:
    from explicitlm.data import LABELS

    if "options" in answer:
        print(f"answer: {answer['answer']}  (probability {answer['probability']:.3f})", file=out)
        for i, (text, p) in enumerate(zip(answer["options"], answer["probabilities"])):
            print(f"  {'>' if i == answer['index'] else ' '} {LABELS[i]}  {p:.3f}  {text}", file=out)
    else:
        print(f"answer: {answer['text']}" + ("" if answer["finished"] else "  (cut at the token limit)"), file=out)
    if answer["memory_used"]:
        head = (
            f"memory trusted by {answer['layers_reading_memory']} layers "
            f"(trust {answer['memory_trust']:.2f}; rows weighted over layers):"
        )
    else:
        head = (
            f"memory not trusted (trust {answer['memory_trust']:.2f}): no row it read answers the question, so "
            "the answer is the backbone's alone; the rows it read:"
        )
    print(head, file=out)
    for row in answer["memory"]:
        print(f"  {row['score']:.3f}  {row['uuid']}  {row['text']}", file=out)


def _interactive(asker: Asker, as_json: bool, stdin: TextIO, out: TextIO) -> None:
    prompt = stdin.isatty()
    while True:
        if prompt:
            print("question (empty to quit)> ", end="", file=sys.stderr, flush=True)
        question = stdin.readline()
        if not question.strip():
            return
        if prompt:
            print("options (A:x,B:y or x | y; empty: answer without options)> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        try:
            answer = asker.ask(question, parse_option_list(line) if line.strip() else None)
        except UserError as e:  # a typo should not end the session
            print(f"{NAME}: {e}", file=sys.stderr)
            continue
        if as_json:
            print(json.dumps(answer), file=out)
        else:
            show(answer, out)
        out.flush()


def run(argv: list[str] | None = None) -> int:
    p = _Parser(prog=NAME, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the question; without it, an interactive prompt")
    p.add_argument("--options", help="'A:Paris,B:Rome,...' or 'Paris | Rome | ...'; without: the answer is generated")
    p.add_argument("--weights", required=True, help="a weights folder: the sft_latest/ (or sft_best/) of a run")
    p.add_argument("--model", default="", help="backbone folder (default: the one the weights recorded)")
    p.add_argument("--bank", default="", help="memory bank file (default: the one the weights recorded)")
    p.add_argument("--top", type=int, default=3, help="memory rows to show (default 3)")
    p.add_argument(
        "--max-new-tokens", type=int, default=24, help="longest generated answer, without options (default 24)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per answer")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    args = p.parse_args(argv)
    options = parse_option_list(args.options) if args.options else None

    from explicitlm.tracking import quiet_process

    quiet_process()
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    asker = Asker(args.weights, args.model, args.bank, args.top, args.max_new_tokens)
    print(
        f"ask: {args.weights} on {asker.cfg.model.qwen3_model_path}, {len(asker.bank):,} memory rows "
        f"({asker.cfg.model.cache_path})",
        file=sys.stderr,
    )
    if args.question is None:
        _interactive(asker, args.json, sys.stdin, sys.stdout)
        return 0
    answer = asker.ask(args.question, options)
    if args.json:
        print(json.dumps(answer))
    else:
        show(answer, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command(NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
