"""The same FastAPI app on Ray Serve: model replicas with dynamic batching, and the bank's owner.

    serve run configs/serve/serve.yaml                 # local Ray
    serve deploy configs/serve/serve.yaml              # a running cluster (RAY_ADDRESS / --address)

An application has three deployments. `Gateway` is the HTTP ingress (the FastAPI app, one replica
that needs no CPU): it sends /answer to a model replica, and sends it again to another when the
replica dies with it in flight (an answer only reads), so a lost replica costs its requests time,
not an error. `ExplicitLM` is the model (`serve.num_replicas` replicas, `serve.replica_cpus` and
`serve.replica_gpus` each); `@serve.batch` gathers concurrent /answer calls into one scorer call
(max_ongoing_requests is raised so that batches can fill). `BankOwner` is one replica that needs
no CPU: the serving bank's store (serving/store.py), which logs every edit before applying it; the
gateway sends it edits, reads and searches. The owner belongs to its
application: Serve starts it with the app, restarts it if it dies (it replays its log) and stops it
when the app is deleted or redeployed, so two applications on two banks have an owner each, and a
redeploy on another bank gets an owner of that bank. Model replicas pull the edits they lack from
the owner before every batch: the very next request sees an edit whichever replica serves it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from explicitlm.config import Config, load_config
from explicitlm.loading import config_from_dict, fill_from_weights
from explicitlm.scoring import Question
from serving.app import API_KEY_ENV, create_app
from serving.service import MemoryModel, ModelUnavailable, RequestLimits
from serving.store import EditRejected, StoreError

_GATEWAY: Any = None  # the Gateway replica living in this process
OWNER_TIMEOUT_S = 10.0
MODEL_TIMEOUT_S = 120.0  # the longest the gateway waits for an answer, re-sending it while replicas die
logger = logging.getLogger("ray.serve")


@serve.deployment(
    name="BankOwner",
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=60,  # closing brings the bank file up to date
)
class BankOwner:
    """The serving bank's one owner in an application: its store, reached through a handle."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from transformers import AutoTokenizer

        from serving.store import BankStore, ensure_serving_bank, serving_bank_path

        cfg = config_from_dict(cfg_dict)
        path = serving_bank_path(cfg.serve.cache_path, cfg.serve.weights, cfg.model.cache_path)
        ensure_serving_bank(cfg.model.cache_path, path)
        self.store = BankStore(
            path,
            AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path),
            cfg.serve.compact_every,
            compact_interval_s=cfg.serve.compact_interval_s,
        )
        self.search_timeout_s = cfg.serve.search_timeout_s
        self.searches = threading.BoundedSemaphore(2)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.store.path), "version": self.store.version}

    def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        # Errors travel as values: a handle call re-raises an exception wrapped in Ray's own type.
        try:
            return {"entry": self.store.edit(uuid, text, create)}
        except EditRejected as e:
            return {"status": e.status, "detail": str(e)}
        except StoreError as e:
            return {"status": 503, "detail": str(e)}

    def edits_since(self, version: int) -> list[dict[str, Any]] | None:
        return self.store.edits_since(version)

    def row(self, uuid: str) -> dict[str, Any] | None:
        return self.store.row(uuid)

    def search(self, fragment: str, limit: int) -> dict[str, Any]:
        with self.searches:
            return self.store.search(fragment, limit, self.search_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), "broken": self.store.broken}

    def check_health(self) -> None:
        if self.store.broken:
            raise RuntimeError(self.store.broken)

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


