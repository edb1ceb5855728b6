"""Throughput of POST /answer with dynamic batching vs batch size 1, 32 concurrent clients.

    python benchmarks/serve.py --weights runs/default/sft_latest [--clients 32] [--requests 8]

Starts the app under uvicorn on 127.0.0.1 twice in the same run (serve.max_batch_size=32, then 1),
sends `clients` x `requests` questions from the sample world, and prints throughput, p50/p99
latency and errors for both. The last line is one JSON object with the figures and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(weights: str, batch: int, questions: list[dict], clients: int, requests: int, threads: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving", f"serve.weights={weights}", f"serve.port={port}",
                             f"serve.max_batch_size={batch}", "serve.batch_wait_timeout_s=0.01",
                             f"training.torch_threads={threads}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(timeout=120) as c:  # warm-up
            c.post(url + "/answer", json=questions[0])

        def client(i: int) -> list[tuple[float, int]]:
            out = []
            with httpx.Client(timeout=300) as c:
                for j in range(requests):
                    q = questions[(i * requests + j) % len(questions)]
                    t = time.perf_counter()
                    try:
                        code = c.post(url + "/answer", json=q).status_code
                    except httpx.HTTPError:
                        code = 0
                    out.append((time.perf_counter() - t, code))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(client, range(clients)) for r in rs]
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(r[0] for r in results)
    return {
        "max_batch_size": batch, "requests": len(results), "seconds": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
        "errors": sum(code != 200 for _, code in results),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from explicitlm.world import geography_facts, make_questions

    qs = [{"question": t["question"], "options": t["options"]} for t in make_questions(geography_facts(), seed=1)[:512]]
    batched = run(args.weights, 32, qs, args.clients, args.requests, args.threads)
    print(batched, flush=True)
    single = run(args.weights, 1, qs, args.clients, args.requests, args.threads)
    print(single, flush=True)
    print(json.dumps({"batched": batched, "batch_size_1": single, "clients": args.clients,
                      "throughput_ratio": round(batched["throughput_rps"] / single["throughput_rps"], 2)}))


if __name__ == "__main__":
    main()
