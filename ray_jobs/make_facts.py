"""Write the sample world: real geography facts as OMCQ questions and memory sentences.

    python ray_jobs/make_facts.py --output runs/data [--seed 0] [--max-facts N] [--min-options 3 --max-options 5]

Writes `omcq.json` (the reference format: one JSON array of {"target": [...]}) and
`knowledge.jsonl` ({"uuid", "text", ...}); a question's uuid is the uuid of its sentence.
"""

from __future__ import annotations

import argparse

from explicitlm.world import write_world


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-facts", type=int, default=0, help="sample this many facts (0: all)")
    p.add_argument("--min-options", type=int, default=4)
    p.add_argument("--max-options", type=int, default=4)
    args = p.parse_args(argv)
    paths = write_world(args.output, args.seed, args.max_facts, args.min_options, args.max_options)
    print(f"make_facts: wrote {paths['omcq']} and {paths['knowledge']}")


if __name__ == "__main__":
    main()
