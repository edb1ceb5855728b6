"""The /answer app over a real socket (uvicorn in a subprocess) and on Ray Serve."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port, tiny_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, bank_path, world, records):
    """Memory weights trained in-process for a few epochs, with their own copy of the bank."""
    from explicitlm.train import train_loop_per_worker

    d = tmp_path_factory.mktemp("served")
    bank = d / "bank.parquet"
    shutil.copy(bank_path, bank)
    cfg = tiny_config(
        tiny_base,
        bank,
        world,
        d,
        "training.epochs=4",
        "training.learning_rate=5e-3",
        "training.batch_size=8",
        "training.torch_threads=2",
    )
    train_loop_per_worker({"config": asdict(cfg), "train_rows": [dict(r) for r in records]})
    return {"weights": d / "sft_latest", "bank": bank, "dir": d}


class Server:
    def __init__(self, weights: Path, env_key: str | None = KEY):
        self.port = free_port()
        env = dict(os.environ)
        env.pop("EXPLICITLM_API_KEY", None)
        if env_key:
            env["EXPLICITLM_API_KEY"] = env_key
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                f"serve.weights={weights}",
                f"serve.port={self.port}",
                "model.fusion_dim=64",
                "serve.batch_wait_timeout_s=0.005",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained["weights"])
    yield s
    s.stop()


def test_answer_shape_and_memory(server, records):
    rec = records[0]
    r = httpx.post(server.url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[body["index"]]
    assert body["answer"] == f"{body['label']}:{rec['options'][body['index']]}"
    assert abs(sum(body["probabilities"]) - 1) < 1e-4 and len(body["probabilities"]) == len(rec["options"])
    assert body["memory"] and {"uuid", "text", "score"} <= set(body["memory"][0])
    same = httpx.post(
        server.url + "/answer",
        json={"question": rec["question"], "options": rec["conversations"][0]["content"].split("\n")[1]},
        timeout=30,
    )
    assert same.json()["index"] == body["index"]  # the reference option string works too
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    row = httpx.get(server.url + f"/memory/{rec['uuid']}").json()
    assert rec["options"][rec["answer_index"]] in row["text"]
    found = httpx.get(server.url + "/memory/search", params={"q": rec["options"][rec["answer_index"]]}).json()
    assert any(x["uuid"] == rec["uuid"] for x in found)
    assert httpx.get(server.url + "/memory/no-such-row").status_code == 404
    assert "examples" in json.dumps(httpx.get(server.url + "/openapi.json").json())


def test_bad_requests_get_4xx_naming_the_field(server):
    cases = [
        ({"question": "q"}, "options"),
        ({"question": 5, "options": ["a", "b"]}, "question"),
        ({"question": "q", "options": ["only one"]}, "options"),
        ({"question": "q", "options": ["x"] * 100}, "options"),
        ({"question": "q", "options": "not a list"}, "options"),
        ({"question": "q" * 5000, "options": ["a", "b"]}, "question"),
        ({"question": "q", "options": ["a", "b"], "extra": 1}, "extra"),
    ]
    for body, field in cases:
        r = httpx.post(server.url + "/answer", json=body, timeout=30)
        assert r.status_code == 422, (body, r.status_code)
        assert field in r.json()["detail"], (field, r.json())
    assert (
        httpx.post(
            server.url + "/answer", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    bad_utf8 = httpx.post(
        server.url + "/answer",
        content=b'{"question":"\xff\xfe","options":["a","b"]}',
        headers={"content-type": "application/json"},
    )
    assert bad_utf8.status_code in (400, 422) and bad_utf8.json()["detail"]
    assert (
        httpx.post(
            server.url + "/answer", content=b"x" * 100_000, headers={"content-type": "application/json"}
        ).status_code
        == 413
    )


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        _json,
        st.fixed_dictionaries({"question": _json, "options": _json}),
        st.fixed_dictionaries(
            {"question": st.text(max_size=3000), "options": st.lists(st.text(max_size=600), max_size=30)}
        ),
        st.fixed_dictionaries({"question": st.text(min_size=1, max_size=50), "options": st.text(max_size=200)}),
    ),
    raw=st.binary(max_size=200),
)
def test_fuzz_never_5xx(server, body, raw):
    r = httpx.post(server.url + "/answer", json=body, timeout=60)
    assert r.status_code < 500, (body, r.text)
    r = httpx.post(server.url + "/answer", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (raw, r.text)


def _correct_questions(url, records, n=40):
    out = []
    for rec in records[:n]:
        body = httpx.post(
            url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=30
        ).json()
        if body["index"] == rec["answer_index"]:
            out.append(rec)
    return out


def test_authorised_edit_flips_answer_and_survives_restart(trained, server, records):
    assert httpx.put(server.url + "/memory/x", json={"text": "t"}).status_code == 401
    assert (
        httpx.put(server.url + "/memory/x", json={"text": "t"}, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    flipped = None
    for rec in _correct_questions(server.url, records):
        old = httpx.get(server.url + f"/memory/{rec['uuid']}").json()["text"]
        right = rec["options"][rec["answer_index"]]
        wrong_i = (rec["answer_index"] + 1) % len(rec["options"])
        r = httpx.put(
            server.url + f"/memory/{rec['uuid']}",
            json={"text": old.replace(right, rec["options"][wrong_i])},
            headers=auth,
        )
        assert r.status_code == 200 and r.json()["old_text"] == old
        after = httpx.post(
            server.url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=30
        ).json()
        if after["index"] == wrong_i:
            flipped = (rec, wrong_i)
            break
    assert flipped is not None, "no edit was followed"
    added = httpx.post(
        server.url + "/memory",
        json={"uuid": "new-fact-1", "text": "The capital of Atlantis is Poseidonia."},
        headers=auth,
    )
    assert added.status_code == 201
    assert (
        httpx.post(server.url + "/memory", json={"uuid": "new-fact-1", "text": "again"}, headers=auth).status_code
        == 409
    )
    log = [json.loads(line) for line in open(trained["bank"].with_name("bank.edits.jsonl"))]
    assert log[0]["old_text"] and log[-1]["uuid"] == "new-fact-1"
    # Restart: the edits are in the bank file.
    server.stop()
    again = Server(trained["weights"], env_key=None)
    try:
        rec, wrong_i = flipped
        assert rec["options"][wrong_i] in httpx.get(again.url + f"/memory/{rec['uuid']}").json()["text"]
        assert httpx.get(again.url + "/memory/new-fact-1").status_code == 200
        after = httpx.post(
            again.url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=30
        ).json()
        assert after["index"] == wrong_i
        r = httpx.put(again.url + f"/memory/{rec['uuid']}", json={"text": "x"}, headers=auth)
        assert r.status_code == 403 and "disabled" in r.json()["detail"]  # no key: editing is off
    finally:
        again.stop()
        server.proc = subprocess.Popen(["true"])  # the module fixture's stop() still has a process to end
