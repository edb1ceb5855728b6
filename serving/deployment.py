"""The same FastAPI app on Ray Serve: model replicas with dynamic batching, and the bank's owner.

    serve run configs/serve/serve.yaml                 # local Ray
    serve deploy configs/serve/serve.yaml              # a running cluster (RAY_ADDRESS / --address)

An application has three deployments. `Gateway` is the HTTP ingress (the FastAPI app, two replicas
that need no CPU, so that the proxy has another while one is replaced): it sends /answer to a model
replica, and sends it again to another when the replica dies with it in flight (an answer only
reads), so a lost replica costs its requests time, not an error. `ExplicitLM` is the model
(`serve.num_replicas` replicas, `serve.replica_cpus` and `serve.replica_gpus` each); `@serve.batch`
gathers concurrent /answer calls into one scorer call (max_ongoing_requests is raised so that
batches can fill; at most serve.max_queue more wait per caller, the rest get a 503). `BankOwner` is
one replica that needs no CPU: the serving bank's store (serving/store.py), which logs every edit
before applying it; the gateway sends it edits, reads and searches. The owner belongs to its
application: Serve starts it with the app, restarts it if it dies (it replays its log) and stops it
when the app is deleted or redeployed, so two applications on two banks have an owner each, and a
redeploy on another bank gets an owner of that bank. Model replicas pull the edits they lack from
the owner before every batch: the very next request sees an edit whichever replica serves it. While
the owner is unreachable, replicas answer from the bank they hold (each answer names its version)
and row reads come from a replica's bank; edits wait for the owner (up to serve.request_timeout_s,
sent again under one Idempotency-Key, so a restarted owner never makes one twice), then are a 503.

The edit key is read by each gateway replica from serve.api_key_file or from its own process's
EXPLICITLM_API_KEY (the environment of the node's `ray start`), never passed in a runtime_env, which
Serve's REST API and dashboard show.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid as uuid_lib
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from explicitlm.config import Config, load_config
from explicitlm.loading import config_from_dict, fill_from_weights
from explicitlm.scoring import Question
from serving.app import create_app, read_api_key
from serving.local import PROBE_AFTER_S
from serving.service import (
    PROBE,
    EditOutcomeUnknown,
    MemoryModel,
    ModelTimeout,
    ModelUnavailable,
    Overloaded,
    RequestLimits,
)
from serving.store import EditRejected, StoreError

_GATEWAY: Any = None  # the Gateway replica living in this process
GATEWAY_REPLICAS = 2
OWNER_READ_TIMEOUT_S = 2.0  # a read waits this long for the owner before a replica's bank answers it
OWNER_DOWN_TIMEOUT_S = 0.1  # how long a batch waits for an owner that failed the batch before it
OWNER_PING_TIMEOUT_S = 0.5  # how long /readyz waits for an owner that failed, to say whether edits are on
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
            history=cfg.serve.edit_history,
        )
        self.search_timeout_s = cfg.serve.search_timeout_s
        self.searches = threading.BoundedSemaphore(2)
        bank = self.store.bank
        for line in bank.cuts.lines(len(bank), bank.knowledge_length):
            logger.info("bank %s: %s", path, line)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.store.path), "version": self.store.version}

    def edit(self, uuid: str, text: str, create: bool, key: str | None = None) -> dict[str, Any]:
        # Errors travel as values: a handle call re-raises an exception wrapped in Ray's own type.
        try:
            return {"entry": self.store.edit(uuid, text, create, key)}
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


async def _owner_call(method: Any, *args: Any, timeout_s: float) -> Any:
    """A call to the bank owner's handle that a timeout or a dead owner turns into ModelUnavailable (a 503)."""
    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s)
    except Exception as e:  # noqa: BLE001 - a timeout or a dead owner: Serve is restarting it
        raise ModelUnavailable(f"the memory bank's owner is unavailable: {type(e).__name__}: {e}") from None


class OwnerUnavailable(ModelUnavailable):
    """No bank owner took the edit within serve.request_timeout_s (Serve is restarting it)."""

    retry_after = 5


def _as_value(e: ModelUnavailable) -> dict[str, Any]:
    return {"unavailable": str(e), "status": e.status, "retry_after": e.retry_after}


def _from_value(v: dict[str, Any]) -> ModelUnavailable:
    e = ModelUnavailable(v["unavailable"])
    e.status, e.retry_after = v.get("status", 503), v.get("retry_after")
    return e


