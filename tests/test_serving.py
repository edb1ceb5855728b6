"""The /answer app over a real socket (uvicorn in a subprocess): answers, limits, auth, the error
model, edits that are durable through SIGTERM and kill -9, and readiness when the model dies."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import jsonschema
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port, tiny_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The module's server: limits smaller than the defaults, so that the tests can reach them.
LIMITS = ["model.max_seq_len=160", "serve.max_options=8", "serve.max_option_chars=120", "serve.device=cpu"]


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
    """`python -m serving` in its own process group (so kill -9 reaches the model process too)."""

    def __init__(self, weights: Path, *overrides: str, env_key: str | None = KEY):
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
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def kill(self) -> None:
        """kill -9 the server and its model process, at once."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained["weights"], *LIMITS)
    yield s
    s.stop()


def _ask(url, rec, **kw):
    return httpx.post(url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60, **kw)


def _error_schema(url):
    """The documented error model, as a JSON schema with its references."""
    components = httpx.get(url + "/openapi.json").json()["components"]
    return {"$ref": "#/components/schemas/Error", "components": components}


def test_answer_names_its_bank_version_and_weights(server, trained, records):
    rec = records[0]
    r = _ask(server.url, rec)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[body["index"]]
    assert body["answer"] == f"{body['label']}:{rec['options'][body['index']]}"
    assert abs(sum(body["probabilities"]) - 1) < 1e-4 and len(body["probabilities"]) == len(rec["options"])
    assert body["memory"] and {"uuid", "text", "score"} <= set(body["memory"][0])
    weights = (trained["weights"] / "memory_modules.safetensors").read_bytes()
    assert body["adapter"] == hashlib.sha256(weights).hexdigest()[:16]
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["bank_version"] == body["bank_version"] and ready["adapter"] == body["adapter"]
    assert ready["device"] == "cpu"  # serve.device=cpu
    same = httpx.post(
        server.url + "/answer",
        json={"question": rec["question"], "options": rec["conversations"][0]["content"].split("\n")[1]},
        timeout=60,
    )
    assert same.json()["index"] == body["index"]  # the reference option string works too
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    row = httpx.get(server.url + f"/memory/rows/{rec['uuid']}").json()
    assert rec["options"][rec["answer_index"]] in row["text"]
    answer_word = rec["options"][rec["answer_index"]]
    found = httpx.get(server.url + "/memory/search", params={"q": answer_word.upper()}, headers=AUTH).json()
    assert found["complete"] and any(x["uuid"] == rec["uuid"] for x in found["rows"])
    assert all(answer_word.lower() in x["text"].lower() for x in found["rows"])
    assert httpx.get(server.url + "/memory/search", params={"q": answer_word}).status_code == 401
    assert httpx.get(server.url + "/memory/rows/no-such-row").status_code == 404
    info = httpx.get(server.url + "/memory").json()
    assert info["rows"] > 300 and info["version"] >= info["saved_version"]


