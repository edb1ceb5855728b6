"""Serving benchmarks: batching, edits under load, and mixed load with faults.

    python benchmarks/serve.py --weights runs/default/sft_latest [--clients 32] [--requests 16] [--rounds 3] [--bank-rows N]
    python benchmarks/serve.py --edits --weights W [--bank-rows 1048576] [--duration 60] [--rounds 3] [--edit-rate 20]
    python benchmarks/serve.py --mixed --weights W [--target uvicorn|ray] [--duration 120] [--kill-replica-at 40]

Default: starts the app under uvicorn on 127.0.0.1 five times in the same run: serve.max_batch_size=32
and 1; the bare backbone (serve.memory=false) at both; and the batched server again, asked the
same questions without options (generated answers). It sends `rounds` rounds of `clients` x
`requests` questions from the sample world to each, in turn, after `--warmup` unmeasured ones (a
server compiles its kernels for each batch shape as it meets it), and prints throughput (median of the
rounds), p50/p99 latency and errors for each, with the ratios: batched to batch size 1 (with memory,
and for the bare backbone: what batching can give on this machine), the memory's time per answer to
the bare backbone's (from requests/s, also round by round, and from the servers' CPU seconds,
steadier on a shared host), and the p50 without options to the p50 with them.
--bank-rows grows every server's bank to that many rows first (generated distractor sentences).

--edits: one server on its own copy of the bank (grown to --bank-rows rows with generated
distractor sentences, if asked); `clients` send /answer without pause while, in alternate halves of
each round, one editor sends PUT /memory/rows/{uuid} one after another (or --edit-rate a second).
Reports the edits' p50/p99 latency and /answer's p50/p99 with and without the edit stream, then
reads every edited row back; per phase it prints the three slowest answers (when sent) and when the
bank file was rewritten, to tell a stall from a rewrite.

--mixed: `clients` clients for `duration` seconds, each request /answer with probability 0.95 and
an edit otherwise, against uvicorn or a Ray Serve app of 2 replicas (`--target`); with
--kill-replica-at, one Ray Serve model replica is killed (SIGKILL) that many seconds in. Reports 5xx and
other errors, p50/p99 per kind, and the acknowledged edits missing afterwards (lost_edits).

The last line is always one JSON object with the figures.
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
API_KEY_ENV = "EXPLICITLM_API_KEY"
BENCH_KEY = "benchmark-key"  # the key of the servers this benchmark starts, unless one is set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, its live children (the model process) and the
    children it has reaped (bank-file rewrites)."""
    root = psutil.Process(pid)
    total = sum(root.cpu_times()[:4])  # user, system, and the reaped children's user and system
    for child in root.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:  # ended meanwhile: counted with the reaped ones next time
            pass
    return total


async def post_answer(session, url: str, q: dict) -> tuple[float, int, float]:
    """One /answer: (latency in s, status, 0 when no response came, and when it was sent)."""
    t = time.perf_counter()
    try:
        async with session.post(url + "/answer", json=q) as r:
            await r.read()
            code = r.status
    except aiohttp.ClientError:
        code = 0
    return time.perf_counter() - t, code, t


