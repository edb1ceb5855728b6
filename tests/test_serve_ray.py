"""The app on Ray Serve: two applications on two banks, each with its own bank owner; edits reach
every replica; a killed model replica, bank owner or gateway replica loses no edit (only the killed
gateway's requests in flight fail); a hung owner leaves answers and reads to the replicas; the owner
lives and dies with its application; the key never shows in Serve's REST API; model replicas ask
for GPUs from config, the gateway for none."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port
from tests.test_serving import AUTH, KEY


def _actors(app: str, deployment: str) -> list[dict]:
    import ray._private.state as state

    return [
        a
        for a in state.actors().values()
        if a["ActorClassName"] == f"ServeReplica:{app}:{deployment}" and a["State"] == "ALIVE"
    ]


def _owner_actors(app: str) -> list[dict]:
    return _actors(app, "BankOwner")


def _app_args(trained, folder, name):
    return [
        f"serve.weights={trained['weights']}",
        f"serve.cache_path={folder / name / 'bank.parquet'}",
        f"serve.api_key_file={folder / 'api_key'}",
        "model.fusion_dim=64",
        "serve.replica_cpus=0.5",
    ]


@pytest.fixture(scope="module")
def two_apps(trained, ray_session, tmp_path_factory):
    from ray import serve

    from serving.deployment import build_app

    # The deploying process has the key too: it must not travel from there in a runtime_env.
    os.environ["EXPLICITLM_API_KEY"] = KEY
    folder = tmp_path_factory.mktemp("apps")
    (folder / "api_key").write_text(KEY + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_app_args(trained, folder, "a"), num_replicas=2), name="a", route_prefix="/a")
    # b: a shorter deadline, so that the stopped-owner test's edit gives up within seconds.
    b_args = [*_app_args(trained, folder, "b"), "serve.request_timeout_s=8"]
    serve.run(build_app(b_args, num_replicas=1), name="b", route_prefix="/b")
    yield {"url": f"http://127.0.0.1:{port}", "folder": folder}
    serve.shutdown()
    os.environ.pop("EXPLICITLM_API_KEY", None)


def test_two_apps_serve_their_own_banks_and_edits_reach_every_replica(two_apps, records):
    a, b = two_apps["url"] + "/a", two_apps["url"] + "/b"
    rec = records[3]
    with ThreadPoolExecutor(16) as pool:  # concurrent requests share batches, on both replicas
        bodies = list(
            pool.map(
                lambda _: httpx.post(
                    a + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60
                ).json(),
                range(16),
            )
        )
    assert len({x["index"] for x in bodies}) == 1 and abs(sum(bodies[0]["probabilities"]) - 1) < 1e-4
    original = httpx.get(b + f"/memory/rows/{rec['uuid']}", timeout=60).json()["text"]
    r = httpx.put(a + f"/memory/rows/{rec['uuid']}", json={"text": "Edited in a."}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    seen = [httpx.get(a + f"/memory/rows/{rec['uuid']}", timeout=60).json()["text"] for _ in range(10)]
    assert seen == ["Edited in a."] * 10
    answers = [
        httpx.post(a + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60).json()
        for _ in range(10)
    ]
    assert all(x["bank_version"] >= version for x in answers)  # whichever replica answers has the edit
    assert httpx.get(b + f"/memory/rows/{rec['uuid']}", timeout=60).json()["text"] == original  # b's own bank
    uuids = [r["uuid"] for r in records[10:18]]
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda u: (
                    httpx.put(
                        a + f"/memory/rows/{u}", json={"text": f"Concurrent edit of {u}."}, headers=AUTH, timeout=60
                    ).status_code
                ),
                uuids,
            )
        )
    assert codes == [200] * 8
    for u in uuids:
        assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] == f"Concurrent edit of {u}."
    assert httpx.get(a + "/memory", timeout=60).json()["version"] == version + 8
    assert httpx.get(b + "/memory", timeout=60).json()["version"] == version - 1
    assert httpx.put(b + f"/memory/rows/{rec['uuid']}", json={"text": "x"}).status_code == 401


def test_killed_replica_owner_and_gateway_lose_no_edit_and_fail_only_the_gateway_s_requests(two_apps, records):
    """SIGKILL, one after another in a stream of answers and edits to app a: one of its two model
    replicas, its bank owner, one of its two gateway replicas. No request gets a 5xx from the first
    two kills (the gateway sends answers again to another replica and edits again, under one
    Idempotency-Key, to the restarted owner; meanwhile replicas answer from the bank they hold).
    The third fails only the requests in flight on the killed gateway (Serve's proxy gives them a
    500 and never resends them); a client sending those again, edits under their Idempotency-Key,
    gets them made once. Every acknowledged edit is there afterwards. Tens of requests."""
    a = two_apps["url"] + "/a"
    uuids = [r["uuid"] for r in records[40:52]]
    v0 = httpx.get(a + "/memory", timeout=60).json()["version"]
    tried: dict[str, list[str]] = {u: [] for u in uuids}  # per row: the texts acknowledged, in order
    calls: list[tuple[str, float, float, int]] = []  # (kind, sent, answered, status), first tries only
    answered_versions: list[tuple[float, int]] = []
    stop = threading.Event()

    def editor(k: int) -> None:
        with httpx.Client(timeout=90) as c:
            for j in range(10_000):
                if stop.is_set():
                    return
                u, text = uuids[(2 * j + k) % len(uuids)], f"Edit {k}-{j} during the kills."
                headers = {**AUTH, "Idempotency-Key": f"kill-test-{k}-{j}"}
                for attempt in range(5):  # a careful client: the same edit, the same key
                    sent = time.time()
                    try:
                        code = c.put(a + f"/memory/rows/{u}", json={"text": text}, headers=headers).status_code
                    except httpx.HTTPError:
                        code = 0
                    if attempt == 0:
                        calls.append(("edit", sent, time.time(), code))
                    if code == 200:
                        tried[u].append(text)
                        break
                    time.sleep(0.2)
                time.sleep(0.05)

    def asker(rec) -> None:
        with httpx.Client(timeout=90) as c:
            while not stop.is_set():
                sent = time.time()
                try:
                    r = c.post(a + "/answer", json={"question": rec["question"], "options": rec["options"]})
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                calls.append(("answer", sent, time.time(), code))
                if code == 200:
                    answered_versions.append((time.time(), r.json()["bank_version"]))
                time.sleep(0.05)

    threads = [threading.Thread(target=editor, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=asker, args=(records[k],)) for k in range(3)]
    for t in threads:
        t.start()

    def kill(deployment: str) -> float:
        time.sleep(2)
        replicas = _actors("a", deployment)
        assert replicas, deployment
        os.kill(replicas[0]["Pid"], signal.SIGKILL)
        return time.time()

    kill("ExplicitLM")
    owner_killed = kill("BankOwner")
    deadline = time.time() + 30
    while time.time() < deadline and sum(t > owner_killed for t, _ in answered_versions) < 3:
        time.sleep(0.1)
    gateway_killed = kill("Gateway")
    deadline = time.time() + 60
    while time.time() < deadline and (len(_owner_actors("a")) != 1 or len(_actors("a", "Gateway")) != 2):
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert sum(k == "answer" for k, *_ in calls) > 20 and sum(map(len, tried.values())) > 20
    failed = [c for c in calls if c[3] != 200]
    assert all(code == 500 and sent < gateway_killed < done for _, sent, done, code in failed), failed
    assert sum(owner_killed < t < gateway_killed for t, _ in answered_versions) >= 3  # the owner's loss stops no answer
    version = httpx.get(a + "/memory", timeout=60).json()["version"]
    assert version - v0 == sum(map(len, tried.values()))  # every edit made exactly once, resent or not
    for _ in range(3):  # whichever replica answers
        for u, texts in tried.items():
            assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] == texts[-1]
        rec = records[40]
        body = httpx.post(a + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60)
        assert body.status_code == 200 and body.json()["bank_version"] == version


def test_the_key_is_read_by_the_gateway_and_never_shown_by_serve(two_apps, records):
    from ray.serve.context import _get_global_client

    details = json.dumps(_get_global_client().get_serve_details(), default=str)  # what Serve's REST API returns
    assert '"ray_actor_options"' in details and KEY not in details  # a runtime_env's variables would be here
    a = two_apps["url"] + "/a"
    assert httpx.put(a + f"/memory/rows/{records[2]['uuid']}", json={"text": "x"}).status_code == 401
    r = httpx.put(a + f"/memory/rows/{records[2]['uuid']}", json={"text": "Keyed through a file."}, headers=AUTH)
    assert r.status_code == 200, r.text


def test_a_stopped_owner_leaves_answers_and_reads_to_the_replica_and_edits_unknown(two_apps, records):
    """The bank's owner hangs (SIGSTOP): answers and row reads come from the model replica's bank, with
    its bank_version; /readyz says edits are off; an edit is a 504 saying its outcome is unknown and
    how to check it. Once the owner runs again (SIGCONT), the edit sent again under its Idempotency-Key
    is made once, whether or not the first try was (Serve cancels a call its caller stopped waiting
    for, if it has not started)."""
    b, rec = two_apps["url"] + "/b", records[30]
    v0 = httpx.get(b + "/memory", timeout=60).json()["version"]
    original = httpx.get(b + f"/memory/rows/{rec['uuid']}", timeout=60).json()["text"]
    body = {"question": rec["question"], "options": rec["options"]}
    assert httpx.post(b + "/answer", json=body, timeout=60).status_code == 200  # warm, before the clock runs
    (owner,) = _owner_actors("b")
    headers = {**AUTH, "Idempotency-Key": "stopped-owner-1"}
    os.kill(owner["Pid"], signal.SIGSTOP)
    try:
        t0 = time.time()
        r = httpx.put(
            b + f"/memory/rows/{rec['uuid']}", json={"text": "Sent while the owner hung."}, headers=headers, timeout=60
        )
        assert r.status_code == 504 and "may or may not have been made" in r.json()["detail"], r.text
        assert f"/memory/rows/{rec['uuid']}" in r.json()["detail"] and time.time() - t0 < 20
        for _ in range(3):
            answer = httpx.post(b + "/answer", json=body, timeout=60)
            assert answer.status_code == 200 and answer.json()["bank_version"] == v0, answer.text
        row = httpx.get(b + f"/memory/rows/{rec['uuid']}", timeout=60).json()
        assert row["text"] == original and row["bank_version"] == v0
        ready = httpx.get(b + "/readyz", timeout=60)
        assert ready.status_code == 200 and ready.json()["edits"] is False, ready.text
    finally:
        os.kill(owner["Pid"], signal.SIGCONT)
    deadline = time.time() + 5  # the owner runs again; an edit it took (Serve may have cancelled it) is made
    while (landed := httpx.get(b + "/memory", timeout=60).json()["version"] - v0) == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert landed in (0, 1)
    r = httpx.put(
        b + f"/memory/rows/{rec['uuid']}", json={"text": "Sent while the owner hung."}, headers=headers, timeout=60
    )
    assert r.status_code == 200 and r.json()["version"] == v0 + 1, r.text
    assert (r.headers.get("idempotent-replayed") == "true") is bool(landed)  # made once, either way
    assert httpx.get(b + "/memory", timeout=60).json()["version"] == v0 + 1
    deadline = time.time() + 15
    while not (ready := httpx.get(b + "/readyz", timeout=60).json()).get("edits") and time.time() < deadline:
        time.sleep(0.5)
    assert ready["edits"] is True, ready


def test_the_bank_owner_lives_and_dies_with_its_app(two_apps, trained, records, tokenizer):
    import ray
    from ray import serve

    from serving.deployment import build_app
    from serving.store import BankStore

    folder, a = two_apps["folder"], two_apps["url"] + "/a"
    assert len(_owner_actors("a")) == 1 and len(_owner_actors("b")) == 1
    owners = [x for x in ray.util.list_named_actors(all_namespaces=True) if "owner" in x["name"].lower()]
    assert sorted(x["name"].split("#")[0] for x in owners) == ["SERVE_REPLICA::a", "SERVE_REPLICA::b"]  # Serve's own
    u = records[20]["uuid"]
    original = httpx.get(two_apps["url"] + f"/b/memory/rows/{u}", timeout=60).json()["text"]
    assert httpx.put(a + f"/memory/rows/{u}", json={"text": "Kept across redeploys."}, headers=AUTH).status_code == 200
    serve.delete("a")
    deadline = time.time() + 60
    while _owner_actors("a") and time.time() < deadline:
        time.sleep(0.5)
    assert not _owner_actors("a") and len(_owner_actors("b")) == 1
    store = BankStore(folder / "a" / "bank.parquet", tokenizer, lock_timeout_s=30)  # released, file up to date
    assert store.row(u)["text"] == "Kept across redeploys."
    store.close()
    # Deployed again on another bank, the app serves that bank. (An owner restarted on the same bank
    # serves its edits: the kill test's.)
    serve.run(build_app(_app_args(trained, folder, "a2"), num_replicas=1), name="a", route_prefix="/a")
    assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] == original
    assert len(_owner_actors("a")) == 1
    assert (folder / "a2" / "bank.parquet").exists()


def test_replicas_ask_for_the_configured_gpus(trained):
    from serving.deployment import build_app

    app = build_app(
        [f"serve.weights={trained['weights']}", "serve.replica_gpus=1", "serve.replica_cpus=2"], num_replicas=2
    )
    gateway = app._bound_deployment
    model = gateway.init_args[0]._bound_deployment
    assert model.name == "ExplicitLM" and model.ray_actor_options["num_gpus"] == 1
    assert model.ray_actor_options["num_cpus"] == 2 and gateway.ray_actor_options["num_cpus"] == 0
    assert gateway.num_replicas == 2 and "runtime_env" not in gateway.ray_actor_options
    default = build_app([f"serve.weights={trained['weights']}"], num_replicas=1)._bound_deployment
    assert default.init_args[0]._bound_deployment.ray_actor_options["num_gpus"] == 0
