"""The in-process backend for plain uvicorn: the bank's store, the model (in its own process by
default) and a dynamic batcher, behind `serving.app.create_app`'s `Backend` methods."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from explicitlm.scoring import Question


class Batcher:
    """Collects concurrent requests into one scorer call: up to max_size, waiting at most wait_s
    after the first of them arrived (as Ray Serve's batch_wait_timeout_s). Requests that queued
    while the model was busy have waited already: they go as soon as the model is free."""

    def __init__(self, fn, max_size: int, wait_s: float, executor=None):
        self.fn, self.max_size, self.wait_s, self.executor = fn, max_size, wait_s, executor
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._run())
        fut = loop.create_future()
        await self.queue.put((item, fut, loop.time()))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = first[2] + self.wait_s
            while len(batch) < self.max_size:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _, _ in batch])
                for (_, fut, _), res in zip(batch, results):
                    if not fut.done():  # a caller that went away cancelled its future
                        fut.set_result(res)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)


class LocalBackend:
    """Backend for plain uvicorn: the bank's store, the model (in its own process by default), a batcher.

    An edit is acknowledged once the store has logged and applied it; the model takes the edits it
    lacks before its next batch (or at once when idle), so every answer after the acknowledgement
    reads it, and the edit itself never waits for a forward pass.
    """

    def __init__(self, cfg):
        from transformers import AutoTokenizer

        from explicitlm.loading import fill_from_weights
        from serving.service import MemoryModel, ModelProcess
        from serving.store import BankStore, ensure_serving_bank, serving_bank_path

        cfg = fill_from_weights(cfg, cfg.serve.weights)
        path = serving_bank_path(cfg.serve.cache_path, cfg.serve.weights, cfg.model.cache_path)
        ensure_serving_bank(cfg.model.cache_path, path)
        cfg.model.cache_path = str(path)
        self.store = BankStore(
            path,
            AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path),
            cfg.serve.compact_every,
            compact_interval_s=cfg.serve.compact_interval_s,
        )
        try:
            self.model = ModelProcess(cfg) if cfg.serve.model_process else MemoryModel(cfg)
        except BaseException:
            self.store.close()
            raise
        self.model_version = self.model.version
        self.model_failed: str | None = None  # the last batch's error, if it failed
        self.adapter, self.device = self.model.adapter, str(self.model.device)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.search_timeout_s = cfg.serve.search_timeout_s
        self._sync = threading.Lock()  # one model call at a time, with the edits it lacks
        self._model_pool = ThreadPoolExecutor(2, thread_name_prefix="model")
        self._store_pool = ThreadPoolExecutor(4, thread_name_prefix="bank")
        self._push: asyncio.Task | None = None
        self._searches = asyncio.Semaphore(2)
        self.batcher = Batcher(
            self._answer_batch, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s, self._model_pool
        )

    def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        with self._sync:
            edits = self.store.edits_since(self.model_version)
            try:
                out = self.model.answer(questions, edits)
            except Exception as e:
                self.model_failed = f"{type(e).__name__}: {e}"
                raise
            self.model_failed = None
            if edits:
                self.model_version = edits[-1]["version"]
            return out

    def _apply_pending(self) -> None:
        with self._sync:
            edits = self.store.edits_since(self.model_version)
            if edits:
                self.model.apply(edits)
                self.model_version = edits[-1]["version"]

    async def _push_edits(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.model_version < self.store.version:
                await loop.run_in_executor(self._model_pool, self._apply_pending)
        except Exception as e:  # noqa: BLE001 - the next batch tries again and fails its requests
            self.model_failed = f"{type(e).__name__}: {e}"

    async def answer(self, q: Question) -> dict[str, Any]:
        return await self.batcher.submit(q)

    async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        entry = await asyncio.get_running_loop().run_in_executor(self._store_pool, self.store.edit, uuid, text, create)
        if self._push is None or self._push.done():  # the model takes it now if no batch does first
            self._push = asyncio.create_task(self._push_edits())
        return entry

    async def row(self, uuid: str) -> dict[str, Any] | None:
        return self.store.row(uuid)

    async def search(self, fragment: str, limit: int) -> dict[str, Any]:
        async with self._searches:
            return await asyncio.get_running_loop().run_in_executor(
                self._store_pool, self.store.search, fragment, limit, self.search_timeout_s
            )

    async def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def alive(self) -> bool:
        return getattr(self.model, "alive", lambda: True)()

    async def readiness(self) -> dict[str, Any]:
        if not self.alive():
            return {"ready": False, "reason": "the model process has exited"}
        if self.model_failed:
            return {"ready": False, "reason": f"the model's last batch failed: {self.model_failed}"}
        if self.store.broken or self.store.closed:
            return {"ready": False, "reason": self.store.broken or "the memory bank is closed"}
        return {"ready": True, "bank_version": self.model_version, "adapter": self.adapter, "device": self.device}

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.store.close)
        close = getattr(self.model, "close", None)
        if close is not None:
            await loop.run_in_executor(None, close)
