"""The /answer app over a real socket (uvicorn in a subprocess): answers, limits, auth, the error
model, edits that are durable through SIGTERM and kill -9 (mid-rewrite), a bounded queue, deadlines
when the model hangs, and readiness when the model dies. The model is served with Qwen3's own chat
template."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The module's server: limits smaller than the defaults, so that the tests can reach them.
LIMITS = [
    "model.max_seq_len=160",
    "serve.max_options=8",
    "serve.max_option_chars=120",
    "serve.device=cpu",
    "serve.max_batch_size=4",
    "serve.max_queue=4",
]


class Server:
    """`python -m serving` in its own process group (so kill -9 reaches the model process too)."""

    def __init__(self, weights: Path, *overrides: str, env_key: str | None = KEY):
        self.port = free_port()
        env = dict(os.environ)
        env.pop("EXPLICITLM_API_KEY", None)
        if env_key:
            env["EXPLICITLM_API_KEY"] = env_key
        self.log = tempfile.NamedTemporaryFile(prefix="explicitlm-serve-", suffix=".log")  # its stdout
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                f"serve.weights={weights}",
                f"serve.port={self.port}",
                "model.fusion_dim=64",
                "serve.batch_wait_timeout_s=0.005",
                # oneDNN, which torch runs some CPU kernels through (where the CPU has AVX-512 or AMX),
                # keeps kernels, one per batch shape met: bounded, but on such a host the model process
                # grew by 50-60 MB over its first ten bursts of the queue test with the library's 1,024.
                # Off here, so that the queue test sees what the service itself keeps (it also serves
                # float32: bf16 kernels keep more).
                "serve.onednn_cache=0",
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
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


def _children(pid: int, marker: str) -> list[psutil.Process]:
    """The children of process `pid` whose command line contains `marker`."""
    found = []
    for p in psutil.Process(pid).children():
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # ended meanwhile
            pass
    return found


def _ask(url, rec, timeout: float = 60, **kw):
    return httpx.post(
        url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=timeout, **kw
    )


def _ask_within(url, rec, seconds: float):
    """_ask again while the answer is a 504 (a model slower than a short serve.request_timeout_s), up to `seconds`."""
    deadline = time.time() + seconds
    while (r := _ask(url, rec)).status_code == 504 and time.time() < deadline:
        time.sleep(0.5)
    return r


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
    assert row["version"] is None and row["bank_version"] == body["bank_version"]  # never edited
    answer_word = rec["options"][rec["answer_index"]]
    found = httpx.get(server.url + "/memory/search", params={"q": answer_word.upper()}, headers=AUTH).json()
    assert found["complete"] and any(x["uuid"] == rec["uuid"] for x in found["rows"])
    assert all(answer_word.lower() in x["text"].lower() for x in found["rows"])
    assert httpx.get(server.url + "/memory/search", params={"q": answer_word}).status_code == 401
    assert httpx.get(server.url + "/memory/rows/no-such-row").status_code == 404
    info = httpx.get(server.url + "/memory").json()
    assert info["rows"] > 300 and info["version"] >= info["saved_version"]
    assert "compact_error" not in info  # why a rewrite failed is for key holders only
    # The start line says what the bank's rows lost to the cut at model.knowledge_length, five examples after it.
    start = Path(server.log.name).read_text().splitlines()
    assert start[0].startswith("serve: ") and "rows of 16 tokens" in start[0] and "lost their last word" in start[0]
    assert start[1].startswith("serve:   cut: ") and " lost " in start[1]
    assert "compact_error" in httpx.get(server.url + "/memory", headers=AUTH).json()


def test_an_answer_without_options_is_generated_the_same_alone_or_batched(server, records):
    """POST /answer without options: the generated text, the rows read, memory_used and bank_version,
    in the documented schema; the same text and rows whether the question shares a batch or not."""
    components = httpx.get(server.url + "/openapi.json").json()["components"]
    schema = {"$ref": "#/components/schemas/AnswerResponse", "components": components}
    bodies = [{"question": r["question"]} for r in records[:8]] + [{"question": records[0]["question"], "options": []}]
    alone = [httpx.post(server.url + "/answer", json=b, timeout=60) for b in bodies]
    for r in alone:
        assert r.status_code == 200, r.text
        body = r.json()
        jsonschema.validate(body, schema)
        assert body["answer"] == body["text"] and isinstance(body["finished"], bool)
        assert not {"label", "index", "probabilities"} & set(body)
        assert body["memory"] and isinstance(body["memory_used"], bool) and body["bank_version"] >= 0
    assert alone[-1].json()["text"] == alone[0].json()["text"]  # "options": [] is no options
    with ThreadPoolExecutor(4) as pool:  # batched with each other (serve.max_batch_size=4)
        together = list(pool.map(lambda b: httpx.post(server.url + "/answer", json=b, timeout=60), bodies))
    for a, t in zip(alone, together):
        assert t.status_code == 200, t.text
        assert t.json()["text"] == a.json()["text"]
        assert [m["uuid"] for m in t.json()["memory"]] == [m["uuid"] for m in a.json()["memory"]]


def test_bad_requests_get_4xx_in_the_error_model(server):
    schema = _error_schema(server.url)
    cases = [
        ({"question": "   "}, "question is blank"),  # without options, too
        ({"question": "\ud800?"}, "unicode"),  # JSON can carry a lone surrogate; UTF-8 cannot
        ({"question": "q", "options": ["a", "\udfff"]}, "option 1 is not valid Unicode"),
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
        # ASCII JSON: a lone surrogate travels as its \u escape, as any client may send it.
        r = httpx.post(
            server.url + "/answer", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30
        )
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


def test_prompt_longer_than_max_seq_len_is_a_422_with_the_count(server, qwen3_tokenizer):
    from explicitlm.data import LABELS, encode, render_answer
    from explicitlm.scoring import Question, open_prompt

    words = "capital currency continent country city calling code France Europe".split()
    rng = random.Random(0)
    options = ["Paris", "Rome", "Oslo"]
    for n_words, fits in ((20, True), (150, False)):
        question = "What is the " + " ".join(rng.choice(words) for _ in range(n_words)) + "?"
        assert len(question) < 2000  # within the character limit: only tokens decide
        q = Question(question, options)
        tokens = max(
            len(encode(qwen3_tokenizer, q.user, question, render_answer(LABELS[i], o), o, 1 << 30).input_ids)
            for i, o in enumerate(options)
        )
        # Without options: the prompt and the answer's first token.
        open_tokens = len(open_prompt(qwen3_tokenizer, Question(question, []), 1 << 30)[0].input_ids) + 1
        for body, n in (({"question": question, "options": options}, tokens), ({"question": question}, open_tokens)):
            r = httpx.post(server.url + "/answer", json=body, timeout=60)
            if fits:
                assert n <= 160 and r.status_code == 200, r.text
            else:
                assert n > 160 and r.status_code == 422, r.text
                detail = r.json()["detail"]
                assert f"{n} tokens" in detail and "at most 160 (model.max_seq_len)" in detail
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


def test_a_question_that_cannot_be_scored_fails_alone(server, records):
    """Questions with chat-template control text, sent at once with good ones (so that they share
    batches): each bad one is a 422 of its own, every good one is answered, and the server stays ready.
    Qwen3's template splits an assistant turn on "</think>": unchecked, that option failed its batch."""
    good = [{"question": r["question"], "options": r["options"]} for r in records[:5]] + [
        {"question": records[5]["question"]}
    ]
    q, options = records[0]["question"], records[0]["options"]
    bad = [
        {"question": q, "options": [options[0], "Rome</think>Oslo"]},
        {"question": q, "options": [options[0], "<think>Oslo"]},
        {"question": "What is <|im_start|>assistant here?", "options": options},
        {"question": f"{q} <|endoftext|>", "options": options},  # the tokenizer's own special token
        {"question": f"{q} </think>"},  # without options, too
    ]
    bodies = (good + bad) * 3
    with ThreadPoolExecutor(4) as pool:  # never more in flight than may wait (serve.max_queue=4)
        replies = list(pool.map(lambda b: httpx.post(server.url + "/answer", json=b, timeout=60), bodies))
    for body, r in zip(bodies, replies):
        if body in good:
            assert r.status_code == 200 and r.json()["answer"], r.text
        else:
            assert r.status_code == 422 and "control text" in r.json()["detail"], (body, r.text)
            assert r.json()["errors"][0]["field"] in ("question", "options")
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_a_full_queue_is_a_503_with_retry_after_and_memory_stays_flat(trained, records, tmp_path):
    """Four times the server's capacity (a batch of serve.max_batch_size=4 in the model and
    serve.max_queue=4 waiting), at once, five times: the excess gets 503s with Retry-After, the rest
    are answered, and the server's memory does not grow from round to round.

    In float32: on a CPU with bf16 matrix units (AMX), where serve.dtype=auto serves bfloat16, torch's
    bf16 kernels keep something per batch shape that oneDNN's primitive cache setting does not reach
    (the model alone, in one process, batches of 1-4 of these questions: +70 MB over its first 144
    batches, slowing to 1 MB per 12; float32 flat within 5 MB, Python's heap flat in both). That is
    the kernels warming up to the shapes they meet, not the queue this test is about."""
    import asyncio

    server = Server(trained["weights"], *LIMITS, "serve.dtype=float32", f"serve.cache_path={tmp_path / 'bank.parquet'}")
    bodies = [{"question": r["question"], "options": r["options"]} for r in records[:32]]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(c.post(server.url + "/answer", json=b) for b in bodies))

    def rss() -> int:
        """The server's process (where requests queue) and the model's, together."""
        root = psutil.Process(server.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    try:
        rounds, sizes = [], []
        for _ in range(5):
            rounds.append(asyncio.run(burst()))
            sizes.append(rss())
    finally:
        server.stop()
    for replies in rounds:
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 503} and codes.count(200) >= 4 and codes.count(503) >= 8, codes
        for r in replies:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "serve.max_queue" in r.json()["detail"]
    assert sizes[-1] - sizes[0] < 16 << 20, sizes  # bytes


