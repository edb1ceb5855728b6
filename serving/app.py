"""The HTTP layer: a FastAPI app for multiple-choice answers and memory inspection and edits.

Independent of Ray: `create_app(backend)` takes anything with the `Backend` methods. Under plain
uvicorn the backend is in-process (`LocalBackend`, with a dynamic batcher); under Ray Serve it is
the deployment (serving/deployment.py). Every malformed request gets a 4xx that names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from explicitlm.data import RowError, parse_options
from explicitlm.scoring import Question

MAX_BODY_BYTES = 64 * 1024
API_KEY_ENV = "EXPLICITLM_API_KEY"


class AnswerRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"question": "What is the capital of France?", "options": ["Paris", "Rome", "Oslo", "Lima"]},
                {"question": "What is the capital of France?", "options": "A:Paris,B:Rome,C:Oslo,D:Lima"},
            ]
        },
    )
    question: str = Field(min_length=1, max_length=2000)
    options: list[str] | str = Field(description='a list of option texts, or the reference string "A:x,B:y,..."')

    @field_validator("question")
    @classmethod
    def _question_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question is blank")
        return v.strip()

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str] | str) -> list[str]:
        if isinstance(v, str):
            if len(v) > 26 * 501:
                raise ValueError("options string is too long")
            try:
                _, texts = parse_options(v)
            except RowError as e:
                raise ValueError(f"options string does not parse as 'A:x,B:y,...': {e}") from None
            v = texts
        if not 2 <= len(v) <= 26:
            raise ValueError(f"between 2 and 26 options are needed, got {len(v)}")
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"option {i} is blank")
            if len(t) > 500:
                raise ValueError(f"option {i} is longer than 500 characters")
        return [t.strip() for t in v]


class MemoryRow(BaseModel):
    uuid: str
    text: str
    score: float | None = None


class AnswerResponse(BaseModel):
    answer: str = Field(examples=["A:Paris"])
    label: str = Field(examples=["A"])
    index: int = Field(examples=[0])
    probabilities: list[float]
    memory: list[MemoryRow]
    memory_match: float = Field(
        description="share of the question's words (IDF-weighted) the retrieved rows contain, "
        "mean over layers; below model.min_match a layer reads no memory"
    )
    memory_used: bool = Field(description="whether any layer read memory for this answer")


class EditRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "The capital of France is Lyon."}]}
    )
    text: str = Field(min_length=1, max_length=1000)


class AddRequest(EditRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"uuid": "my-fact-1", "text": "The capital of Atlantis is Poseidonia."}]},
    )
    uuid: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:\-]+$")


class Backend(Protocol):
    async def answer(self, q: Question) -> dict[str, Any]: ...
    async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]: ...
    async def row(self, uuid: str) -> dict[str, Any] | None: ...
    async def search(self, fragment: str, limit: int) -> list[dict[str, Any]]: ...
    def ready(self) -> bool: ...


def _authorised(request: Request) -> None:
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        raise HTTPException(403, f"memory editing is disabled: the server has no {API_KEY_ENV}")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise HTTPException(
            401,
            "editing needs 'Authorization: Bearer <key>' with the server's key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def create_app(backend: Backend) -> FastAPI:
    # FastAPI's own body limit: a 413 for any larger body, chunked ones included, before it is read.
    app = FastAPI(
        title="ExplicitLM",
        version="0.1.0",
        max_body_size=MAX_BODY_BYTES,
        description="Multiple-choice answers from a frozen Qwen3 reading an explicit, editable memory bank.",
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            errors.append({"field": loc, "message": e.get("msg", "invalid")})
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": summary, "errors": errors}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not backend.ready():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready"}

    @app.post("/answer", response_model=AnswerResponse)
    async def answer(req: AnswerRequest) -> dict[str, Any]:
        return await backend.answer(Question(req.question, list(req.options)))

    @app.get("/memory/search", response_model=list[MemoryRow])
    async def search(q: str = Query(min_length=1, max_length=200), limit: int = Query(20, ge=1, le=100)):
        return await backend.search(q, limit)

    @app.get("/memory/{uuid}", response_model=MemoryRow)
    async def get_row(uuid: str) -> dict[str, Any]:
        row = await backend.row(uuid)
        if row is None:
            raise HTTPException(404, f"no memory row {uuid}")
        return row

    @app.put("/memory/{uuid}")
    async def put_row(uuid: str, req: EditRequest, request: Request) -> dict[str, Any]:
        _authorised(request)
        try:
            return await backend.edit(uuid, req.text, create=False)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None

    @app.post("/memory", status_code=201)
    async def add_row(req: AddRequest, request: Request) -> dict[str, Any]:
        _authorised(request)
        try:
            return await backend.edit(req.uuid, req.text, create=True)
        except KeyError as e:
            raise HTTPException(409, str(e.args[0])) from None

    return app


class Batcher:
    """Collects concurrent requests into one scorer call: up to max_size, waiting at most wait_s
    after the first of them arrived (as Ray Serve's batch_wait_timeout_s). Requests that queued
    while the model was busy have waited already: they go as soon as the model is free."""

    def __init__(self, fn, max_size: int, wait_s: float):
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
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
                results = await loop.run_in_executor(None, self.fn, [item for item, _, _ in batch])
                for (_, fut, _), res in zip(batch, results):
                    fut.set_result(res)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)


class LocalBackend:
    """Backend for plain uvicorn: the model (in its own process by default), the bank owner, a batcher."""

    def __init__(self, cfg):
        from explicitlm.loading import fill_from_weights
        from serving.service import BankOwner, MemoryModel, ModelProcess

        cfg = fill_from_weights(cfg, cfg.serve.weights)
        self.model = ModelProcess(cfg) if cfg.serve.model_process else MemoryModel(cfg)
        self.owner = BankOwner(cfg.model.cache_path, cfg.model.qwen3_model_path)
        self.version = self.owner.version()
        self.batcher = Batcher(self.model.answer, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)

    def ready(self) -> bool:
        return True

    async def answer(self, q: Question) -> dict[str, Any]:
        return await self.batcher.submit(q)

    async def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(None, self.owner.edit, uuid, text, create)
        await loop.run_in_executor(None, self.model.apply, self.owner.edits_since(self.version))
        self.version = max(self.version, entry["version"])
        return entry

    # The owner's bank is the current one: reads need not wait for the model.
    async def row(self, uuid: str) -> dict[str, Any] | None:
        from serving.service import bank_row

        return bank_row(self.owner.bank, uuid)

    async def search(self, fragment: str, limit: int) -> list[dict[str, Any]]:
        from serving.service import bank_search

        return bank_search(self.owner.bank, fragment, limit)