class _Model:
    """One ExplicitLM replica: the model, and a handle to its application's bank owner."""

    async def __init__(self, owner, cfg: Config) -> None:
        self.owner = owner
        self.timeout_s = cfg.serve.request_timeout_s
        info = await _owner_call(owner.info, timeout_s=self.timeout_s)
        cfg = copy.deepcopy(cfg)
        cfg.model.cache_path = info["path"]
        self.model = MemoryModel(cfg)
        self.owner_down_since: float | None = None  # when the owner last failed this replica, if it did
        self._probe: asyncio.Future | None = None
        self._answer_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    async def _edits(self) -> list[dict[str, Any]]:
        """The edits this replica lacks; when the owner no longer keeps them (the file holds them),
        the replica loads the bank file again. While the owner is unreachable: none (the replica
        answers from the bank it holds, and gives the owner only OWNER_DOWN_TIMEOUT_S a batch until
        it answers again)."""
        timeout_s = OWNER_READ_TIMEOUT_S if self.owner_down_since is None else OWNER_DOWN_TIMEOUT_S
        try:
            edits = await _owner_call(self.owner.edits_since, self.model.version, timeout_s=timeout_s)
            if edits is None:
                await asyncio.get_running_loop().run_in_executor(None, self.model.reload)
                edits = await _owner_call(self.owner.edits_since, self.model.version, timeout_s=OWNER_READ_TIMEOUT_S)
        except ModelUnavailable as e:
            if self.owner_down_since is None:
                logger.warning(
                    "answering from bank version %d while the bank's owner is unavailable: %s", self.model.version, e
                )
                self.owner_down_since = time.monotonic()
            return []
        self.owner_down_since = None
        return edits or []

    @serve.batch
    async def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        edits = await self._edits()
        return await asyncio.get_running_loop().run_in_executor(None, self.model.answer, questions, edits)

    async def answer(self, q: Question) -> dict[str, Any]:
        # Errors the client should see travel as values: a handle re-raises them wrapped in Ray's type.
        try:
            return await self._answer_batch(q)
        except ModelUnavailable as e:
            return _as_value(e)

    def row(self, uuid: str) -> dict[str, Any] | None:
        """A row as this replica's bank holds it (while the owner is unreachable)."""
        bank = self.model.model.bank
        i = bank.row_of(uuid)
        return (
            None
            if i < 0
            else {"uuid": uuid, "text": bank.texts[i], "version": None, "bank_version": self.model.version}
        )

    async def readiness(self) -> dict[str, Any]:
        """Ready when the model answers: a probe question within serve.request_timeout_s, unless it
        answered something in the last PROBE_AFTER_S; ready again as soon as it does. "edits" says
        whether the bank's owner answers (asked again here while it did not)."""
        m = self.model
        if m.failed or time.monotonic() - m.last_ok > PROBE_AFTER_S:
            if self._probe is None or self._probe.done():  # one probe at a time, however many ask
                self._probe = asyncio.get_running_loop().run_in_executor(None, m.answer, [PROBE])
            try:
                await asyncio.wait_for(asyncio.shield(self._probe), self.timeout_s)
            except asyncio.TimeoutError:
                return {
                    "ready": False,
                    "reason": f"the model did not answer a probe question within {self.timeout_s:g} s",
                }
            except Exception:  # noqa: BLE001 - why is in the replica's log; /readyz is open to everyone
                return {"ready": False, "reason": "the model failed a probe question (the replica's log says why)"}
        if self.owner_down_since is not None:  # whether the owner is back: a call that loads nothing
            try:
                await _owner_call(self.owner.info, timeout_s=OWNER_PING_TIMEOUT_S)
                self.owner_down_since = None
            except ModelUnavailable:
                pass
        return {
            "ready": True,
            "bank_version": m.version,
            "adapter": m.adapter,
            "device": str(m.device),
            "edits": self.owner_down_since is None,
        }

    async def check_health(self) -> None:
        """Serve replaces a replica whose model cannot answer; an idle one answers a probe first."""
        await asyncio.get_running_loop().run_in_executor(None, self.model.probe)
        if self.model.failed:
            raise RuntimeError(self.model.failed)


