"""OMCQ conversion: ray_jobs/convert.py against a single-process baseline written like the reference.

    python benchmarks/convert.py [--questions 1570000] [--scale 1] [--skip-baseline] [--workdir /tmp/omcq-bench]

Writes a reference-format file (one JSON array) of `questions x scale` questions, then in the same
run times (a) the baseline: load the whole array with json.load, loop, one json.dumps per row, and
(b) `python ray_jobs/convert.py`, end to end including Ray start-up, each as its own process tree
whose every process's RSS is sampled. Beside them it times a Ray Data job that converts nothing
(start a local Ray, map two rows, shut down): the fixed cost inside (b). The last line is one JSON
object: both wall times, rows/s, the peak RSS of the largest process of each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

BASELINE = r"""
import json, sys
items = json.load(open(sys.argv[1], encoding="utf-8"))
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for item in items:
        try:
            t = item["target"][0]
            q, o, a = t["question"].strip(), t["options"].strip(), t["correct_answer"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        rec = {"conversations": [{"role": "user", "content": f"{q}\n{o}\n请选择正确答案。"},
                                 {"role": "assistant", "content": a}]}
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
"""

# Ray's fixed cost on this machine: start a local Ray, run a two-block map_batches, shut down.
EMPTY_JOB = r"""
import ray
ray.init(log_to_driver=False, include_dashboard=False)
ray.data.from_items([{"x": 1}, {"x": 2}], override_num_blocks=2).map_batches(lambda b: b, batch_format="pyarrow").take_all()
ray.shutdown()
"""


def write_omcq(path: Path, n: int, seed: int = 0) -> None:
    """n questions shaped like the reference's (T-REx wording, 3-5 options, uuids), streamed to disk."""
    rng = random.Random(seed)
    words = [
        "language family",
        "pteridosperms",
        "FIBT World Championships",
        "Paris, Texas",
        "Bamako",
        "Roman Catholic Church",
        "Tokyo Metropolitan Government",
        "association football",
        "Sofia",
        "Los Angeles County",
        "Kingdom of the Netherlands",
        "Hanoi",
        "English",
        "physicist",
    ]
    rels = ["is a subclass of", "is located in", "was born in", "is the capital of", "plays", "works as"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[")
        for i in range(n):
            k = rng.randint(3, 5)
            opts = rng.sample(words, k)
            ans = rng.randrange(k)
            item = {
                "target": [
                    {
                        "question": f"Which entity does subject number {i} of the benchmark set {rng.choice(rels)}?",
                        "options": ",".join(f"{'ABCDE'[j]}:{o}" for j, o in enumerate(opts)),
                        "correct_answer": f"{'ABCDE'[ans]}:{opts[ans]}",
                        "uuid": f"{rng.getrandbits(128):032x}",
                    }
                ]
            }
            fh.write(("," if i else "") + json.dumps(item, ensure_ascii=False))
        fh.write("]")


def run_tree(cmd: list[str]) -> dict:
    """Run cmd; sample the RSS of it and all its descendants; return wall time and peak RSS."""
    peak = {"rss": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    peak["rss"] = max(peak["rss"], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    return {
        "seconds": round(wall, 2),
        "peak_rss_mb": round(peak["rss"] / 2**20, 1),
        "returncode": proc.returncode,
        "tail": out[-500:],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=1_570_000)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--workdir", default="/tmp/omcq-bench")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n = args.questions * args.scale
    src = work / f"omcq_{n}.json"
    if not src.exists():
        t = time.perf_counter()
        write_omcq(src, n)
        print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.0f}s", flush=True)
    result = {"questions": n, "input_mb": round(src.stat().st_size / 2**20, 1)}
    if not args.skip_baseline:
        (work / "baseline.py").write_text(BASELINE)
        a = run_tree([sys.executable, str(work / "baseline.py"), str(src), str(work / "baseline.jsonl")])
        a["rows_per_s"] = round(n / a["seconds"], 1)
        result["baseline"] = {k: v for k, v in a.items() if k != "tail"}
        print("baseline", result["baseline"], flush=True)
    (work / "empty_job.py").write_text(EMPTY_JOB)
    e = run_tree([sys.executable, str(work / "empty_job.py")])
    result["ray_empty_job_seconds"] = e["seconds"]
    print("ray_empty_job", e["seconds"], flush=True)
    b = run_tree(
        [
            sys.executable,
            "ray_jobs/convert.py",
            "--input",
            str(src),
            "--output",
            str(work / "ray.jsonl"),
            "--no-progress",
        ]
    )
    b["rows_per_s"] = round(n / b["seconds"], 1)
    result["ray_convert"] = {k: v for k, v in b.items() if k != "tail"}
    print("ray_convert", result["ray_convert"], flush=True)
    if b["returncode"] != 0:
        print(b["tail"])
    if "baseline" in result:
        result["speedup"] = round(result["baseline"]["seconds"] / b["seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