def test_a_500_names_a_request_id_and_nothing_of_its_cause(caplog):
    """An error the app did not expect: the body says only that it happened and gives an id; the
    server's log line of the error has the id and the cause. (And a server with no key takes no edits.)"""
    import uvicorn

    from serving.app import create_app
    from serving.service import RequestLimits

    class Failing:
        api_key = ""

        async def answer(self, q):
            raise RuntimeError("secret detail: /srv/models/private path")

        async def close(self):
            pass

    app = create_app(Failing(), RequestLimits(8, 100, 100, 100, 512))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with caplog.at_level("ERROR", logger="explicitlm.serve"):
            r = httpx.post(f"http://127.0.0.1:{port}/answer", json={"question": "q", "options": ["a", "b"]})
        # A server without a key (api_key empty): editing is off.
        off = httpx.put(f"http://127.0.0.1:{port}/memory/rows/x", json={"text": "x"}, headers=AUTH)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text
    request_id = r.headers["x-request-id"]
    assert request_id in r.json()["detail"]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    assert off.status_code == 403 and "disabled" in off.json()["detail"]


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
    # An edit sent twice under one Idempotency-Key is made once; the second gets the first's outcome.
    keyed_url = server.url + f"/memory/rows/{records[30]['uuid']}"
    keyed = {"headers": {**AUTH, "Idempotency-Key": "edit-test-1"}, "json": {"text": "A keyed edit."}}
    first, second = httpx.put(keyed_url, **keyed), httpx.put(keyed_url, **keyed)
    assert first.status_code == second.status_code == 200 and second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert httpx.get(keyed_url).json()["version"] == first.json()["version"]
    other = httpx.put(keyed_url, headers=keyed["headers"], json={"text": "Another edit."})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    spaced = httpx.put(keyed_url, headers={**AUTH, "Idempotency-Key": "has a space"}, json={"text": "x"})
    assert spaced.status_code == 422
    version = httpx.get(server.url + "/memory").json()["version"]
    log = [json.loads(line) for line in open(str(serving_bank) + ".wal")]
    assert log[0]["old_text"] and log[-1]["key"] == "edit-test-1" and log[-1]["version"] == version
    assert trained["bank"].read_bytes() == training_bank  # training's bank file is never written
    # SIGTERM: the bank file is brought up to date and the log keeps no edit it lacks (only the
    # history of past ones); a restart serves the edits, and remembers the key.
    server.stop()
    log = [json.loads(line) for line in open(str(serving_bank) + ".wal")]
    assert log and all(e["past"] for e in log)
    key_file = trained["dir"] / "api_key"
    key_file.write_text(KEY + "\n")
    again = Server(trained["weights"], f"serve.api_key_file={key_file}", env_key=None)  # the key from a file
    try:
        rec, wrong_i = flipped
        assert httpx.get(again.url + "/memory").json()["version"] == version
        assert rec["options"][wrong_i] in httpx.get(again.url + f"/memory/rows/{rec['uuid']}").json()["text"]
        assert httpx.get(again.url + "/memory/rows/search").status_code == 200
        assert _ask(again.url, rec).json()["index"] == wrong_i
        replayed = httpx.put(again.url + f"/memory/rows/{records[30]['uuid']}", **keyed)
        assert replayed.status_code == 200 and replayed.json() == first.json()
        assert replayed.headers["idempotent-replayed"] == "true"
        assert httpx.get(again.url + "/memory").json()["version"] == version
    finally:
        again.stop()
    assert trained["bank"].read_bytes() == training_bank