def test_bad_requests_get_4xx_in_the_error_model(server):
    schema = _error_schema(server.url)
    cases = [
        ({"question": "q"}, "options"),
        ({"question": 5, "options": ["a", "b"]}, "question"),
        ({"question": "   ", "options": ["a", "b"]}, "question is blank"),
        ({"question": "q", "options": ["only one"]}, "options"),
        ({"question": "q", "options": [f"x{i}" for i in range(9)]}, "between 2 and 8 options"),  # serve.max_options
        ({"question": "q", "options": ["a", "b" * 121]}, "longer than 120 characters"),  # serve.max_option_chars
        ({"question": "q", "options": ["Paris", "Rome", " paris"]}, "options 0 and 2 are the same text"),
        ({"question": "q", "options": ["a", "  "]}, "option 1 is blank"),
        ({"question": "q", "options": "A:x,B:y,C:x"}, "same text"),
        ({"question": "q", "options": "not a list"}, "options"),
        ({"question": "q" * 2001, "options": ["a", "b"]}, "question"),  # serve.max_question_chars
        ({"question": "q", "options": ["a", "b"], "extra": 1}, "extra"),
    ]
    for body, needle in cases:
        r = httpx.post(server.url + "/answer", json=body, timeout=30)
        assert r.status_code == 422, (body, r.status_code)
        assert needle in r.json()["detail"], (needle, r.json())
        jsonschema.validate(r.json(), schema)
        assert r.json()["errors"][0]["field"] in ("question", "options", "extra")
    r = httpx.post(server.url + "/answer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    jsonschema.validate(r.json(), schema)
    bad_utf8 = httpx.post(
        server.url + "/answer",
        content=b'{"question":"\xff\xfe","options":["a","b"]}',
        headers={"content-type": "application/json"},
    )
    assert bad_utf8.status_code in (400, 422) and bad_utf8.json()["detail"]
    for content in (b"x" * 100_000, iter([b"x" * 40_000] * 3)):  # with a Content-Length, and chunked
        r = httpx.post(server.url + "/answer", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        jsonschema.validate(r.json(), schema)
    for r in (httpx.get(server.url + "/memory/rows/nope"), httpx.get(server.url + "/no/such/route")):
        assert r.status_code == 404
        jsonschema.validate(r.json(), schema)


def test_prompt_longer_than_max_seq_len_is_a_422_with_the_count(server, tokenizer):
    from explicitlm.data import LABELS, encode
    from explicitlm.scoring import Question

    words = "capital currency continent country city calling code France Europe".split()
    rng = random.Random(0)
    options = ["Paris", "Rome", "Oslo"]
    for n_words, fits in ((20, True), (150, False)):
        question = "What is the " + " ".join(rng.choice(words) for _ in range(n_words)) + "?"
        assert len(question) < 2000  # within the character limit: only tokens decide
        q = Question(question, options)
        tokens = max(
            len(encode(tokenizer, q.user, question, LABELS[i], o, 1 << 30).input_ids) for i, o in enumerate(options)
        )
        r = httpx.post(server.url + "/answer", json={"question": question, "options": options}, timeout=60)
        if fits:
            assert tokens <= 160 and r.status_code == 200, r.text
        else:
            assert tokens > 160 and r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert f"take {tokens} tokens" in detail and "at most 160 (model.max_seq_len)" in detail
            assert r.json()["errors"][0]["field"] == "question"


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


def test_key_is_checked_before_the_body_and_documented(server):
    url = server.url + "/memory/rows/some-row"
    for content in (b"{not json", b'{"text": 5}', b'{"text": "   "}', b"[]"):
        r = httpx.put(url, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (content, r.text)
    assert httpx.post(server.url + "/memory/rows", content=b"{oops").status_code == 401
    assert httpx.put(url, json={"text": "t"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.put(url, json={"text": "t"}, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    r = httpx.put(url, json={"text": "   "}, headers=AUTH)
    assert r.status_code == 422 and "blank" in r.json()["detail"]
    r = httpx.put(url, json={"text": "A real sentence."}, headers=AUTH)
    assert r.status_code == 404 and "some-row" in r.json()["detail"]
    r = httpx.post(server.url + "/memory/rows", json={"uuid": "bad uuid/x", "text": "t"}, headers=AUTH)
    assert r.status_code == 422 and "uuid" in r.json()["detail"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the server's EXPLICITLM_API_KEY",
    }
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    paths = spec["paths"]
    expected = {
        ("/memory/rows/{uuid}", "put"): {"401", "403", "404", "413", "422", "503"},
        ("/memory/rows", "post"): {"401", "403", "409", "413", "422", "503"},
        ("/memory/search", "get"): {"401", "403", "422", "503"},
        ("/answer", "post"): {"413", "422", "503"},
        ("/memory/rows/{uuid}", "get"): {"404", "422"},
    }
    for (path, method), codes in expected.items():
        op = paths[path][method]
        assert codes <= set(op["responses"]), (path, method)
        for code in codes:
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/Error", (path, method, code)
        assert (op.get("security") == [{"HTTPBearer": []}]) == ("401" in codes), (path, method)


def _correct_questions(url, records, n=40):
    return [rec for rec in records[:n] if _ask(url, rec).json()["index"] == rec["answer_index"]]


def test_edit_flips_answer_survives_restart_and_leaves_the_training_bank_alone(trained, server, records):
    training_bank = trained["bank"].read_bytes()
    serving_bank = trained["weights"] / "serving" / trained["bank"].name
    assert serving_bank.exists()  # the default serve.cache_path: a copy beside the weights
    flipped = None
    for rec in _correct_questions(server.url, records):
        old = httpx.get(server.url + f"/memory/rows/{rec['uuid']}").json()["text"]
        right = rec["options"][rec["answer_index"]]
        wrong_i = (rec["answer_index"] + 1) % len(rec["options"])
        before = _ask(server.url, rec).json()["bank_version"]
        r = httpx.put(
            server.url + f"/memory/rows/{rec['uuid']}",
            json={"text": old.replace(right, rec["options"][wrong_i])},
            headers=AUTH,
        )
        assert r.status_code == 200 and r.json()["old_text"] == old and r.json()["version"] == before + 1
        after = _ask(server.url, rec).json()
        assert after["bank_version"] == before + 1  # the very next answer reads the edit
        if after["index"] == wrong_i:
            flipped = (rec, wrong_i)
            break
    assert flipped is not None, "no edit was followed"
    # A uuid that reads like a route is a uuid like any other.
    for uuid in ("search", "rows"):
        added = httpx.post(
            server.url + "/memory/rows", json={"uuid": uuid, "text": f"A row named {uuid}."}, headers=AUTH
        )
        assert added.status_code == 201 and added.json()["action"] == "add"
        assert httpx.get(server.url + f"/memory/rows/{uuid}").json()["text"] == f"A row named {uuid}."
    dup = httpx.post(server.url + "/memory/rows", json={"uuid": "search", "text": "again"}, headers=AUTH)
    assert dup.status_code == 409
    version = httpx.get(server.url + "/memory").json()["version"]
    log = [json.loads(line) for line in open(str(serving_bank) + ".wal")]
    assert log[0]["old_text"] and log[-1]["uuid"] == "rows" and log[-1]["version"] == version
    assert trained["bank"].read_bytes() == training_bank  # training's bank file is never written
    # SIGTERM: the bank file is brought up to date and the log emptied; a restart serves the edits.
    server.stop()
    assert Path(str(serving_bank) + ".wal").read_bytes() == b""
    again = Server(trained["weights"], env_key=None)
    try:
        rec, wrong_i = flipped
        assert httpx.get(again.url + "/memory").json()["version"] == version
        assert rec["options"][wrong_i] in httpx.get(again.url + f"/memory/rows/{rec['uuid']}").json()["text"]
        assert httpx.get(again.url + "/memory/rows/search").status_code == 200
        assert _ask(again.url, rec).json()["index"] == wrong_i
        r = httpx.put(again.url + f"/memory/rows/{rec['uuid']}", json={"text": "x"}, headers=AUTH)
        assert r.status_code == 403 and "disabled" in r.json()["detail"]  # no key: editing is off
    finally:
        again.stop()
    assert trained["bank"].read_bytes() == training_bank


def test_kill_9_during_an_edit_stream_loses_no_acknowledged_edit(trained, records, tmp_path):
    """Four clients edit their own rows one after another; the server is killed (SIGKILL, server and
    model process) mid-stream, with compactions (every 5 edits) under way. After a restart every
    acknowledged edit is there, and each unacknowledged one is there whole or not at all."""
    bank = tmp_path / "bank.parquet"
    overrides = (f"serve.cache_path={bank}", "serve.compact_every=5")
    s = Server(trained["weights"], *overrides)
    v0 = httpx.get(s.url + "/memory").json()["version"]
    uuids = [r["uuid"] for r in records[:40]]
    original = {u: httpx.get(s.url + f"/memory/rows/{u}").json()["text"] for u in uuids}
    attempts: list[list[tuple[str, str, bool]]] = [[] for _ in range(4)]  # per client: (uuid, text, acked)
    acked = threading.Semaphore(0)

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as c:
            for j in range(1000):
                uuid, text = uuids[k * 10 + j % 10], f"Stream edit {k}-{j} of the row."
                try:
                    ok = c.put(s.url + f"/memory/rows/{uuid}", json={"text": text}, headers=AUTH).status_code == 200
                except httpx.HTTPError:
                    ok = False
                attempts[k].append((uuid, text, ok))
                if not ok:
                    return
                acked.release()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(30):
        assert acked.acquire(timeout=60)
    s.kill()
    for t in threads:
        t.join(timeout=60)
    n_acked = sum(ok for a in attempts for _, _, ok in a)
    assert n_acked >= 30 and all(a and not a[-1][2] for a in attempts)  # every client was cut off mid-edit
    again = Server(trained["weights"], *overrides)
    try:
        applied = 0
        for a in attempts:
            in_flight = a[-1]
            for uuid in {u for u, _, _ in a}:
                texts = [t for u, t, ok in a if u == uuid and ok]
                allowed = {texts[-1] if texts else original[uuid]}
                if in_flight[0] == uuid:
                    allowed.add(in_flight[1])
                now = httpx.get(again.url + f"/memory/rows/{uuid}").json()["text"]
                assert now in allowed, (uuid, now, allowed)
                applied += now == in_flight[1]
        version = httpx.get(again.url + "/memory").json()["version"]
        assert version - v0 == n_acked + applied  # nothing else was applied, nothing acknowledged is missing
    finally:
        again.stop()


def test_readiness_fails_when_the_model_process_dies(trained, records, tmp_path):
    s = Server(trained["weights"], f"serve.cache_path={tmp_path / 'bank.parquet'}")
    try:
        assert _ask(s.url, records[0]).status_code == 200
        model = [p for p in psutil.Process(s.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(model) == 1
        model[0].kill()  # the server reaps it: poll until it has
        deadline = time.time() + 30
        while (ready := httpx.get(s.url + "/readyz")).status_code == 200 and time.time() < deadline:
            time.sleep(0.1)
        assert ready.status_code == 503 and "model process" in ready.json()["detail"]
        assert httpx.get(s.url + "/healthz").status_code == 503
        r = _ask(s.url, records[0])
        assert r.status_code == 503 and re.search(r"model process has exited \(code -9\)", r.json()["detail"])
        assert httpx.get(s.url + f"/memory/rows/{records[0]['uuid']}").status_code == 200  # the bank still reads
    finally:
        s.stop()


def test_device_setting():
    import torch

    from explicitlm.config import ConfigError, load_config
    from serving.service import resolve_device

    with pytest.raises(ConfigError, match="serve.device must be auto, cpu or cuda"):
        load_config(None, ["serve.device=tpu"])
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="serve.device=cuda but torch sees no CUDA device"):
            resolve_device("cuda")
