"""The app on Ray Serve: two applications on two banks, each with its own bank owner; edits reach
every replica; a killed model replica fails no request; the owner lives and dies with its
application; model replicas ask for GPUs from config, the gateway for none."""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_serving import AUTH, KEY, trained  # noqa: F401 - the module fixture


def _owner_actors(app: str) -> list[dict]:
    import ray._private.state as state

    return [
        a
        for a in state.actors().values()
        if a["ActorClassName"] == f"ServeReplica:{app}:BankOwner" and a["State"] == "ALIVE"
    ]


def _app_args(trained, folder, name):  # noqa: F811
    return [
        f"serve.weights={trained['weights']}",
        f"serve.cache_path={folder / name / 'bank.parquet'}",
        "model.fusion_dim=64",
        "serve.replica_cpus=0.5",
    ]


@pytest.fixture(scope="module")
def two_apps(trained, ray_session, tmp_path_factory):  # noqa: F811
    from ray import serve

    from serving.deployment import build_app

    os.environ["EXPLICITLM_API_KEY"] = KEY
    folder = tmp_path_factory.mktemp("apps")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_app_args(trained, folder, "a"), num_replicas=2), name="a", route_prefix="/a")
    serve.run(build_app(_app_args(trained, folder, "b"), num_replicas=1), name="b", route_prefix="/b")
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


@pytest.mark.slow
def test_a_killed_replica_loses_no_acknowledged_edit(two_apps, records):
    """SIGKILL one of app a's two model replicas in the middle of a stream of edits and answers: no
    request fails (the gateway re-sends answers the dead replica held), Serve replaces it, and every
    acknowledged edit is there afterwards, on every replica."""
    import signal
    import threading

    import ray
    import ray._private.state as state
    from ray import serve

    a = two_apps["url"] + "/a"
    uuids = [r["uuid"] for r in records[40:60]]
    tried: dict[str, list[tuple[str, bool]]] = {u: [] for u in uuids}  # per row: (text, acknowledged)
    stop = threading.Event()

    def editor() -> None:
        with httpx.Client(timeout=60) as c:
            for j in range(10_000):
                if stop.is_set():
                    return
                u, text = uuids[j % len(uuids)], f"Edit {j} during the kill."
                try:
                    ok = c.put(a + f"/memory/rows/{u}", json={"text": text}, headers=AUTH).status_code == 200
                except httpx.HTTPError:
                    ok = False
                tried[u].append((text, ok))

    codes: list[int] = []

    def asker(rec) -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                codes.append(
                    c.post(a + "/answer", json={"question": rec["question"], "options": rec["options"]}).status_code
                )

    threads = [threading.Thread(target=editor)] + [threading.Thread(target=asker, args=(records[k],)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    replicas = [
        x
        for x in state.actors().values()
        if x["ActorClassName"] == "ServeReplica:a:ExplicitLM" and x["State"] == "ALIVE"
    ]
    assert len(replicas) == 2
    os.kill(replicas[0]["Pid"], signal.SIGKILL)
    deadline = time.time() + 120
    while sum(map(len, tried.values())) < 2 * len(uuids) and time.time() < deadline:  # every row edited
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert len(codes) > 4 and set(codes) == {200}, sorted(set(codes))
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    resent = sum(f.read_text().count("sending the call again") for f in logs.glob("replica_a_Gateway_*.log"))
    assert resent >= 1  # answers were in flight on the killed replica, and were sent again
    assert all(ok for t in tried.values() for _, ok in t)  # edits never touch a model replica
    deadline = time.time() + 300
    while time.time() < deadline:
        dep = serve.status().applications["a"].deployments["ExplicitLM"]
        if dep.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert serve.status().applications["a"].deployments["ExplicitLM"].replica_states.get("RUNNING", 0) == 2
    last_acked = {u: max(i for i, (_, ok) in enumerate(t) if ok) for u, t in tried.items() if any(ok for _, ok in t)}
    assert len(last_acked) == len(uuids)
    version = httpx.get(a + "/memory", timeout=60).json()["version"]
    for _ in range(3):  # whichever replica answers
        for u, i in last_acked.items():
            allowed = {text for text, _ in tried[u][i:]}  # the acknowledged one, or a later unacknowledged one
            assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] in allowed
        rec = records[40]
        body = httpx.post(a + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60)
        assert body.status_code == 200 and body.json()["bank_version"] == version


def test_the_bank_owner_lives_and_dies_with_its_app(two_apps, trained, records, tokenizer):  # noqa: F811
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
    # Redeployed on the same bank, the app serves its edits; on another bank, that bank.
    serve.run(build_app(_app_args(trained, folder, "a"), num_replicas=1), name="a", route_prefix="/a")
    assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] == "Kept across redeploys."
    serve.run(build_app(_app_args(trained, folder, "a2"), num_replicas=1), name="a", route_prefix="/a")
    assert httpx.get(a + f"/memory/rows/{u}", timeout=60).json()["text"] == original
    assert len(_owner_actors("a")) == 1
    assert (folder / "a2" / "bank.parquet").exists()


def test_replicas_ask_for_the_configured_gpus(trained):  # noqa: F811
    from serving.deployment import build_app

    app = build_app(
        [f"serve.weights={trained['weights']}", "serve.replica_gpus=1", "serve.replica_cpus=2"], num_replicas=2
    )
    gateway = app._bound_deployment
    model = gateway.init_args[0]._bound_deployment
    assert model.name == "ExplicitLM" and model.ray_actor_options["num_gpus"] == 1
    assert model.ray_actor_options["num_cpus"] == 2 and gateway.ray_actor_options["num_cpus"] == 0
    default = build_app([f"serve.weights={trained['weights']}"], num_replicas=1)._bound_deployment
    assert default.init_args[0]._bound_deployment.ray_actor_options["num_gpus"] == 0