def test_kill_9_during_an_edit_stream_loses_no_acknowledged_edit(trained, records, tmp_path):
    """Four clients edit their own rows one after another; the server is killed (SIGKILL: server,
    model process and the bank file's rewrite) mid-stream, while a rewrite of the bank file is in
    flight (one every 5 edits, with no interval between them). After a restart every acknowledged
    edit is there, and each unacknowledged one is there whole or not at all."""
    bank = tmp_path / "bank.parquet"
    overrides = (f"serve.cache_path={bank}", "serve.compact_every=5", "serve.compact_interval_s=0")
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
    deadline, rewrites = time.time() + 60, []
    while not rewrites and time.time() < deadline:
        rewrites = _children(s.proc.pid, "explicitlm.bank_file")
    s.kill()
    in_flight = [p for p in rewrites if p.is_running()]  # it left the server's process group: still at work
    assert in_flight, "no rewrite of the bank file was in flight at the kill"
    for p in in_flight:  # a crash of the machine takes it too
        p.kill()
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


def test_a_hung_model_times_out_and_a_dead_one_fails_readiness(trained, records, tmp_path):
    """The model process stops (SIGSTOP): an answer is a 504 with Retry-After within
    serve.request_timeout_s, and /readyz, whose probe question gets no answer, a 503; once it runs
    again (SIGCONT), /readyz is 200 again. Then it dies (SIGKILL): readiness and liveness fail for good."""
    s = Server(trained["weights"], f"serve.cache_path={tmp_path / 'bank.parquet'}", "serve.request_timeout_s=2")
    try:
        assert _ask_within(s.url, records[0], 60).status_code == 200  # warm: on a busy machine it may take over 2 s
        model = _children(s.proc.pid, "spawn_main")
        assert len(model) == 1
        model[0].suspend()
        try:
            t0 = time.time()
            r = _ask(s.url, records[1], timeout=15)
            assert r.status_code == 504 and int(r.headers["retry-after"]) > 0, r.text
            assert "serve.request_timeout_s" in r.json()["detail"] and time.time() - t0 < 6
            time.sleep(1.1)  # nothing answered lately: /readyz asks the model
            t0 = time.time()
            ready = httpx.get(s.url + "/readyz", timeout=15)
            assert ready.status_code == 503 and "probe question" in ready.json()["detail"] and time.time() - t0 < 6
        finally:
            model[0].resume()
        deadline = time.time() + 30
        while (ready := httpx.get(s.url + "/readyz", timeout=15)).status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        assert ready.status_code == 200 and _ask_within(s.url, records[1], 60).status_code == 200
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


