"""Run the /answer app under plain uvicorn.

    python -m serving serve.weights=runs/default/sft_latest [serve.port=8000] [key=value ...]
    python -m serving --config-name serve/local

Editing and searching memory (PUT /memory/rows/{uuid}, POST /memory/rows, GET /memory/search) need
EXPLICITLM_API_KEY in the environment. The server's bank is serve.cache_path (by default a copy of the
training bank under {serve.weights}/serving/); SIGTERM writes it up to date before exiting.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from explicitlm.config import parse_cli
    from serving.app import create_app
    from serving.local import LocalBackend
    from serving.service import RequestLimits

    cfg = parse_cli(argv)
    if not cfg.serve.weights:
        print("config error: serve.weights is required (a folder written by ray_jobs/sft.py)", file=sys.stderr)
        raise SystemExit(2)
    from explicitlm.errors import UserError
    from serving.store import StoreError

    try:
        backend = LocalBackend(cfg)
    except (StoreError, UserError, FileNotFoundError, ValueError, RuntimeError) as e:  # a bank in use, a missing file
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    from serving.app import API_KEY_ENV

    store = backend.store
    edits = "on" if backend.api_key else f"off (no {API_KEY_ENV}, no serve.api_key_file)"
    bank = store.bank
    cut, *examples = bank.cuts.lines(len(bank), bank.knowledge_length)
    print(
        f"serve: weights {cfg.serve.weights} (adapter {backend.adapter}), {backend.dtype} on {backend.device}; "
        f"bank {store.path} ({len(bank):,} rows of {bank.knowledge_length} tokens, version {store.version}; {cut}); "
        f"edits {edits}; http://{cfg.serve.host}:{cfg.serve.port}",
        flush=True,
    )
    for line in examples:
        print(f"serve: {line}", flush=True)
    app = create_app(backend, RequestLimits.from_config(cfg))
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")


if __name__ == "__main__":
    main()