async def clients_run(url: str, questions: list[dict], clients: int, requests: int) -> tuple[list, float]:
    """`clients` concurrent clients, each sending `requests` questions one after another on its own
    keep-alive connection. aiohttp: on these 2 shared cores the load generator's own CPU counts; for
    512 requests it used 0.09 s (batched) and 0.33 s (batch size 1) where httpx used 0.79 and 0.84 s."""

    async def client(session: aiohttp.ClientSession, i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(requests):
            lat, code, _ = await post_answer(session, url, questions[(i * requests + j) % len(questions)])
            out.append((lat, code))
        return out

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(session, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def start_server(
    weights: str, batch: int, threads: int, wait: float, dtype: str, warm: dict | None, extra: tuple[str, ...] = ()
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
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, API_KEY_ENV: os.environ.get(API_KEY_ENV, BENCH_KEY)},
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    if warm is not None:
        httpx.post(url + "/answer", json=warm, timeout=120)  # warm-up
    return proc, url


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 1800) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready")


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


def latency_summary(latencies: list[float]) -> dict:
    lat = sorted(latencies)
    if not lat:
        return {"n": 0}
    return {
        "n": len(lat),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
    }


def sample_questions(n: int = 512) -> list[dict]:
    from explicitlm.world import geography_facts, make_questions

    return [{"question": t["question"], "options": t["options"]} for t in make_questions(geography_facts(), seed=1)[:n]]


def grow_bank(source: str, dest: Path, rows: int, tokenizer_path: str, seed: int = 0) -> int:
    """The weights' bank plus generated distractor sentences ("Marne Osaka is located in Tonga."),
    made of the bank's own capitalised words, up to `rows` rows; written to `dest`."""
    import random

    from transformers import AutoTokenizer

    from explicitlm.bank import MemoryBank

    bank = MemoryBank.load(source)
    rng = random.Random(seed)
    words = sorted(
        {w.strip(".,") for t in bank.texts for w in t.split() if w[:1].isupper() and w.strip(".,").isalpha()}
    )
    relations = (
        " is located in ",
        " was founded in ",
        " is a member of ",
        " shares a border with ",
        " is named after ",
    )
    original = [{"uuid": u, "text": t} for u, t in zip(bank.uuids, bank.texts)]
    extra = [
        {
            "uuid": f"distractor-{i}",
            "text": f"{rng.choice(words)} {rng.choice(words)}{rng.choice(relations)}{rng.choice(words)}.",
        }
        for i in range(max(rows - len(bank), 0))
    ]
    t0 = time.time()
    grown = MemoryBank.build(original + extra, AutoTokenizer.from_pretrained(tokenizer_path), bank.knowledge_length)
    grown.save(dest)
    print(f"bank: {len(grown)} rows ({len(extra)} generated) written to {dest} in {time.time() - t0:.0f} s", flush=True)
    return len(grown)


async def answer_client(session, url: str, questions: list[dict], i: int, stop_at: float, out: list) -> None:
    n = 0
    while time.perf_counter() < stop_at:
        q = questions[(i * 7919 + n) % len(questions)]
        n += 1
        lat, code, sent = await post_answer(session, url, q)
        out.append(("answer", lat, code, sent))


async def put_edit(session, url: str, uuid: str, text: str) -> tuple[float, int, dict | None]:
    t = time.perf_counter()
    try:
        async with session.put(
            url + f"/memory/rows/{uuid}", json={"text": text}, headers={"Authorization": f"Bearer {bench_key()}"}
        ) as r:
            body = await r.json(content_type=None)
            code = r.status
    except (aiohttp.ClientError, ValueError):
        code, body = 0, None
    return time.perf_counter() - t, code, body


def bench_key() -> str:
    return os.environ.get(API_KEY_ENV, BENCH_KEY)


def edit_targets(url: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n counterfactual-looking edits of the sample world's rows: a row's last word swapped for
    another row's last word."""
    import random

    from explicitlm.world import geography_facts, make_questions

    rng = random.Random(seed)
    uuids = [t["uuid"] for t in make_questions(geography_facts(), seed=1)]
    texts = {u: httpx.get(url + f"/memory/rows/{u}", timeout=60).json()["text"] for u in uuids[:400]}
    objects = [t.rstrip(".").split()[-1] for t in texts.values()]
    out = []
    for i in range(n):
        u = rng.choice(list(texts))
        out.append((u, texts[u].rstrip(".").rsplit(" ", 1)[0] + f" {rng.choice(objects)} (edit {i})."))
    return out


def read_back(url: str, edits: list[tuple[str, str, int, int | None]]) -> int:
    """How many rows do not hold what their edits say: (uuid, text, status, version) in any order.
    A row must hold its acknowledged edit of the highest version, or the text of an edit that got no
    acknowledgement (applied whole or not at all)."""
    best: dict[str, tuple[int, str]] = {}
    unacked: dict[str, set[str]] = {}
    for uuid, text, code, version in edits:
        if code == 200 and version is not None:
            if version > best.get(uuid, (-1, ""))[0]:
                best[uuid] = (version, text)
        else:
            unacked.setdefault(uuid, set()).add(text)
    lost = 0
    with httpx.Client(timeout=60) as c:
        for uuid, (_, text) in best.items():
            now = c.get(url + f"/memory/rows/{uuid}").json().get("text")
            lost += now != text and now not in unacked.get(uuid, set())
    return lost


def edits_mode(args) -> None:
    """PUT latency while /answer traffic continues, and /answer latency with and without edits."""
    import tempfile

    qs = sample_questions()
    folder = Path(tempfile.mkdtemp(prefix="explicitlm-edits-"))
    bank = folder / "bank.parquet"
    rows = 0
    if args.bank_rows:
        from explicitlm.config import load_config
        from explicitlm.loading import fill_from_weights

        cfg = fill_from_weights(load_config(None, [f"serve.weights={args.weights}"]), args.weights)
        rows = grow_bank(cfg.model.cache_path, bank, args.bank_rows, cfg.model.qwen3_model_path)
    extra = (f"serve.cache_path={bank}", f"serve.compact_every={args.compact_every}")
    proc, url = start_server(args.weights, 32, args.threads, args.wait, args.dtype, qs[0], extra)
    rows = rows or httpx.get(url + "/memory").json()["rows"]
    targets = edit_targets(url, 100_000)
    done: list[tuple[str, str, int, int | None]] = []
    phases: dict[str, list] = {"without": [], "with": []}
    edit_lat: list[float] = []

    rewrites: list[float] = []  # when the server's saved version moved (the bank file was rewritten)

    async def watch_rewrites(session, start: float, stop_at: float) -> None:
        saved = None
        while time.perf_counter() < stop_at:
            try:
                async with session.get(url + "/memory") as r:
                    now = (await r.json())["saved_version"]
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                await asyncio.sleep(0.5)  # a missed look; the next one sees the rewrite
                continue
            if saved is not None and now != saved:
                rewrites.append(round(time.perf_counter() - start, 1))
            saved = now
            await asyncio.sleep(0.5)

    cpu: dict[str, list[float]] = {"without": [], "with": []}  # server and model CPU seconds per phase

    async def phase(with_edits: bool) -> None:
        out: list = []
        cpu0 = tree_cpu(proc.pid)
        start = time.perf_counter()
        stop_at = start + args.duration
        rewrites.clear()
        connector = aiohttp.TCPConnector(limit=args.clients + 2)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

            async def editor() -> None:
                start, sent = time.perf_counter(), 0
                while time.perf_counter() < stop_at:
                    if args.edit_rate:  # paced: the n-th edit leaves at start + n / rate
                        await asyncio.sleep(max(0.0, start + sent / args.edit_rate - time.perf_counter()))
                    sent += 1
                    uuid, text = targets[len(done) % len(targets)]
                    lat, code, body = await put_edit(session, url, uuid, text)
                    done.append((uuid, text, code, (body or {}).get("version")))
                    if code == 200:
                        edit_lat.append(lat)

            tasks = [answer_client(session, url, qs, i, stop_at, out) for i in range(args.clients)]
            await asyncio.gather(*tasks, watch_rewrites(session, start, stop_at), *([editor()] if with_edits else []))
        kind = "with" if with_edits else "without"
        phases[kind].append(out)
        cpu[kind].append(tree_cpu(proc.pid) - cpu0)
        slowest = sorted(out, key=lambda x: -x[1])[:3]
        print(
            "  slowest answers (sent at s: latency s): "
            + ", ".join(f"{x[3] - start:.1f}: {x[1]:.2f}" for x in slowest)
            + f"; bank file rewrites finished at s: {rewrites or 'none'}; server and model CPU: {cpu[kind][-1]:.1f} s",
            flush=True,
        )

    try:
        for r in range(args.rounds):
            for with_edits in (False, True):
                asyncio.run(phase(with_edits))
                last = phases["with" if with_edits else "without"][-1]
                print(
                    f"round {r} edits={with_edits}: {len(last) / args.duration:.1f} answers/s, {len(done)} edits so far",
                    flush=True,
                )
        lost = read_back(url, done)
        stats = httpx.get(url + "/memory").json()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    answers = {k: [x for out in v for x in out] for k, v in phases.items()}
    summary = {
        k: {**latency_summary([x[1] for x in v if x[2] == 200]), "errors": sum(x[2] != 200 for x in v)}
        for k, v in answers.items()
    }
    for k in summary:
        summary[k]["answers_per_s"] = round(len(answers[k]) / (args.duration * args.rounds), 1)
    print(
        json.dumps(
            {
                "mode": "edits",
                "bank_rows": rows,
                "edit_rate": args.edit_rate or "back to back",
                "clients": args.clients,
                "edits": len(done),
                "edit_errors": sum(code != 200 for _, _, code, _ in done),
                "edit_p50_ms": latency_summary(edit_lat).get("p50_ms"),
                "edit_p99_ms": latency_summary(edit_lat).get("p99_ms"),
                "answers_without_edits": summary["without"],
                "answers_with_edits": summary["with"],
                "answer_p50_ratio": round(summary["with"]["p50_ms"] / summary["without"]["p50_ms"], 3),
                "answer_p99_ratio": round(summary["with"]["p99_ms"] / summary["without"]["p99_ms"], 3),
                "server_cpu_per_s": {k: round(sum(v) / (args.duration * args.rounds), 2) for k, v in cpu.items()},
                "lost_edits": lost,
                "bank_version": stats["version"],
                "saved_version": stats["saved_version"],
            }
        )
    )


def start_ray_app(weights: str, replicas: int, extra: list[str]) -> str:
    """A Ray Serve app of `replicas` replicas on a local Ray, in this process."""
    import ray
    from ray import serve

    from serving.deployment import build_app

    os.environ[API_KEY_ENV] = bench_key()  # the local Ray's processes inherit it; each gateway reads its own
    ray.init(num_cpus=max(os.cpu_count() or 2, 2), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    overrides = [f"serve.weights={weights}", "serve.replica_cpus=1", *extra]
    serve.run(build_app(overrides, num_replicas=replicas), name="explicitlm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def kill_one_replica() -> int:
    """SIGKILL one ExplicitLM replica's process; returns its pid."""
    import signal

    import ray._private.state as state

    alive = [
        a
        for a in state.actors().values()
        if a["ActorClassName"] == "ServeReplica:explicitlm:ExplicitLM" and a["State"] == "ALIVE"
    ]
    pid = alive[0]["Pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_replicas(n: int, timeout_s: float = 600) -> float:
    """Seconds until the app has n running replicas of ExplicitLM again."""
    from ray import serve

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        app = serve.status().applications.get("explicitlm")
        dep = app.deployments.get("ExplicitLM") if app else None
        if app and app.status == "RUNNING" and dep and dep.replica_states.get("RUNNING", 0) >= n:
            return time.time() - t0
        time.sleep(0.5)
    raise SystemExit(f"the app did not get back to {n} replicas in {timeout_s} s")


def mixed_mode(args) -> None:
    """95% /answer and 5% edits from `clients` clients for `duration` seconds; optionally one Ray
    Serve replica killed mid-run. Every acknowledged edit is read back afterwards."""
    import random
    import tempfile
    import threading

    qs = sample_questions()
    folder = Path(tempfile.mkdtemp(prefix="explicitlm-mixed-"))
    extra = [f"serve.cache_path={folder / 'bank.parquet'}"]
    proc = None
    if args.target == "ray":
        url = start_ray_app(args.weights, args.replicas, extra)
    else:
        proc, url = start_server(args.weights, 32, args.threads, args.wait, args.dtype, qs[0], tuple(extra))
    uuids = sorted({u for u, _ in edit_targets(url, 2000)})
    out: list = []
    killed: dict = {}

    async def client(session, i: int, stop_at: float) -> None:
        rng = random.Random(i)
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            if rng.random() < args.edit_share:
                uuid, text = rng.choice(uuids), f"Mixed edit {i}-{n} of this row."
                lat, code, body = await put_edit(session, url, uuid, text)
                out.append(("edit", lat, code, (uuid, text, (body or {}).get("version"), time.perf_counter())))
            else:
                lat, code, sent = await post_answer(session, url, qs[rng.randrange(len(qs))])
                out.append(("answer", lat, code, sent + lat))

    async def run() -> float:
        t0 = time.perf_counter()
        stop_at = t0 + args.duration
        if args.kill_replica_at:

            def kill() -> None:
                killed["pid"] = kill_one_replica()
                killed["at_s"] = round(time.perf_counter() - t0, 1)

            threading.Timer(args.kill_replica_at, kill).start()
        connector = aiohttp.TCPConnector(limit=args.clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*(client(session, i, stop_at) for i in range(args.clients)))
        return t0

    try:
        t0 = asyncio.run(run())
        recovered = wait_replicas(args.replicas) if args.target == "ray" else None
        edits = [(u, t, code, v) for kind, _, code, (u, t, v, _) in (x for x in out if x[0] == "edit")]
        lost = read_back(url, edits)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
        if args.target == "ray":
            from ray import serve

            serve.shutdown()

    def kind_summary(kind: str) -> dict:
        rows = [x for x in out if x[0] == kind]
        return {
            **latency_summary([x[1] for x in rows if x[2] == 200]),
            "requests": len(rows),
            "5xx": sum(500 <= x[2] < 600 for x in rows),
            "other_errors": sum(x[2] != 200 and not 500 <= x[2] < 600 for x in rows),
        }

    result = {
        "mode": "mixed",
        "target": args.target,
        "replicas": args.replicas if args.target == "ray" else 1,
        "clients": args.clients,
        "duration_s": args.duration,
        "edit_share": args.edit_share,
        "answers": kind_summary("answer"),
        "edits": kind_summary("edit"),
        "requests_per_s": round(len(out) / args.duration, 1),
        "acknowledged_edits": sum(x[0] == "edit" and x[2] == 200 for x in out),
        "lost_edits": lost,
    }
    if killed:
        at = t0 + killed["at_s"]
        after = [x for x in out if x[0] == "answer" and x[3] >= at]
        result["killed_replica"] = {
            **killed,
            "failed_requests_after_kill": sum(
                x[2] != 200 for x in out if (x[3] if x[0] == "answer" else x[3][3]) >= at
            ),
            "answers_ok_after_kill": sum(x[2] == 200 for x in after),
            "seconds_to_two_replicas_after_run": round(recovered, 1) if recovered is not None else None,
        }
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="runs/default/sft_latest")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=16, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of load per server, alternating between the two")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per server before them")
    p.add_argument("--threads", type=int, default=0, help="serve.torch_threads (0, the default: torch's own)")
    p.add_argument("--wait", type=float, default=0.01, help="serve.batch_wait_timeout_s")
    p.add_argument("--dtype", default="auto", help="serve.dtype: auto, float32 or bfloat16")
    p.add_argument("--edits", action="store_true", help="edit latency under /answer load, and its effect on /answer")
    p.add_argument("--bank-rows", type=int, default=0, help="grow the bank to this many rows (distractors)")
    p.add_argument("--duration", type=float, default=0, help="--edits: seconds per half-round; --mixed: of the run")
    p.add_argument("--compact-every", type=int, default=1000, help="serve.compact_every")
    p.add_argument("--edit-rate", type=float, default=0, help="--edits: edits per second (0: one after another)")
    p.add_argument("--mixed", action="store_true", help="95%% /answer, 5%% edits, with an optional replica kill")
    p.add_argument("--target", choices=("uvicorn", "ray"), default="uvicorn", help="--mixed: which server")
    p.add_argument("--replicas", type=int, default=2, help="--mixed --target ray: replicas")
    p.add_argument("--edit-share", type=float, default=0.05, help="--mixed: share of requests that are edits")
    p.add_argument("--kill-replica-at", type=float, default=0, help="--mixed --target ray: SIGKILL a replica then (s)")
    args = p.parse_args()
    if args.edits:
        args.duration = args.duration or 20
        return edits_mode(args)
    if args.mixed:
        args.duration = args.duration or 120
        return mixed_mode(args)
    batching_mode(args)


def batching_mode(args) -> None:
    """Batched against batch size 1, memory against the bare backbone, and answers without options
    against answers with them: five servers up at once, taking turns round by round."""
    import shutil
    import tempfile

    qs = sample_questions()
    open_qs = [{"question": q["question"]} for q in qs]
    banks = Path(tempfile.mkdtemp(prefix="explicitlm-serve-"))
    grown = None
    if args.bank_rows:
        from explicitlm.config import load_config
        from explicitlm.loading import fill_from_weights

        cfg = fill_from_weights(load_config(None, [f"serve.weights={args.weights}"]), args.weights)
        grown = banks / "grown.parquet"
        grow_bank(cfg.model.cache_path, grown, args.bank_rows, cfg.model.qwen3_model_path)
    # name: (max_batch_size, memory on, the questions)
    setups = {
        "batched": (32, True, qs),
        "batch_size_1": (1, True, qs),
        "bare_backbone": (32, False, qs),
        "bare_batch_size_1": (1, False, qs),  # how much batching gives the backbone alone, on this machine
        "without_options": (32, True, open_qs),
    }
    # Every server stays up and they take turns, so a drift of the shared host's speed hits all alike;
    # each one's throughput is the median of its rounds. Each has its own copy of the bank.
    servers = {}
    try:
        for name, (batch, memory, questions) in setups.items():
            bank = banks / name / "bank.parquet"
            if grown is not None:
                bank.parent.mkdir(parents=True)
                for f in banks.glob("grown.parquet*"):  # the bank and the index cached beside it
                    shutil.copy(f, bank.parent / f.name.replace("grown.parquet", "bank.parquet"))
            extra = (f"serve.cache_path={bank}", f"serve.memory={str(memory).lower()}")
            servers[name] = start_server(args.weights, batch, args.threads, args.wait, args.dtype, questions[0], extra)
        rounds: dict[str, list[dict]] = {name: [] for name in setups}
        # Unmeasured rounds first: a server compiles its kernels for each batch shape it meets.
        for i in range(-args.warmup, args.rounds):
            for name, (proc, url) in servers.items():
                result = load(proc, url, setups[name][2], args.clients, args.requests)
                if i >= 0:
                    rounds[name].append(result)
                print(f"round {i} {name}: {result['throughput_rps']:.1f} req/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    out = {name: summarise(setups[name][0], r) for name, r in rounds.items()}
    rps = {name: o["throughput_rps"] for name, o in out.items()}
    print(
        json.dumps(
            {
                **out,
                "clients": args.clients,
                "threads": args.threads,
                "dtype": args.dtype,
                "bank_rows": args.bank_rows or None,
                # floors: batched >= 4x batch size 1; memory <= 1.6x (2x at 2^20 rows) the bare
                # backbone's time per answer; without options <= 2x with options at p50
                "throughput_ratio": round(rps["batched"] / rps["batch_size_1"], 2),
                "bare_throughput_ratio": round(rps["bare_backbone"] / rps["bare_batch_size_1"], 2),
                "memory_cost_ratio": round(rps["bare_backbone"] / rps["batched"], 2),
                # round by round (the servers take turns, so each pair shares the host's speed)
                "memory_cost_ratio_rounds": [
                    round(b["throughput_rps"] / m["throughput_rps"], 2)
                    for b, m in zip(rounds["bare_backbone"], rounds["batched"])
                ],
                # the same from the server's CPU seconds per answer: steadier on a shared machine
                "memory_cpu_ratio": round(out["batched"]["server_cpu_s"] / out["bare_backbone"]["server_cpu_s"], 2),
                "open_p50_ratio": round(out["without_options"]["p50_ms"] / out["batched"]["p50_ms"], 2),
                "errors": sum(o["errors"] for o in out.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