async def _owner_call(method: Any, *args: Any) -> Any:
    """A call to the bank owner's handle that a timeout or a dead owner turns into ModelUnavailable (a 503)."""
    try:
        return await asyncio.wait_for(method.remote(*args), OWNER_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - a timeout or a dead owner: Serve is restarting it
        raise ModelUnavailable(f"the memory bank's owner is unavailable: {type(e).__name__}: {e}") from None


class _Model:
    """One ExplicitLM replica: the model, and a handle to its application's bank owner."""

    async def __init__(self, owner, cfg: Config) -> None:
        self.owner = owner
        info = await _owner_call(owner.info)
        cfg = copy.deepcopy(cfg)
        cfg.model.cache_path = info["path"]
        self.model = MemoryModel(cfg)
        self.model_cfg = cfg
        self._answer_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    async def _edits(self) -> list[dict[str, Any]]:
        """The edits this replica lacks; when the owner no longer keeps them (it restarted after
        rewriting the file), the replica loads the bank file again."""
        edits = await _owner_call(self.owner.edits_since, self.model.version)
        if edits is None:
            loop = asyncio.get_running_loop()
            self.model = await loop.run_in_executor(None, self._reload)
            edits = await _owner_call(self.owner.edits_since, self.model.version)
        return edits or []

    def _reload(self) -> MemoryModel:
        with self.model.lock:  # no edit of the old model runs torch on one thread meanwhile
            return MemoryModel(copy.deepcopy(self.model_cfg))

    @serve.batch
    async def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        edits = await self._edits()
        return await asyncio.get_running_loop().run_in_executor(None, self.model.answer, questions, edits)

    async def answer(self, q: Question) -> dict[str, Any]:
        # Errors the client should see travel as values: a handle re-raises them wrapped in Ray's type.
        try:
            return await self._answer_batch(q)
        except ModelUnavailable as e:
            return {"unavailable": str(e)}

    async def readiness(self) -> dict[str, Any]:
        if self.model.failed:
            return {"ready": False, "reason": f"the model's last batch failed: {self.model.failed}"}
        try:
            stats = await _owner_call(self.owner.stats)
        except ModelUnavailable as e:
            return {"ready": False, "reason": str(e)}
        if stats["broken"]:
            return {"ready": False, "reason": stats["broken"]}
        m = self.model
        return {"ready": True, "bank_version": m.version, "adapter": m.adapter, "device": str(m.device)}

    async def check_health(self) -> None:
        """Serve replaces a replica whose model cannot answer; an idle one answers a probe first."""
        await asyncio.get_running_loop().run_in_executor(None, self.model.probe)
        if self.model.failed:
            raise RuntimeError(self.model.failed)


class _Gateway:
    """The app's backend (`serving.app.Backend`) on Ray Serve: model calls go to a model replica,
    bank calls to the owner."""

    def __init__(self, model, owner) -> None:
        import serving.deployment as here

        self.model, self.owner = model, owner
        here._GATEWAY = self

    async def _model_call(self, method: str, *args: Any, budget_s: float = MODEL_TIMEOUT_S) -> Any:
        """Send a model call, and send it again while the replica that took it died or none can take
        it (Serve is replacing it), all within `budget_s` (a deployment with no replica up makes a
        call wait, not fail). Model calls only read, so sending one twice changes nothing."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + budget_s, 0.05
        while True:
            try:
                call = getattr(self.model, method).remote(*args)
                return await asyncio.wait_for(call, max(deadline - loop.time(), 0.01))
            except asyncio.TimeoutError:
                raise ModelUnavailable(f"no model replica answered within {budget_s:.0f} s") from None
            except (RayActorError, DeploymentUnavailableError, BackPressureError) as e:
                if loop.time() + delay > deadline:
                    raise ModelUnavailable(f"no model replica could answer: {type(e).__name__}: {e}") from None
                logger.warning("%s: a model replica failed (%s); sending the call again", method, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def answer(self, q: Question) -> dict[str, Any]:
        result = await self._model_call("answer", q)
        if "unavailable" in result:
            raise ModelUnavailable(result["unavailable"])
        return result

    async def readiness(self) -> dict[str, Any]:
        try:
            return await self._model_call("readiness", budget_s=OWNER_TIMEOUT_S)
        except ModelUnavailable as e:
            return {"ready": False, "reason": str(e)}

    async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        result = await _owner_call(self.owner.edit, uuid, text, create)
        if "entry" in result:
            return result["entry"]
        if result["status"] == 503:
            raise StoreError(result["detail"])
        raise EditRejected(result["status"], result["detail"])

    async def row(self, uuid: str) -> dict[str, Any] | None:
        return await _owner_call(self.owner.row, uuid)

    async def search(self, fragment: str, limit: int) -> dict[str, Any]:
        return await _owner_call(self.owner.search, fragment, limit)

    async def stats(self) -> dict[str, Any]:
        s = await _owner_call(self.owner.stats)
        s.pop("broken", None)
        return s

    def alive(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class _Proxy:
    """Routes the app's backend calls to this process's gateway (one replica per actor process)."""

    def __getattr__(self, name: str):
        import serving.deployment as here

        return getattr(here._GATEWAY, name)


def build_app(
    overrides: list[str] | tuple[str, ...] = (), config_name: str | None = None, num_replicas: int | None = None
):
    """The application: `ExplicitLM` replicas bound to their own `BankOwner`."""
    cfg = load_config(config_name, list(overrides))
    if not cfg.serve.weights:
        raise ValueError("serve.weights is required (a folder written by ray_jobs/sft.py)")
    cfg = fill_from_weights(cfg, cfg.serve.weights)
    app = create_app(_Proxy(), RequestLimits.from_config(cfg))

    @serve.deployment(
        name="ExplicitLM",
        num_replicas=num_replicas if num_replicas is not None else "auto",
        max_ongoing_requests=max(4 * cfg.serve.max_batch_size, 64),
        autoscaling_config=None
        if num_replicas is not None
        else {
            "min_replicas": 1,
            "max_replicas": max(cfg.serve.num_replicas, 1),
            "target_ongoing_requests": cfg.serve.max_batch_size,
        },
        ray_actor_options={"num_cpus": cfg.serve.replica_cpus, "num_gpus": cfg.serve.replica_gpus},
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    class ExplicitLM(_Model):
        async def __init__(self, owner) -> None:
            await super().__init__(owner, cfg)

    @serve.deployment(
        name="Gateway",
        num_replicas=1,
        max_ongoing_requests=1024,
        # The edit key travels from the deploying environment to the gateway, never through a file.
        ray_actor_options={
            "num_cpus": 0,
            "runtime_env": {"env_vars": {k: os.environ[k] for k in (API_KEY_ENV,) if k in os.environ}},
        },
    )
    @serve.ingress(app)
    class Gateway(_Gateway):
        pass

    owner = BankOwner.bind(asdict(cfg))
    return Gateway.bind(ExplicitLM.bind(owner), owner)


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run` / `serve deploy`: args are config overrides (key: value)."""
    args = dict(args or {})
    config_name, replicas = args.pop("config_name", None), args.pop("num_replicas", None)
    return build_app(
        [f"{k}={v}" for k, v in args.items()], config_name, int(replicas) if replicas is not None else None
    )
