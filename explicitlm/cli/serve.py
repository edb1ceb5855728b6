"""`explicitlm-serve`: the /answer app under plain uvicorn (`python -m serving`), installed.

    explicitlm-serve serve.weights=runs/default/sft_latest [serve.port=8000] [key=value ...]

Edits (PUT /memory/rows/{uuid}, POST /memory/rows) and search need EXPLICITLM_API_KEY in the
environment. Ray Serve: `serve run configs/serve/serve.yaml`.
"""

from __future__ import annotations

from explicitlm.cli import command
from explicitlm.cli.options import Program, load_cli

PROGRAM = Program(
    "explicitlm-serve",
    "Serve POST /answer and the memory endpoints (GET /memory, GET /memory/rows/{uuid}; edits and "
    "/memory/search with EXPLICITLM_API_KEY) under uvicorn.",
    keys=("serve", "model"),
    required=("serve.weights",),
)


def run(argv: list[str]) -> None:
    load_cli(argv, PROGRAM)  # --help, and config mistakes in this program's words, before the server loads
    from serving.__main__ import main as serve

    serve(argv)


def main(argv: list[str] | None = None) -> int:
    return command(PROGRAM.name, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
