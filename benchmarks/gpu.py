"""The production path on one GPU: Qwen3-0.6B and Qwen3-4B shapes in bf16, one Ray Train GPU worker.

    python benchmarks/gpu.py                    # one GPU, at most 8 minutes
    python benchmarks/gpu.py --device cpu       # tiny shapes on a CPU: the same code, a smoke test

Backbones are random-init `Qwen3ForCausalLM`s with the published shapes (`Qwen3Config`, nothing is
downloaded), saved with `save_pretrained` and loaded by the job through `from_pretrained`; the
tokenizer is trained locally, the bank is the sample world's sentences plus generated ones, and every
question is padded with context words to about `--seq` tokens. For each shape, largest first:
0. retrieval: the candidate search for a batch of `--batch` questions in a bank of 2^20 rows of
   generated word ids, on the device (ms per batch, beside each shape's bare step below), and beside
   it the dense scan of every row's key (one bf16 matrix product) with the same exact stage;
1. bare: the frozen backbone alone, forward and backward to its inputs (what training the memory
   modules asked of it before the prompt ran without gradients), bf16 autocast, `--batch` x `--seq`
   tokens: tokens/s, ms per step and peak memory;
2. train: `ray_jobs/sft.py` with `configs/sft_omcq.yaml`'s settings on one Ray Train worker for
   `--steps` steps: tokens/s between a third of the way and the end (the loop's own counters),
   the worker's peak memory, and the job's memory estimate for the same run.
Then, with the smallest shape's run: the same command with more steps resumes from its checkpoint
and validates (reductions and checkpoints on the real process group: NCCL on a GPU),
`ray_jobs/evaluate.py` scores its validation questions in a Ray task holding the GPU
(`eval.num_gpus=1`), and `POST /answer` is measured on its weights (`--clients` concurrent clients,
`--requests` requests).

The last line is one JSON object. On a GPU, `checks` compares the largest shape with the floors of
an H100/H200-class GPU: >= 15,000 training tokens/s, memory modules adding <= 25% to the bare
frozen step, peak memory <= 40 GB at batch 8.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from explicitlm.base import tiny_qwen3_config, train_tokenizer
from explicitlm.data import parse_target
from explicitlm.estimate import count_backbone_params, estimate_memory, qwen3_config
from explicitlm.loading import load_backbone
from explicitlm.objective import encode_record
from explicitlm.world import write_world

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOKENS = 16  # positions per sequence the bare step's loss reads, as the job's answers do


def shape_config(name: str, vocab_size: int):
    """The published shape of Qwen3-{name}, or "tiny": 2 layers of width 64 for the CPU smoke test."""
    if name == "tiny":
        return tiny_qwen3_config(vocab_size, hidden_size=64, num_layers=2, intermediate_size=192)
    return qwen3_config(name)


def log(msg: str) -> None:
    print(f"gpu-bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


def build_inputs(out: Path, facts: int, filler_rows: int, seq: int, seed: int = 0):
    """Tokenizer, knowledge file (sample world + generated sentences) and padded SFT records."""
    paths = write_world(out / "world", seed=seed, max_facts=facts)
    targets = [item["target"][0] for item in json.loads(Path(paths["omcq"]).read_text())]
    rows = [json.loads(line) for line in Path(paths["knowledge"]).read_text().splitlines()]
    texts = [r["text"] for r in rows]
    tokenizer = train_tokenizer(texts + [t["question"] for t in targets] + [t["options"] for t in targets], 8192)
    rng = random.Random(seed)
    words = sorted({w for t in texts for w in t.rstrip(".").split()})
    knowledge = out / "knowledge.jsonl"
    with open(knowledge, "w") as fh:
        for r in rows:
            fh.write(json.dumps({"uuid": r["uuid"], "text": r["text"]}) + "\n")
        for i in range(filler_rows):  # more rows than the sample world has: the product-key probe, not a scan
            w = rng.sample(words, 3)
            fh.write(json.dumps({"uuid": f"filler-{i}", "text": f"The {w[0]} of {w[1]} is {w[2]}."}) + "\n")
    context = tokenizer(" ".join(rng.choice(words) for _ in range(4 * seq)), add_special_tokens=False)["input_ids"]
    records = []
    for t in targets:
        rec = parse_target(t)
        n = seq - 4 - len(encode_record(tokenizer, rec, 10**6).input_ids)
        while n > 0:  # fill the prompt to about `seq` tokens with context words before the question
            padded = parse_target({**t, "question": f"Context: {tokenizer.decode(context[:n])}\n{t['question']}"})
            over = len(encode_record(tokenizer, padded, 10**6).input_ids) - (seq - 2)
            if over <= 0:
                rec = padded
                break
            n -= over
        records.append(rec)
    return tokenizer, knowledge, records


def write_backbone(folder: Path, config, tokenizer, device: torch.device) -> int:
    """A random-init Qwen3 of `config`'s shape in bf16, saved for `from_pretrained`; its parameter count."""
    from transformers import Qwen3ForCausalLM

    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def write_records(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as fh:
        for i, r in enumerate(records):
            fh.write(json.dumps({**r, "idx": i}) + "\n")
    return path


# ---------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(folder: Path, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    """The frozen backbone alone: forward, loss at LOSS_TOKENS positions per row, backward to the inputs."""
    tokenizer, backbone = load_backbone(str(folder), device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tokenizer), (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, -LOSS_TOKENS - 1 : -1] = True
    targets = ids[:, -LOSS_TOKENS:].reshape(-1)
    embed = backbone.get_input_embeddings()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x = embed(ids).detach().requires_grad_()
            h = backbone.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            loss = F.cross_entropy(backbone.lm_head(h[at]).float(), targets)
        loss.backward()

    for _ in range(2):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"tokens_per_s": round(batch * seq * steps / elapsed, 1), "peak_memory_gb": peak and round(peak, 2)}


