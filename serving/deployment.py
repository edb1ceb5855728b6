"""The same FastAPI app as a Ray Serve deployment, with dynamic batching and one bank owner.

    serve run configs/serve/serve.yaml                 # local Ray
    serve deploy configs/serve/serve.yaml              # a running cluster (RAY_ADDRESS / --address)

`@serve.batch` gathers concurrent /answer calls into one scorer call (max_ongoing_requests is raised
so batches can fill). Edits go to a single named `BankOwner` actor, which writes the bank file and
keeps the edit log; before every request a replica pulls the edits it has not applied, so the very
next request sees an edit whichever replica serves it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray
from ray import serve

from explicitlm.config import load_config
from explicitlm.scoring import Question
from serving.app import API_KEY_ENV, create_app
from serving.service import BankOwner, MemoryModel

OWNER_NAME = "explicitlm_bank_owner"
_REPLICA: Any = None  # the replica living in this process


def _owner(bank_path: str, tokenizer_path: str):
    """The one BankOwner actor of this bank, created by whichever replica comes first."""
    actor = ray.remote(num_cpus=0, max_concurrency=1)(BankOwner)
    return actor.options(name=OWNER_NAME, namespace="explicitlm", get_if_exists=True, lifetime="detached").remote(
        bank_path, tokenizer_path
    )


def build_deployment(
    overrides: list[str] | tuple[str, ...] = (), config_name: str | None = None, num_replicas: int | None = None
):
    cfg = load_config(config_name, list(overrides))

    class _Backend:
        def __init__(self) -> None:
            self.model = MemoryModel(cfg)
            self.owner = _owner(self.model.cfg.model.cache_path, self.model.cfg.model.qwen3_model_path)

        def ready(self) -> bool:
            return True

        async def _sync(self) -> None:
            edits = await self.owner.edits_since.remote(self.model.version)
            if edits:
                await asyncio.get_running_loop().run_in_executor(None, self.model.apply, edits)

        @serve.batch(max_batch_size=cfg.serve.max_batch_size, batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s)
        async def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
            await self._sync()
            return await asyncio.get_running_loop().run_in_executor(None, self.model.answer, questions)

        async def answer(self, q: Question) -> dict[str, Any]:
            return await self._answer_batch(q)

        async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
            entry = await self.owner.edit.remote(uuid, text, create)
            await self._sync()
            return entry

        async def row(self, uuid: str) -> dict[str, Any] | None:
            await self._sync()
            return self.model.row(uuid)

        async def search(self, fragment: str, limit: int) -> list[dict[str, Any]]:
            await self._sync()
            return self.model.search(fragment, limit)

        def check_health(self) -> None:
            if self.model is None:
                raise RuntimeError("model not loaded")

    class _Proxy:
        """Routes the app's backend calls to this process's replica (one replica per actor process)."""

        def __getattr__(self, name: str):
            import serving.deployment as here

            return getattr(here._REPLICA, name)

    app = create_app(_Proxy())

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
            "runtime_env": {"env_vars": {k: os.environ[k] for k in (API_KEY_ENV,) if k in os.environ}},
        },
        health_check_period_s=10,
    )
    @serve.ingress(app)
    class ExplicitLMDeployment(_Backend):
        def __init__(self) -> None:
            import serving.deployment as here

            super().__init__()
            here._REPLICA = self

    return ExplicitLMDeployment


def app_builder(args: dict[str, Any]):
    """Entry point for `serve run` / `serve deploy`: args are config overrides (key: value)."""
    overrides = [f"{k}={v}" for k, v in (args or {}).items() if k not in ("config_name", "num_replicas")]
    replicas = args.get("num_replicas") if args else None
    return build_deployment(
        overrides, (args or {}).get("config_name"), int(replicas) if replicas is not None else None
    ).bind()
