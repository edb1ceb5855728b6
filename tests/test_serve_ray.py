"""The app on Ray Serve with two replicas: edits reach every replica, concurrent edits are all kept."""

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port
from tests.test_serving import KEY, trained  # noqa: F401 - the module fixture


@pytest.fixture(scope="module")
def serve_app(trained, ray_session, records):  # noqa: F811
    import ray
    from ray import serve

    from serving.deployment import OWNER_NAME, build_deployment

    os.environ["EXPLICITLM_API_KEY"] = KEY
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    dep = build_deployment(
        [f"serve.weights={trained['weights']}", "model.fusion_dim=64", "serve.replica_cpus=0.5"], num_replicas=2
    )
    serve.run(dep.bind(), name="explicitlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    try:
        ray.kill(ray.get_actor(OWNER_NAME, namespace="explicitlm"))
    except ValueError:
        pass
    os.environ.pop("EXPLICITLM_API_KEY", None)


def test_answer_on_two_replicas_and_edits_reach_both(serve_app, records):
    url = serve_app
    rec = records[3]
    with ThreadPoolExecutor(16) as pool:  # concurrent requests share batches
        bodies = list(
            pool.map(
                lambda _: httpx.post(
                    url + "/answer", json={"question": rec["question"], "options": rec["options"]}, timeout=60
                ).json(),
                range(16),
            )
        )
    assert len({b["index"] for b in bodies}) == 1 and abs(sum(bodies[0]["probabilities"]) - 1) < 1e-4
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.put(url + f"/memory/{rec['uuid']}", json={"text": "Edited once."}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    seen = [httpx.get(url + f"/memory/{rec['uuid']}", timeout=60).json()["text"] for _ in range(20)]
    assert seen == ["Edited once."] * 20  # whichever replica answers, the very next request sees it
    uuids = [r["uuid"] for r in records[10:18]]
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda u: (
                    httpx.put(
                        url + f"/memory/{u}", json={"text": f"Concurrent edit of {u}."}, headers=auth, timeout=60
                    ).status_code
                ),
                uuids,
            )
        )
    assert codes == [200] * 8
    for _ in range(3):
        for u in uuids:
            assert httpx.get(url + f"/memory/{u}", timeout=60).json()["text"] == f"Concurrent edit of {u}."