def retrieval_ms(device: torch.device, rows: int, batch: int, repeat: int = 10) -> dict:
    """The candidate stage on the device at `rows` rows: a bank of generated word ids (Zipf template
    words, two name words per row, no tokenising), its index and lists built where they will be used,
    then `find_candidates` for a batch of questions naming a row's subject; ms per batch. Beside it,
    what a user could run instead on the same device: every row's key against the questions' (one
    bf16 matrix product; a matrix unit makes it cheap), its best as many candidates as ours scores,
    and the same exact stage (`scan_*`: `find_candidates` with the bank ranked whole)."""
    from explicitlm.bank import MemoryBank
    from explicitlm.config import ModelConfig
    from explicitlm.index import ProductKeyIndex, lexical_keys
    from explicitlm.postings import Postings
    from explicitlm.retrieval import find_candidates

    cfg, L = ModelConfig(), 16
    g = torch.Generator().manual_seed(0)
    common = torch.multinomial(1.0 / torch.arange(1, 50_001).float(), rows * 8, replacement=True, generator=g)
    words = torch.zeros(rows, L, dtype=torch.long)
    words[:, :8] = common.view(rows, 8) + 1
    words[:, 8] = torch.arange(rows) * 2 + 1_000_001  # a row's own subject: two words no other row has
    words[:, 9] = torch.arange(rows) * 2 + 1_000_002
    mask = words != 0
    bank = MemoryBank(words % 30_000, mask, words, [str(i) for i in range(rows)], [""] * rows, "bench", 0)
    t = time.perf_counter()
    index = ProductKeyIndex.build(lexical_keys(bank.word_ids, bank.counts, cfg.knowledge_dim, 0), cfg.max_cell_rows)
    postings = Postings.build(bank.word_ids)
    build_s = time.perf_counter() - t
    for part in (bank, index, postings):
        part.to(device)
    asked = torch.randint(0, rows, (batch,), generator=g)
    question = torch.cat(
        [
            bank.word_ids[asked.to(device), 4:10],
            torch.randint(5_000_000, 6_000_000, (batch, 6), generator=g).to(device),
        ],
        1,
    )

    def search():
        return find_candidates(
            bank, index, question, cfg.candidates, cfg.top_k, cfg.top_cells, cfg.probe_cells, 0, 0,
            postings=postings, posting_rows=cfg.posting_rows,
        )  # fmt: skip

    def scan():
        n = cfg.candidates + cfg.posting_rows
        return find_candidates(
            bank, index, question, n, cfg.top_k, 0, 0, rows, 0, postings=postings
        )  # same exact stage

    def timed(fn) -> tuple[float, float]:
        """(ms per batch, the share of questions whose row is among the rows read)"""
        got = fn()
        found = ((got.rows == asked.to(device)[:, None]) & got.valid).any(1).float().mean().item()
        sync(device)
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync(device)
        return round(1000 * (time.perf_counter() - t) / repeat, 2), round(found, 3)

    (ms, found), (scan_ms, scan_found) = timed(search), timed(scan)
    return {"rows": rows, "batch": batch, "ms_per_batch": ms, "recall@R": found, "build_s": round(build_s, 1),
            "scan_ms_per_batch": scan_ms, "scan_recall@R": scan_found}  # fmt: skip


