"""Throughput of POST /answer with dynamic batching vs batch size 1, 32 concurrent clients.

    python benchmarks/serve.py --weights runs/default/sft_latest [--clients 32] [--requests 16] [--rounds 3] [--threads 0]

Starts the app under uvicorn on 127.0.0.1 twice in the same run (serve.max_batch_size=32 and 1, the
config's defaults otherwise), then sends `rounds` rounds of `clients` x `requests` questions from the
sample world to each, alternating, and prints throughput (median of the rounds), p50/p99 latency and
errors for both. The last line is one JSON object with the figures and the ratio.
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

import aiohttp
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
    """`clients` concurrent clients, each sending `requests` questions one after another on its own
    keep-alive connection. aiohttp: on these 2 shared cores the load generator's own CPU counts; for
    512 requests it used 0.09 s (batched) and 0.33 s (batch size 1) where httpx used 0.79 and 0.84 s."""

    async def client(session: aiohttp.ClientSession, i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(requests):
            q = questions[(i * requests + j) % len(questions)]
            t = time.perf_counter()
            try:
                async with session.post(url + "/answer", json=q) as r:
                    await r.read()
                    code = r.status
            except aiohttp.ClientError:
                code = 0
            out.append((time.perf_counter() - t, code))
        return out

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(session, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def start_server(
    weights: str, batch: int, threads: int, wait: float, dtype: str, warm: dict
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            f"serve.weights={weights}",
            f"serve.port={port}",
            f"serve.max_batch_size={batch}",
            f"serve.batch_wait_timeout_s={wait}",
            f"serve.torch_threads={threads}",
            f"serve.dtype={dtype}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    httpx.post(url + "/answer", json=warm, timeout=120)  # warm-up
    return proc, url


def load(proc: subprocess.Popen, url: str, questions: list[dict], clients: int, requests: int) -> dict:
    """One round of load: throughput, latencies, errors and the CPU seconds of server and clients."""
    server_cpu, client_cpu = tree_cpu(proc.pid), time.process_time()
    # The clients are asyncio tasks in one process: 32 client threads would take the 2 cores the
    # server is measured on.
    results, wall = asyncio.run(clients_run(url, questions, clients, requests))
    return {
        "throughput_rps": len(results) / wall,
        "latencies": [r[0] for r in results],
        "errors": sum(code != 200 for _, code in results),
        "server_cpu_s": tree_cpu(proc.pid) - server_cpu,
        "client_cpu_s": time.process_time() - client_cpu,
    }


def summarise(batch: int, rounds: list[dict]) -> dict:
    lat = sorted(x for r in rounds for x in r["latencies"])
    return {
        "max_batch_size": batch,
        "requests": len(lat),
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in rounds), 2),
        "rounds_rps": [round(r["throughput_rps"], 2) for r in rounds],
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
        "errors": sum(r["errors"] for r in rounds),
        "server_cpu_s": round(sum(r["server_cpu_s"] for r in rounds), 2),
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in rounds), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of load per server, alternating between the two")
    p.add_argument("--threads", type=int, default=0, help="serve.torch_threads (0, the default: torch's own)")
    p.add_argument("--wait", type=float, default=0.01, help="serve.batch_wait_timeout_s")
    p.add_argument("--dtype", default="auto", help="serve.dtype: auto, float32 or bfloat16")
    args = p.parse_args()
    from explicitlm.world import geography_facts, make_questions

    qs = [{"question": t["question"], "options": t["options"]} for t in make_questions(geography_facts(), seed=1)[:512]]
    # Both servers stay up and take turns, so a drift of the shared host's speed hits both alike;
    # each mode's throughput is the median of its rounds.
    servers = {
        batch: start_server(args.weights, batch, args.threads, args.wait, args.dtype, qs[0]) for batch in (32, 1)
    }
    rounds: dict[int, list[dict]] = {32: [], 1: []}
    try:
        for i in range(args.rounds):
            for batch, (proc, url) in servers.items():
                rounds[batch].append(load(proc, url, qs, args.clients, args.requests))
                print(f"round {i} max_batch_size={batch}: {rounds[batch][-1]['throughput_rps']:.1f} req/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    batched, single = summarise(32, rounds[32]), summarise(1, rounds[1])
    print(
        json.dumps(
            {
                "batched": batched,
                "batch_size_1": single,
                "clients": args.clients,
                "threads": args.threads,
                "dtype": args.dtype,
                "throughput_ratio": round(batched["throughput_rps"] / single["throughput_rps"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