def _in_process_backend(trained, tmp_path, *overrides: str):
    """The server's backend with the model in this process (no socket): for what a test reaches
    inside it."""
    from explicitlm.config import load_config
    from serving.local import LocalBackend

    cfg = load_config(
        None,
        [
            f"serve.weights={trained['weights']}",
            f"serve.cache_path={tmp_path / 'bank.parquet'}",
            "model.fusion_dim=64",
            "serve.model_process=false",
            "serve.device=cpu",
            *overrides,
        ],
    )
    return LocalBackend(cfg)


def test_a_batch_that_fails_in_the_model_is_scored_one_question_at_a_time(trained, records, tmp_path):
    """A question that passes every check before the forward pass and still fails in it (here: the
    model raises whenever it is in the batch) gets an error of its own; its batch-mates get the
    answers they get alone. When every question fails, the model is what fails: the batch raises."""
    from explicitlm.scoring import Question

    backend = _in_process_backend(trained, tmp_path)
    try:
        model = backend.model
        qs = [Question(r["question"], r["options"]) for r in records[:3]]
        alone = [model.answer([q])[0] for q in qs]
        forward, poisoned = model._forward, {qs[1].question}

        def failing(questions):
            if poisoned & {q.question for q in questions}:
                raise ValueError("a failure only this question meets")
            return forward(questions)

        model._forward = failing
        out = model.answer(qs)
        assert out[1] == {"error": "unscorable", "field": "question", "detail": "this question could not be scored"}
        for i in (0, 2):
            assert out[i]["answer"] == alone[i]["answer"]
            assert out[i]["probabilities"] == pytest.approx(alone[i]["probabilities"], abs=1e-5)
        poisoned |= {q.question for q in qs}
        with pytest.raises(ValueError, match="only this question"):
            model.answer(qs)
        assert model.failed and "ValueError" in model.failed
    finally:
        backend.store.close()


