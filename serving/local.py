"""The in-process backend for plain uvicorn: the bank's store, the model (in its own process by
default) and a dynamic batcher, behind `serving.app.create_app`'s `Backend` methods."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from explicitlm.scoring import Question
from serving.service import PROBE, EditOutcomeUnknown, ModelTimeout, Overloaded

PROBE_AFTER_S = 1.0  # /readyz asks the model a probe question when it has answered nothing for this long


class Batcher:
    """Collects concurrent requests into one scorer call: up to max_size, waiting at most wait_s
    after the first of them arrived (as Ray Serve's batch_wait_timeout_s). Requests that queued
    while the model was busy have waited already: they go as soon as the model is free. At most
    `max_queue` requests wait: one more is refused (Overloaded) at once."""

    def __init__(self, fn, max_size: int, wait_s: float, executor=None, max_queue: int = 256):
        self.fn, self.max_size, self.wait_s, self.executor = fn, max_size, wait_s, executor
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._run())
        if self.queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self.max_queue} questions are waiting for the model already (serve.max_queue)")
        fut = loop.create_future()
        self.queue.put_nowait((item, fut, loop.time()))
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
            batch = [b for b in batch if not b[1].done()]  # a caller that went away (or timed out) cancelled its future
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _, _ in batch])
                for (_, fut, _), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)


class LocalBackend:
    """Backend for plain uvicorn: the bank's store, the model (in its own process by default), a batcher.

    An edit is acknowledged once the store has logged and applied it; the model takes the edits it
    lacks before its next batch (or at once when idle), so every answer after the acknowledgement
    reads it, and the edit itself never waits for a forward pass. When the model is further behind
    than the edits the store keeps (the bank file was rewritten meanwhile), it loads the file again.
    Every wait for the model or the store is bounded by serve.request_timeout_s.
    """

    def __init__(self, cfg):
        from transformers import AutoTokenizer

        from explicitlm.loading import fill_from_weights
        from serving.app import read_api_key
        from serving.service import MemoryModel, ModelProcess
        from serving.store import BankStore, ensure_serving_bank, serving_bank_path

        cfg = fill_from_weights(cfg, cfg.serve.weights)
        path = serving_bank_path(cfg.serve.cache_path, cfg.serve.weights, cfg.model.cache_path)
        ensure_serving_bank(cfg.model.cache_path, path)
        cfg.model.cache_path = str(path)
        self.api_key = read_api_key(cfg.serve.api_key_file)
        self.store = BankStore(
            path,
            AutoTokenizer.from_pretrained(cfg.model.qwen3_model_path),
            cfg.serve.compact_every,
            compact_interval_s=cfg.serve.compact_interval_s,
            history=cfg.serve.edit_history,
        )
        try:
            self.model = ModelProcess(cfg) if cfg.serve.model_process else MemoryModel(cfg)
        except BaseException:
            self.store.close()
            raise
        self.model_version = self.model.version
        self.model_failed: str | None = None  # the last batch's error, if it failed
        self.last_ok = time.monotonic()  # when the model last answered
        self.adapter, self.device = self.model.adapter, str(self.model.device)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.search_timeout_s = cfg.serve.search_timeout_s
        self.timeout_s = cfg.serve.request_timeout_s
        self._sync = threading.Lock()  # one model call at a time, with the edits it lacks
        self._model_pool = ThreadPoolExecutor(2, thread_name_prefix="model")
        self._store_pool = ThreadPoolExecutor(4, thread_name_prefix="bank")
        self._push: asyncio.Task | None = None
        self._probe: asyncio.Future | None = None
        self._searches = asyncio.Semaphore(2)
        self.batcher = Batcher(
            self._answer_batch,
            cfg.serve.max_batch_size,
            cfg.serve.batch_wait_timeout_s,
            self._model_pool,
            cfg.serve.max_queue,
        )

    def _synced(self) -> list[dict[str, Any]]:
        """The edits the model lacks (under self._sync); the bank file again when the store no longer
        keeps them all."""
        edits = self.store.edits_since(self.model_version)
        if edits is None:
            self.model_version = self.model.reload()
            edits = self.store.edits_since(self.model_version) or []
        return edits

    def _locked(self) -> None:
        if not self._sync.acquire(timeout=self.timeout_s):
            raise ModelTimeout(f"the model did not take the call within {self.timeout_s:g} s (serve.request_timeout_s)")

    def _answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        self._locked()
        try:
            edits = self._synced()
            try:
                out = self.model.answer(questions, edits)
            except Exception as e:
                self.model_failed = f"{type(e).__name__}: {e}"
                raise
            self.model_failed = None
            self.last_ok = time.monotonic()
            if edits:
                self.model_version = edits[-1]["version"]
            return out
        finally:
            self._sync.release()

    def _apply_pending(self) -> None:
        self._locked()
        try:
            edits = self._synced()
            if edits:
                self.model.apply(edits)
                self.model_version = edits[-1]["version"]
        finally:
            self._sync.release()

    async def _push_edits(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.model_version < self.store.version:
                await loop.run_in_executor(self._model_pool, self._apply_pending)
        except Exception as e:  # noqa: BLE001 - the next batch tries again and fails its requests
            self.model_failed = f"{type(e).__name__}: {e}"

    async def answer(self, q: Question) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.batcher.submit(q), self.timeout_s)
        except asyncio.TimeoutError:
            raise ModelTimeout(f"no answer within {self.timeout_s:g} s (serve.request_timeout_s)") from None

    async def edit(self, uuid: str, text: str, create: bool, key: str | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._store_pool, self.store.edit, uuid, text, create, key)
        try:
            entry = await asyncio.wait_for(call, self.timeout_s)
        except asyncio.TimeoutError:
            raise EditOutcomeUnknown.for_row(
                uuid, f"the bank did not log the edit within {self.timeout_s:g} s"
            ) from None
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
        """Ready when the model answers: a probe question, within serve.request_timeout_s, unless it
        answered something in the last PROBE_AFTER_S. A model that failed is ready again once it
        answers the probe."""
        if not self.alive():
            return {"ready": False, "reason": "the model process has exited"}
        if self.store.broken or self.store.closed:
            return {"ready": False, "reason": self.store.broken or "the memory bank is closed"}
        if self.model_failed or time.monotonic() - self.last_ok > PROBE_AFTER_S:
            if self._probe is None or self._probe.done():  # one probe at a time, however many ask
                loop = asyncio.get_running_loop()
                self._probe = loop.run_in_executor(self._model_pool, self._answer_batch, [PROBE])
            try:
                await asyncio.wait_for(asyncio.shield(self._probe), self.timeout_s)
            except asyncio.TimeoutError:
                return {
                    "ready": False,
                    "reason": f"the model did not answer a probe question within {self.timeout_s:g} s",
                }
            except Exception:  # noqa: BLE001 - why is in the log; /readyz is open to everyone
                return {"ready": False, "reason": "the model failed a probe question (the server's log says why)"}
        return {
            "ready": True,
            "bank_version": self.model_version,
            "adapter": self.adapter,
            "device": self.device,
            "edits": not self.store.read_only,
        }

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.store.close)
        close = getattr(self.model, "close", None)
        if close is not None:
            await loop.run_in_executor(None, close)