class _Gateway:
    """The app's backend (`serving.app.Backend`) on Ray Serve: model calls go to a model replica,
    bank calls to the owner."""

    def __init__(self, model, owner, api_key_file: str, timeout_s: float) -> None:
        import serving.deployment as here

        self.model, self.owner, self.timeout_s = model, owner, timeout_s
        self.api_key = read_api_key(api_key_file)  # in this replica's own process
        here._GATEWAY = self

    async def _model_call(self, method: str, *args: Any, budget_s: float | None = None) -> Any:
        """Send a model call, and send it again while the replica that took it died or none can take
        it (Serve is replacing it), all within `budget_s` (serve.request_timeout_s; a deployment with
        no replica up makes a call wait, not fail). Model calls only read, so sending one twice
        changes nothing. Replicas with serve.max_queue calls waiting already refuse it: a 503."""
        budget_s = self.timeout_s if budget_s is None else budget_s
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + budget_s, 0.05
        while True:
            try:
                call = getattr(self.model, method).remote(*args)
                return await asyncio.wait_for(call, max(deadline - loop.time(), 0.01))
            except asyncio.TimeoutError:
                raise ModelTimeout(
                    f"no model replica answered within {budget_s:g} s (serve.request_timeout_s)"
                ) from None
            except BackPressureError:
                raise Overloaded("every model replica has serve.max_queue questions waiting already") from None
            except (RayActorError, DeploymentUnavailableError) as e:
                if loop.time() + delay > deadline:
                    raise ModelUnavailable(f"no model replica could answer: {type(e).__name__}") from None
                logger.warning("%s: a model replica failed (%s); sending the call again", method, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def answer(self, q: Question) -> dict[str, Any]:
        result = await self._model_call("answer", q)
        if "unavailable" in result:
            raise _from_value(result)
        return result

    async def readiness(self) -> dict[str, Any]:
        try:
            return await self._model_call("readiness")
        except ModelUnavailable as e:
            return {"ready": False, "reason": str(e)}

    async def edit(self, uuid: str, text: str, create: bool, key: str | None = None) -> dict[str, Any]:
        """Send an edit to the owner, and send it again, under the same Idempotency-Key (the client's,
        or one made here), while the owner died with it in flight or is being restarted: a restarted
        owner replays its log, so the edit is made once whatever happened to the first try."""
        key = key or f"gateway-{uuid_lib.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline, delay, reached = loop.time() + self.timeout_s, 0.05, False
        while True:
            try:
                call = self.owner.edit.remote(uuid, text, create, key)
                result = await asyncio.wait_for(call, max(deadline - loop.time(), 0.01))
                break
            except asyncio.TimeoutError:
                why = f"the bank's owner did not answer within {self.timeout_s:g} s (serve.request_timeout_s)"
                raise EditOutcomeUnknown.for_row(uuid, why) from None
            except (RayActorError, DeploymentUnavailableError) as e:
                reached |= isinstance(e, RayActorError)  # it died with the edit: made or not, the log says
                if loop.time() + delay > deadline:
                    if reached:
                        raise EditOutcomeUnknown.for_row(
                            uuid, f"the bank's owner failed ({type(e).__name__})"
                        ) from None
                    raise OwnerUnavailable("the bank's owner is unavailable: edits wait for it to restart") from None
                logger.warning("edit: the bank's owner failed (%s); sending the edit again", type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
        if "entry" in result:
            return result["entry"]
        if result["status"] == 503:
            raise StoreError(result["detail"])
        raise EditRejected(result["status"], result["detail"])

    async def row(self, uuid: str) -> dict[str, Any] | None:
        """From the owner; from a model replica's bank while the owner is unreachable."""
        try:
            return await _owner_call(self.owner.row, uuid, timeout_s=OWNER_READ_TIMEOUT_S)
        except ModelUnavailable:
            return await self._model_call("row", uuid)

    async def search(self, fragment: str, limit: int) -> dict[str, Any]:
        return await _owner_call(self.owner.search, fragment, limit, timeout_s=self.timeout_s)

    async def stats(self) -> dict[str, Any]:
        s = await _owner_call(self.owner.stats, timeout_s=self.timeout_s)
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
        max_queued_requests=cfg.serve.max_queue,
        ray_actor_options={"num_cpus": cfg.serve.replica_cpus, "num_gpus": cfg.serve.replica_gpus},
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    class ExplicitLM(_Model):
        async def __init__(self, owner) -> None:
            await super().__init__(owner, cfg)

    @serve.deployment(
        name="Gateway", num_replicas=GATEWAY_REPLICAS, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
    )
    @serve.ingress(app)
    class Gateway(_Gateway):
        pass

    owner = BankOwner.bind(asdict(cfg))
    return Gateway.bind(ExplicitLM.bind(owner), owner, cfg.serve.api_key_file, cfg.serve.request_timeout_s)


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run` / `serve deploy`: args are config overrides (key: value)."""
    args = dict(args or {})
    config_name, replicas = args.pop("config_name", None), args.pop("num_replicas", None)
    return build_app(
        [f"{k}={v}" for k, v in args.items()], config_name, int(replicas) if replicas is not None else None
    )
