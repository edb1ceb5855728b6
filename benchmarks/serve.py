"""Throughput of POST /answer with dynamic batching vs batch size 1, 32 concurrent clients.

    python benchmarks/serve.py --weights runs/default/sft_latest [--clients 32] [--requests 8]

Starts the app under uvicorn on 127.0.0.1 twice in the same run (serve.max_batch_size=32, then 1),
sends `clients` x `requests` questions from the sample world, and prints throughput, p50/p99
latency and errors for both. The last line is one JSON object with the figures and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the model process)."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


async def clients_run(url: str, questions: list[dict], clients: int, requests: int) -> tuple[list, float]:
    async def client(c: httpx.AsyncClient, i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(requests):
            q = questions[(i * requests + j) % len(questions)]
            t = time.perf_counter()
            try:
                code = (await c.post(url + "/answer", json=q)).status_code
            except httpx.HTTPError:
                code = 0
            out.append((time.perf_counter() - t, code))
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(c, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def run(weights: str, batch: int, questions: list[dict], clients: int, requests: int, threads: int,
        wait: float, dtype: str) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving", f"serve.weights={weights}", f"serve.port={port}",
                             f"serve.max_batch_size={batch}", f"serve.batch_wait_timeout_s={wait}",
                             f"training.torch_threads={threads}", f"serve.dtype={dtype}"], cwd=ROOT,
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
        # The clients are asyncio tasks in one process: 32 client threads would take the 2 cores
        # the server is measured on.
        server_cpu, client_cpu = tree_cpu(proc.pid), time.process_time()
        results, wall = asyncio.run(clients_run(url, questions, clients, requests))
        server_cpu = tree_cpu(proc.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(r[0] for r in results)
    return {
        "max_batch_size": batch, "requests": len(results), "seconds": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
        "errors": sum(code != 200 for _, code in results),
        "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="requests per client")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (the config default is 1)")
    p.add_argument("--wait", type=float, default=0.01, help="serve.batch_wait_timeout_s")
    p.add_argument("--dtype", default="auto", help="serve.dtype: auto, float32 or bfloat16")
    args = p.parse_args()
    from explicitlm.world import geography_facts, make_questions

    qs = [{"question": t["question"], "options": t["options"]} for t in make_questions(geography_facts(), seed=1)[:512]]
    batched = run(args.weights, 32, qs, args.clients, args.requests, args.threads, args.wait, args.dtype)
    print(batched, flush=True)
    single = run(args.weights, 1, qs, args.clients, args.requests, args.threads, args.wait, args.dtype)
    print(single, flush=True)
    print(json.dumps({"batched": batched, "batch_size_1": single, "clients": args.clients, "threads": args.threads,
                      "dtype": args.dtype,
                      "throughput_ratio": round(batched["throughput_rps"] / single["throughput_rps"], 2)}))


if __name__ == "__main__":
    main()