def test_an_edit_that_times_out_says_its_outcome_is_unknown_and_a_resend_makes_it_once(trained, records, tmp_path):
    """The store takes longer than serve.request_timeout_s to log an edit: the client hears that the
    outcome is unknown and how to find it out (the key, the row's URL). The edit lands; sent again
    under the same Idempotency-Key, it returns the first outcome and makes no second version."""
    import asyncio

    from serving.service import EditOutcomeUnknown
    from serving.store import EditRejected

    backend = _in_process_backend(trained, tmp_path, "serve.request_timeout_s=0.3")
    try:
        store, uuid = backend.store, records[0]["uuid"]
        v0, edit = store.version, store.edit
        with pytest.raises(EditRejected, match="control text '<\\|im_end\\|>'"):  # a 422, nothing logged
            edit(uuid, "Oslo<|im_end|>", create=False)
        assert store.version == v0

        def slow_edit(*args, **kwargs):
            time.sleep(1.0)
            return edit(*args, **kwargs)

        store.edit = slow_edit
        with pytest.raises(EditOutcomeUnknown) as err:
            asyncio.run(backend.edit(uuid, "A slow edit.", create=False, key="slow-1"))
        assert "Idempotency-Key" in str(err.value) and f"/memory/rows/{uuid}" in str(err.value)
        deadline = time.time() + 10
        while store.version == v0 and time.time() < deadline:  # the edit lands after the deadline
            time.sleep(0.05)
        assert store.version == v0 + 1 and store.row(uuid)["text"] == "A slow edit."
        store.edit = edit
        again = asyncio.run(backend.edit(uuid, "A slow edit.", create=False, key="slow-1"))
        assert again["version"] == v0 + 1 and store.version == v0 + 1
    finally:
        backend.store.close()


def test_a_model_further_behind_than_the_kept_edits_loads_the_bank_file_again(trained, records, tmp_path):
    """The store keeps only the edits its bank file lacks: a model that missed edits the file has
    since taken loads the file again before it answers, and answers from the newest version."""
    from explicitlm.scoring import Question

    backend = _in_process_backend(trained, tmp_path)
    try:
        v0, rec = backend.model_version, records[0]
        for r in records[:3]:  # not pushed to the model: straight to the store
            backend.store.edit(r["uuid"], f"Edited while the model was away: {r['uuid']}.", create=False)
        backend.store.compact()
        assert backend.store.edits_since(v0) is None
        out = backend._answer_batch([Question(rec["question"], rec["options"])])
        assert backend.model_version == v0 + 3 and out[0]["bank_version"] == v0 + 3
        row = backend.model.model.bank.row_of(rec["uuid"])
        assert backend.model.model.bank.texts[row] == f"Edited while the model was away: {rec['uuid']}."
    finally:
        backend.store.close()


def test_device_setting():
    import torch

    from explicitlm.config import ConfigError, load_config
    from explicitlm.errors import UserError
    from explicitlm.loading import resolve_device

    for key in ("serve.device", "eval.device"):
        with pytest.raises(ConfigError, match=f"{key} must be auto, cpu or cuda"):
            load_config(None, [f"{key}=tpu"])
    with pytest.raises(ConfigError, match="eval.num_gpus > 0 holds GPUs for a model that eval.device=cpu"):
        load_config(None, ["eval.num_gpus=1", "eval.device=cpu"])
    assert resolve_device("cpu", "serve.device").type == "cpu"
    assert resolve_device("auto", "serve.device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="eval.device=cuda but torch sees no CUDA device"):
            resolve_device("cuda", "eval.device")


def test_every_model_caps_onednn_kernels_before_it_loads(trained, monkeypatch):
    """serve.onednn_cache reaches oneDNN through its environment variable, set before the backbone
    loads (oneDNN reads it at its first kernel); a value the environment already holds is kept."""
    import explicitlm.loading
    from explicitlm.config import load_config
    from serving.service import ONEDNN_CACHE, MemoryModel

    seen = []

    def loading(*args, **kwargs):
        seen.append(os.environ.get(ONEDNN_CACHE))
        raise RuntimeError("recorded; not loaded")

    monkeypatch.setattr(explicitlm.loading, "build_model", loading)
    cfg = load_config(None, [f"serve.weights={trained['weights']}", "serve.device=cpu", "serve.onednn_cache=17"])
    monkeypatch.delenv(ONEDNN_CACHE, raising=False)
    with pytest.raises(RuntimeError, match="recorded; not loaded"):
        MemoryModel(cfg)
    monkeypatch.setenv(ONEDNN_CACHE, "5")
    with pytest.raises(RuntimeError, match="recorded; not loaded"):
        MemoryModel(cfg)
    assert seen == ["17", "5"]
