"""`ray job submit --working-dir . -- python ray_jobs/sft.py ...` against a Ray head on 127.0.0.1."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ray_head(tmp_path):
    """A separate Ray head (its own ports and temp dir), stopped by ending `ray start --block`."""
    port, dash = free_port(), free_port()
    # Every agent port is chosen here: the session's own Ray already holds the default ones.
    agent_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    # Token auth is on by default for a new cluster: head and client must agree on the mode.
    env = dict(os.environ, RAY_AUTH_MODE="token")
    temp_dir = Path("/tmp") / f"rayhead{port}"
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *agent_ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    yield address, env
    head.terminate()
    head.wait(timeout=60)


def test_job_submit_runs_sft_on_a_local_head(ray_head, tiny_base, bank_path, world, records, tmp_path):
    import json

    address, env = ray_head
    data = tmp_path / "train.jsonl"  # outside the working dir: never uploaded
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "job_run"
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "ray_jobs/sft.py",
        f"model.qwen3_model_path={tiny_base}",
        f"model.cache_path={bank_path}",
        f"model.database_init_path={world['knowledge']}",
        f"training.output_dir={out}",
        f"dataset.sft_dataset_path={data}",
        "model.fusion_dim=64",
        "training.max_steps=3",
        "training.batch_size=8",
        "logging.swanlab_mode=disabled",
    ]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after the head: Ray says to retry
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr  # the job's log: the driver's lines and what its workers print
    assert "succeeded" in log and "sft: " in log
    # No progress bar of a worker (a training worker reading its shard, Ray Data's split coordinator).
    bars = [line for line in log.splitlines() if "row/s" in line or "Running Dataset" in line or "%|" in line]
    assert not bars, bars[:5]
    assert (out / "sft_latest" / "memory_modules.safetensors").exists()
