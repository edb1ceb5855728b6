"""The same FastAPI app on Ray Serve: model replicas with dynamic batching, and the bank's owner.

    serve run configs/serve/serve.yaml                 # local Ray
    serve deploy configs/serve/serve.yaml              # a running cluster (RAY_ADDRESS / --address)

An application has two deployments. `ExplicitLM` is the HTTP ingress and the model
(`serve.num_replicas` replicas, `serve.replica_cpus` and `serve.replica_gpus` each); `@serve.batch`
gathers concurrent /answer calls into one scorer call (max_ongoing_requests is raised so that
batches can fill). `BankOwner` is one replica that needs no CPU: the serving bank's store
(serving/store.py), which logs every edit before applying it. The owner belongs to its application:
Serve starts it with the app, restarts it if it dies (it replays its log) and stops it when the app
is deleted or redeployed, so two applications on two banks have an owner each, and a redeploy on
another bank gets an owner of that bank. Replicas send edits to the owner and, before every batch,
pull the edits they lack: the very next request sees an edit whichever replica serves it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from dataclasses import asdict
from typing import Any

from ray import serve

from explicitlm.config import Config, load_config
from explicitlm.loading import config_from_dict, fill_from_weights
from explicitlm.scoring import Question
from serving.app import API_KEY_ENV, create_app
from serving.service import MemoryModel, ModelUnavailable, RequestLimits
from serving.store import EditRejected, StoreError

_REPLICA: Any = None  # the ExplicitLM replica living in this process
OWNER_TIMEOUT_S = 10.0


@serve.deployment(
    name="BankOwner",
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=5,
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


class _Backend:
    """One ExplicitLM replica: the model, and a handle to its application's bank owner."""

    async def __init__(self, owner, cfg: Config) -> None:
        import serving.deployment as here

        self.owner = owner
        info = await self._owner_call("info")
        cfg = copy.deepcopy(cfg)
        cfg.model.cache_path = info["path"]
        self.model = MemoryModel(cfg)
        self.model_cfg = cfg
        self._answer_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        here._REPLICA = self

    async def _owner_call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self.owner, method).remote(*args), OWNER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a timeout or a dead owner: Serve is restarting it
            raise ModelUnavailable(f"the memory bank's owner is unavailable: {type(e).__name__}: {e}") from None

    async def _edits(self) -> list[dict[str, Any]]:
        """The edits this replica lacks; when the owner no longer keeps them (it restarted after
        rewriting the file), the replica loads the bank file again."""
        edits = await self._owner_call("edits_since", self.model.version)
        if edits is None:
            loop = asyncio.get_running_loop()
            self.model = await loop.run_in_executor(None, MemoryModel, copy.deepcopy(self.model_cfg))
            edits = await self._owner_call("edits_since", self.model.version)
        return edits or []

    @serve.batch
    async def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        edits = await self._edits()
        return await asyncio.get_running_loop().run_in_executor(None, self.model.answer, questions, edits)

    async def answer(self, q: Question) -> dict[str, Any]:
        return await self._answer_batch(q)

    async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        result = await self._owner_call("edit", uuid, text, create)
        if "entry" in result:
            return result["entry"]
        if result["status"] == 503:
            raise StoreError(result["detail"])
        raise EditRejected(result["status"], result["detail"])

    async def row(self, uuid: str) -> dict[str, Any] | None:
        return await self._owner_call("row", uuid)

    async def search(self, fragment: str, limit: int) -> dict[str, Any]:
        return await self._owner_call("search", fragment, limit)

    async def stats(self) -> dict[str, Any]:
        s = await self._owner_call("stats")
        s.pop("broken", None)
        return s

    def alive(self) -> bool:
        return True

    async def readiness(self) -> dict[str, Any]:
        if self.model.failed:
            return {"ready": False, "reason": f"the model's last batch failed: {self.model.failed}"}
        try:
            stats = await self._owner_call("stats")
        except ModelUnavailable as e:
            return {"ready": False, "reason": str(e)}
        if stats["broken"]:
            return {"ready": False, "reason": stats["broken"]}
        m = self.model
        return {"ready": True, "bank_version": m.version, "adapter": m.adapter, "device": str(m.device)}

    async def close(self) -> None:
        pass

    async def check_health(self) -> None:
        """Serve replaces a replica whose model cannot answer; an idle one answers a probe first."""
        await asyncio.get_running_loop().run_in_executor(None, self.model.probe)
        if self.model.failed:
            raise RuntimeError(self.model.failed)


class _Proxy:
    """Routes the app's backend calls to this process's replica (one replica per actor process)."""

    def __getattr__(self, name: str):
        import serving.deployment as here

        return getattr(here._REPLICA, name)


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
        # The edit key travels from the deploying environment to the replicas, never through a file.
        ray_actor_options={
            "num_cpus": cfg.serve.replica_cpus,
            "num_gpus": cfg.serve.replica_gpus,
            "runtime_env": {"env_vars": {k: os.environ[k] for k in (API_KEY_ENV,) if k in os.environ}},
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    @serve.ingress(app)
    class ExplicitLMDeployment(_Backend):
        async def __init__(self, owner) -> None:
            await super().__init__(owner, cfg)

    return ExplicitLMDeployment.bind(BankOwner.bind(asdict(cfg)))


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run` / `serve deploy`: args are config overrides (key: value)."""
    args = dict(args or {})
    config_name, replicas = args.pop("config_name", None), args.pop("num_replicas", None)
    return build_app(
        [f"{k}={v}" for k, v in args.items()], config_name, int(replicas) if replicas is not None else None
    )
