"""A two-node Ray cluster on one machine: the jobs read nothing on a worker node that only the driver's node has.

Two `ray start` processes with their own temp dirs and ports: a head (the driver's node) and a
second node that alone carries the `worker_node` resource the training workers ask for. Where the
machine allows it, the second node runs in a mount namespace in which the driver's folder (the
repository copy the job was submitted from, its data and its bank) is an empty tmpfs: a worker that
opened any of those paths would fail. Jobs are submitted with `ray job submit --working-dir` from that
folder, as on a real cluster; only the backbone and `training.output_dir` are on storage both see.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def _ports(*flags: str) -> list[str]:
    return [f"--{flag}={free_port()}" for flag in flags]


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)


def _can_hide_folders() -> bool:
    probe = (
        subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False)
        if shutil.which("unshare")
        else None
    )
    return probe is not None and probe.returncode == 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # all at once: each stops its own processes gracefully ...
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # ... and what is left of the process group each started is ended
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _bring_up(env: dict, driver: Path, logs: Path, hidden: bool, temp_dirs: list[Path], timeout: float):
    """Start a head and a second node on fresh ports; (head, node, dashboard address) once the node
    has joined, or the processes started so far and a reason when it did not within `timeout`."""
    port, dash = free_port(), free_port()
    temp_dirs += [Path("/tmp") / f"rayA{port}", Path("/tmp") / f"rayB{port}"]
    head_log, node_log = logs / f"head{port}.log", logs / f"node{port}.log"
    with open(head_log, "wb") as out:  # the child keeps its own copy of the file
        head = subprocess.Popen(
            [
                "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1", "--disable-usage-stats",
                f"--temp-dir={temp_dirs[-2]}", *_ports(*NODE_PORTS, "ray-client-server-port"),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    node_cmd = [
        "ray", "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        '--resources={"worker_node": 2}', "--disable-usage-stats", f"--temp-dir={temp_dirs[-1]}", *_ports(*NODE_PORTS),
    ]  # fmt: skip
    if hidden:  # the second node sees an empty folder where the driver keeps its files
        node_cmd = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{driver}" && exec "$0" "$@"', *node_cmd,
        ]  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    node = None
    deadline = time.time() + timeout
    while time.time() < deadline:  # the head answers, then the second node joins
        for name, proc, log in (("head", head, head_log), ("node", node, node_log)):
            if proc is not None and proc.poll() is not None:  # e.g. a port taken between probe and bind
                tail = log.read_text(errors="replace")[-2000:]
                return [p for p in (node, head) if p is not None], f"the {name} exited ({proc.returncode}):\n{tail}"
        if node is None:
            if subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode:
                time.sleep(1)
                continue
            with open(node_log, "wb") as out:
                node = subprocess.Popen(node_cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        status = subprocess.run(
            ["ray", "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True
        )
        if "worker_node" in status.stdout:
            return (head, node, address), None
        time.sleep(1)
    return [p for p in (node, head) if p is not None], f"the second node had not joined in {timeout:.0f} s"


@pytest.fixture()
def two_nodes(tmp_path):
    """(dashboard address, env, driver-local folder, shared folder, whether the driver folder is hidden)."""
    driver, shared, logs = tmp_path / "driver", tmp_path / "shared", tmp_path / "logs"
    for d in (driver, shared, logs):
        d.mkdir()
    # Modules come from the submitted working dir, as on a cluster, not from this checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_AUTH_MODE"] = "token"  # a new cluster's default: head, node and client agree
    hidden = _can_hide_folders()
    temp_dirs: list[Path] = []
    started: list[subprocess.Popen] = []
    reasons = []
    try:
        for _ in range(2):  # a busy machine, or a port taken by another process, gets one fresh try
            up, reason = _bring_up(env, driver, logs, hidden, temp_dirs, timeout=180)
            if reason is None:
                head, node, address = up
                started = [node, head]
                break
            _stop(up)
            reasons.append(reason)
        else:
            pytest.fail("the two-node cluster did not come up: " + "; ".join(reasons))
        yield address, env, driver, shared, hidden
    finally:
        _stop(started)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _submit(address: str, env: dict, working_dir: Path, *cmd: str) -> subprocess.CompletedProcess:
    argv = ["ray", "job", "submit", "--address", address, "--working-dir", str(working_dir), "--", "python", *cmd]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after the head: Ray says to retry
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="the job's working dir is the checkout's tracked files (`git ls-files`): run from a git clone",
)
def test_jobs_on_two_nodes_read_no_driver_local_path(two_nodes, tiny_base, world, records):
    from transformers import AutoTokenizer

    from explicitlm.adapter import save_adapter
    from explicitlm.bank import load_or_build_bank
    from explicitlm.config import load_config
    from explicitlm.loading import build_model
    from explicitlm.pipeline import to_parquet_records

    address, env, driver, shared, hidden = two_nodes
    print(f"driver folder hidden from the worker node: {hidden}")
    repo = driver / "repo"  # the job's working dir: a copy the worker node cannot see
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    data = driver / "data"
    data.mkdir()
    jsonl = data / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:160]))
    train = to_parquet_records(str(jsonl), data)  # a Parquet file on the driver's disk only
    knowledge = data / "knowledge.jsonl"
    shutil.copy2(world["knowledge"], knowledge)
    bank = data / "bank" / "knowledge_cache.parquet"  # the driver's; shipped through the object store
    load_or_build_bank(bank, knowledge, AutoTokenizer.from_pretrained(tiny_base), 16, 10**6)
    settings = [f"model.qwen3_model_path={tiny_base}", f"model.cache_path={bank}", "model.fusion_dim=64"]
    save_adapter(build_model(load_config(None, settings))[1], data / "start")  # weights to start from
    # Conversion input of several 4 MB ranges: more converter actors than the driver's node has CPUs
    # would be placed on the worker node if they were not kept with the file.
    items = json.loads(Path(world["omcq"]).read_text())
    (data / "omcq.json").write_text(json.dumps(items * (3 * (4 << 20) // len(json.dumps(items)) + 1)))
    n_items = len(json.loads((data / "omcq.json").read_text()))

    t0 = time.time()
    proc = _submit(
        address, env, repo, "ray_jobs/convert.py", "--input", str(data / "omcq.json"), "--output",
        str(data / "omcq_sft.jsonl"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    converted = (data / "omcq_sft.jsonl").read_text().splitlines()
    assert len(converted) == n_items and json.loads(converted[-1])["uuid"] == items[-1]["target"][0]["uuid"]
    t_convert = time.time() - t0

    out = shared / "run"
    proc = _submit(
        address, env, repo, "ray_jobs/sft.py",
        *settings,  # the backbone is on storage every node reads, as the README asks
        f"model.database_init_path={knowledge}",
        f"dataset.sft_dataset_path={train}",
        f"dataset.pretrained_sft_model_path={data / 'start'}",
        f"training.output_dir={out}",
        "training.num_workers=1",
        "training.worker_resources={worker_node: 1}",
        "training.max_steps=2",
        "training.batch_size=8",
        "logging.swanlab_mode=disabled",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"convert job {t_convert:.0f} s, training job {time.time() - t0 - t_convert:.0f} s")
    log = proc.stdout + proc.stderr  # the job's log: the driver's lines and what its workers print
    assert "succeeded" in log and "sft: " in log
    # No progress bar of a worker (a training worker reading its shard, Ray Data's split coordinator).
    bars = [line for line in log.splitlines() if "row/s" in line or "Running Dataset" in line or "%|" in line]
    assert not bars, bars[:5]
    assert (out / "sft_latest" / "memory_modules.safetensors").exists()
    config = json.loads((out / "sft_latest" / "adapter_config.json").read_text())
    assert config["bank_path"] == str(bank)  # the weights name the driver's bank, not a worker's copy
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["node"] != attempts[-1]["driver_node"]  # rank 0 ran on the second node
    # The workers read the bank and the starting weights from copies the object store brought to
    # their node, and removed them when done.
    shipped, start = Path(attempts[-1]["bank"]), Path(attempts[-1]["adapter"])
    assert shipped.name == bank.name and not shipped.is_relative_to(driver) and not shipped.exists()
    assert not start.is_relative_to(driver) and not start.exists()


def test_relative_output_paths_are_refused_in_an_uploaded_working_dir(tmp_path, monkeypatch):
    """Under `ray job submit` the driver runs in a temporary copy of the working dir on the head: a
    run or a bank written there would be lost with it (and no worker node could read it)."""
    from explicitlm.config import ConfigError, load_config
    from explicitlm.pipeline import prepare, uploaded_working_dir

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert not uploaded_working_dir()  # a job without a working dir, or a plain run
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}})
    )
    assert uploaded_working_dir()
    with pytest.raises(ConfigError, match="training.output_dir=runs/x is a relative path"):
        prepare(load_config(None, ["training.output_dir=runs/x"]))
    with pytest.raises(ConfigError, match="model.cache_path=bank.parquet is a relative path"):
        prepare(load_config(None, [f"training.output_dir={tmp_path / 'run'}", "model.cache_path=bank.parquet"]))
    assert not (copy / "runs").exists() and not (tmp_path / "run").exists()