def steady_throughput(metrics: Path, batch: int, steps: int) -> dict:
    """Tokens/s between the first logged step past a third of the run and the last, from the loop's
    cumulative counters (one worker: samples = step x batch since the loop's clock started)."""
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "tokens_per_s" in r]
    first = next(r for r in rows if r["step"] >= steps / 3)
    last = rows[-1]

    def clock(r: dict) -> tuple[float, float]:
        elapsed = r["step"] * batch / r["samples_per_s"]
        return elapsed, r["tokens_per_s"] * elapsed

    (e1, n1), (e2, n2) = clock(first), clock(last)
    return {
        "tokens_per_s": round((n2 - n1) / (e2 - e1), 1),
        "tokens_per_step": round((n2 - n1) / (last["step"] - first["step"]), 1),
        "peak_memory_gb": last.get("peak_memory_gb"),
        "final_loss": round(last["loss"], 4),
    }


def job_argv(args, folder: Path, bank: Path, knowledge: Path, records: Path, out: Path, steps: int, *extra):
    cpu = args.device == "cpu"
    return [
        "--config-name",
        "sft_omcq",
        f"model.qwen3_model_path={folder}",
        f"model.cache_path={bank}",
        f"model.database_init_path={knowledge}",
        f"dataset.sft_dataset_path={records}",
        f"training.output_dir={out}",
        "model.dtype=bfloat16",
        f"model.max_seq_len={args.seq}",
        f"training.batch_size={args.batch}",
        "training.accumulation_steps=1",
        "training.num_workers=1",
        f"training.use_gpu={not cpu}",
        "training.gpu_memory_gb=0",  # the worker checks its own device
        f"training.max_steps={steps}",
        "training.open_answer_share=0",  # every sequence padded to --seq, as the bare step's are
        f"training.warmup_steps={max(1, args.steps // 10)}",
        f"logging.log_every={max(1, args.steps // 6)}",
        "logging.swanlab_mode=disabled",
        *(["training.torch_threads=1", "model.knowledge_dim=64", "model.fusion_dim=64"] if cpu else []),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer_rate(weights: Path, questions: list[dict], clients: int, requests: int, device: torch.device) -> dict:
    """POST /answer under uvicorn: `clients` threads send `requests` questions in all."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", f"serve.weights={weights}", f"serve.port={port}", "serve.host=127.0.0.1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            return {"error": "the server was not ready in 180 s"}
        latencies, codes, lock = [], [], threading.Lock()

        def client(i: int) -> None:
            for j in range(i, requests, clients):
                body = json.dumps(questions[j % len(questions)]).encode()
                req = urllib.request.Request(url + "/answer", body, {"content-type": "application/json"})
                t = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        r.read()
                        code = r.status
                except OSError:
                    code = 0
                with lock:
                    latencies.append(time.perf_counter() - t)
                    codes.append(code)

        client(0)  # one request first: the model's first forward is slow
        latencies.clear()
        codes.clear()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        return {
            "requests_per_s": round(len(codes) / wall, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "errors": sum(c != 200 for c in codes),
            "requests": len(codes),
            "server_gpu_memory_mib": gpu_memory_of(server.pid) if device.type == "cuda" else None,
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def gpu_memory_of(pid: int) -> int | None:
    """GPU memory nvidia-smi reports for a process and its children (the model process), or None."""
    import psutil

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    used = [int(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line) if int(p) in pids]
    return sum(used) if used else 0


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shapes", default=None, help="comma-separated: 4B,0.6B on cuda, tiny on cpu")
    p.add_argument("--steps", type=int, default=None, help="training steps per shape (cuda 200, cpu 6)")
    p.add_argument("--resume-steps", type=int, default=None, help="steps the resumed run adds (cuda 20, cpu 2)")
    p.add_argument("--bare-steps", type=int, default=None, help="timed bare steps (cuda 30, cpu 2)")
    p.add_argument("--batch", type=int, default=None, help="cuda 8, cpu 4")
    p.add_argument("--seq", type=int, default=None, help="model.max_seq_len (cuda 256, cpu 64)")
    p.add_argument("--facts", type=int, default=None, help="sample-world facts (cuda all, cpu 400)")
    p.add_argument("--bank-rows", type=int, default=None, help="generated bank rows added (cuda 262144, cpu 0)")
    p.add_argument("--clients", type=int, default=None, help="concurrent /answer clients (cuda 32, cpu 4)")
    p.add_argument(
        "--retrieval-rows", type=int, default=None, help="rows of the retrieval timing's bank (cuda 2^20, cpu 4096)"
    )
    p.add_argument("--requests", type=int, default=None, help="/answer requests (cuda 1024, cpu 8)")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--budget-s", type=float, default=420, help="past this, the resume and /answer parts are skipped")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    defaults = dict(
        shapes="4B,0.6B" if cuda else "tiny",
        steps=200 if cuda else 6,
        resume_steps=20 if cuda else 2,
        bare_steps=30 if cuda else 2,
        batch=8 if cuda else 4,
        seq=256 if cuda else 64,
        facts=0 if cuda else 400,
        bank_rows=262144 if cuda else 0,
        clients=32 if cuda else 4,
        retrieval_rows=1 << 20 if cuda else 4096,
        requests=1024 if cuda else 8,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu-bench: no CUDA device; use --device cpu for the smoke test")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    t_start = time.time()
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="explicitlm-gpu-")
    out = Path(args.out or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, device, out, t_start)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args, device: torch.device, out: Path, t_start: float) -> dict:
    from explicitlm.cli.sft import run as sft_main  # the job itself, in this process: returns its summary
    from explicitlm.config import load_config

    tokenizer, knowledge, records = build_inputs(out, args.facts, args.bank_rows, args.seq)
    bank = out / "knowledge_cache.parquet"
    train_records = write_records(out / "train.jsonl", records)
    val_records = write_records(out / "val.jsonl", records[:64])
    questions = [{"question": r["question"].split("\n")[-1], "options": r["options"]} for r in records[:256]]
    log(f"inputs ready: {len(records)} records of about {args.seq} tokens, {time.time() - t_start:.0f} s")
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "max_seq_len": args.seq,
        "steps": args.steps,
        "shapes": {},
    }
    result["retrieval"] = retrieval_ms(device, args.retrieval_rows, args.batch)
    log(f"retrieval: {result['retrieval']}, {time.time() - t_start:.0f} s")
    shapes = args.shapes.split(",")
    for name in shapes:
        config = shape_config(name, len(tokenizer))
        folder = out / f"qwen3-{name}"
        n = write_backbone(folder, config, tokenizer, device)
        assert n == count_backbone_params(config)
        log(f"{name}: {n / 1e9:.3f} B parameters saved, {time.time() - t_start:.0f} s")
        shape: dict = {"backbone_params": n, "bare": bare_step(folder, device, args.batch, args.seq, args.bare_steps)}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bare backbone is gone: its memory goes back for the job's worker
        log(f"{name}: bare {shape['bare']}, {time.time() - t_start:.0f} s")
        run_dir = out / f"run-{name}"
        argv = job_argv(args, folder, bank, knowledge, train_records, run_dir, args.steps)
        sft_main(argv)
        shape["train"] = steady_throughput(run_dir / "metrics.jsonl", args.batch, args.steps)
        cfg = load_config("sft_omcq", argv[2:])
        estimate = estimate_memory(cfg, sum(1 for _ in open(knowledge)))  # the job's own
        shape["train"]["estimate_gb"] = round(estimate.total / 1e9, 3)
        # What torch's allocator should report: the estimate less the CUDA context and slack.
        shape["train"]["estimate_allocated_gb"] = round((estimate.total - estimate.overhead) / 1e9, 3)
        shape["memory_modules_cost"] = round(shape["bare"]["tokens_per_s"] / shape["train"]["tokens_per_s"] - 1, 3)
        # The backbone's step beside the candidate search for the same batch.
        shape["bare"]["ms_per_step"] = round(1000 * args.batch * args.seq / shape["bare"]["tokens_per_s"], 1)
        result["shapes"][name] = shape
        log(f"{name}: train {shape['train']}, {time.time() - t_start:.0f} s")

    if time.time() - t_start > args.budget_s:
        result["skipped"] = f"resume and /answer: past the {args.budget_s:.0f} s budget"
        return finish(result, t_start)
    small = shapes[-1]
    run_dir = out / f"run-{small}"
    total = args.steps + args.resume_steps
    argv = job_argv(
        args,
        out / f"qwen3-{small}",
        bank,
        knowledge,
        train_records,
        run_dir,
        total,
        f"dataset.sft_val_dataset_path={val_records}",
        "training.max_eval_samples=64",
    )
    summary = sft_main(argv)
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    steps_logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    result["resume"] = {
        "shape": small,
        "start_step": attempts[-1]["start_step"],
        "resumed": attempts[-1]["start_step"] == args.steps and max(steps_logged) == total,
        "backend": attempts[-1]["backend"],
        "device": attempts[-1]["device"],
        "val_n": summary.get("val_n"),
        "val_accuracy": summary.get("val_accuracy"),
    }
    log(f"resume: {result['resume']}, {time.time() - t_start:.0f} s")
    # ray_jobs/evaluate.py as on a cluster: in a Ray task holding the GPU (on a CPU, in this process).
    from explicitlm.cli.evaluate import run as evaluate_main

    where = "eval.num_gpus=1" if device.type == "cuda" else "eval.device=cpu"
    scored = evaluate_main([f"eval.weights={run_dir / 'sft_latest'}", f"eval.data={val_records}", where])
    result["evaluate"] = {"on": where, **{k: scored[k] for k in ("n", "accuracy", "memory_read", "seconds")}}
    log(f"evaluate: {result['evaluate']}, {time.time() - t_start:.0f} s")
    result["answer"] = answer_rate(run_dir / "sft_latest", questions, args.clients, args.requests, device)
    log(f"answer: {result['answer']}, {time.time() - t_start:.0f} s")
    return finish(result, t_start)


def finish(result: dict, t_start: float) -> dict:
    if result.get("device", "cpu") != "cpu" and "4B" in result["shapes"]:
        big = result["shapes"]["4B"]
        result["checks"] = {
            "4B_train_tokens_per_s>=15000": big["train"]["tokens_per_s"] >= 15000,
            "4B_memory_modules_cost<=0.25": big["memory_modules_cost"] <= 0.25,
            "4B_peak_memory_gb<=40": (big["train"]["peak_memory_gb"] or 0) <= 40,
            "resume_on_nccl": bool(result.get("resume", {}).get("resumed")) and result["resume"]["backend"] == "nccl",
        }
    result["elapsed_s"] = round(time.time() - t_start, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
