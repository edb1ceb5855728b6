"""The HTTP layer: a FastAPI app for multiple-choice answers and memory inspection and edits.

Independent of Ray: `create_app(backend, limits)` takes anything with the `Backend` methods. Under
plain uvicorn the backend is in-process (`serving.local.LocalBackend`, with a dynamic batcher and the
bank's store); under Ray Serve it is the `Gateway` deployment (serving/deployment.py). Every error, of any status,
has one shape (`Error`): a sentence in `detail` and, for a 422, one entry per invalid field.

Reading memory needs no key; editing and searching it need `Authorization: Bearer <key>` with the
server's key (`read_api_key`), checked before the request body is read. A search is a bounded scan
(at most `limit` rows, `serve.search_timeout_s`), which is why it is not open to everyone. A 500
says nothing of its cause: it names a request id, which the server's log line of the error carries.
"""

import hmac
import logging
import os
import uuid as uuid_lib
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, Header, HTTPException, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from explicitlm.data import CONTROL_TEXT, RowError, find_control, parse_options
from explicitlm.scoring import Question
from serving.service import ModelUnavailable, RequestLimits
from serving.store import EditRejected, StoreError

MAX_BODY_BYTES = 64 * 1024
API_KEY_ENV = "EXPLICITLM_API_KEY"
UUID_PATTERN = r"^[A-Za-z0-9._:\-]+$"
KEY_PATTERN = r"^[\x21-\x7e]+$"  # an Idempotency-Key: printable ASCII, no spaces
logger = logging.getLogger("explicitlm.serve")


def read_api_key(key_file: str = "") -> str:
    """The key that editing and searching need: the contents of `key_file` (serve.api_key_file), or
    this process's EXPLICITLM_API_KEY; empty when neither is set (editing and search are then off)."""
    if key_file:
        with open(key_file) as fh:
            return fh.read().strip()
    return os.environ.get(API_KEY_ENV, "").strip()


# ---------------------------------------------------------------------- response models


class FieldError(BaseModel):
    field: str = Field(examples=["options"])
    message: str = Field(examples=["options 0 and 2 are the same text ('Paris')"])


class Error(BaseModel):
    """Every error response, whatever its status."""

    detail: str = Field(description="what is wrong, in one sentence", examples=["no memory row q-123"])
    errors: list[FieldError] = Field(default_factory=list, description="one entry per invalid field (422 only)")


_STATUS = {
    401: "the request needs 'Authorization: Bearer <key>' with the server's key",
    403: "memory editing and search are disabled: the server has no EXPLICITLM_API_KEY",
    404: "no memory row with this uuid",
    409: "a memory row with this uuid exists already",
    413: f"the request body is larger than {MAX_BODY_BYTES} bytes",
    422: "a field is invalid (each is named in errors), the question cannot be scored (control text, more than "
    "model.max_seq_len tokens), or an Idempotency-Key was sent with another edit",
    500: "an internal error: the detail names a request id, which the server's log line of the error carries",
    503: "the model or the memory bank cannot serve now (too many questions waiting, its process has exited, edits "
    "cannot be logged, or the bank's owner is restarting); Retry-After says when to try again where waiting helps",
    504: "no answer within serve.request_timeout_s (Retry-After says when to try again); for an edit, its outcome "
    "is unknown: send it again with the same Idempotency-Key",
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": Error, "description": _STATUS[c]} for c in codes}


class MemoryRow(BaseModel):
    uuid: str
    text: str
    score: float | None = Field(None, description="retrieval weight, summed over layers (answers only)")


class RowInfo(BaseModel):
    uuid: str
    text: str
    version: int | None = Field(
        description="the bank version of the edit that last changed this row; null when none of the last "
        "serve.edit_history edits did"
    )
    bank_version: int = Field(description="the bank version this read saw")


class AnswerResponse(BaseModel):
    """An answer. With options: the option chosen (answer, text, label, index, probabilities). Without
    options: the generated text (answer and text alike, finished)."""

    answer: str = Field(examples=["A:Paris"], description='"A:Paris" with options; the generated text without')
    text: str = Field(examples=["Paris"], description="the chosen option's text, or the generated answer")
    label: str | None = Field(None, examples=["A"], description="the chosen option's letter (with options only)")
    index: int | None = Field(None, examples=[0], description="the chosen option's index (with options only)")
    probabilities: list[float] | None = Field(None, description="one per option (with options only)")
    finished: bool | None = Field(
        None, description="without options: whether the answer ended within serve.max_new_tokens tokens"
    )
    memory: list[MemoryRow] = Field(description="the rows the reader weighed most, best first")
    memory_match: float = Field(
        description="the reader's trust in the rows it read (1 - P(no row answers)), mean over layers"
    )
    memory_used: bool = Field(description="whether most layers trusted memory for this answer")
    bank_version: int = Field(description="the memory bank version this answer read: every edit up to it")
    adapter: str = Field(description="hash of the trained memory weights that answered")


class EditResponse(BaseModel):
    version: int = Field(description="the bank version this edit made; answers from it on read it")
    action: str = Field(examples=["replace"], description="replace or add")
    uuid: str
    text: str
    old_text: str | None
    time: float = Field(description="when it was logged (Unix seconds)")
    tokens: int = Field(description="tokens of the text as a memory row")
    truncated: bool = Field(description="whether the row keeps only its first model.knowledge_length tokens")


class SearchResponse(BaseModel):
    rows: list[MemoryRow]
    complete: bool = Field(description="false when serve.search_timeout_s ran out before the whole bank was read")


class BankInfo(BaseModel):
    rows: int
    version: int = Field(description="edits so far: the version of the next answer")
    saved_version: int = Field(description="the version the bank file holds; later edits are in its log")
    compact_error: str | None = Field(
        None, description="why the last rewrite of the bank file failed, if it did (shown with the key only)"
    )


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    bank_version: int = Field(description="the bank version the model has applied")
    adapter: str = Field(description="hash of the trained memory weights")
    device: str = Field(examples=["cpu"], description="where the model runs (serve.device)")
    edits: bool = Field(True, description="whether the bank takes edits now (false while its owner is unreachable)")


# ---------------------------------------------------------------------- request models


def request_models(limits: RequestLimits):
    """The request bodies, with the limits of this server's config. (This module has no
    `from __future__ import annotations`: routes name these local classes, and FastAPI resolves a
    string annotation against the module's globals only.)"""

    def _utf8(v: str, what: str) -> None:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None

    def _text(v: str, what: str) -> str:
        _utf8(v, what)
        if not v.strip():
            raise ValueError(f"{what} is blank")
        marker = find_control(v, CONTROL_TEXT)
        if marker:
            raise ValueError(f"{what} contains the chat template's control text {marker!r}")
        return v.strip()

    class AnswerRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"question": "What is the capital of France?", "options": ["Paris", "Rome", "Oslo", "Lima"]},
                    {"question": "What is the capital of France?", "options": "A:Paris,B:Rome,C:Oslo,D:Lima"},
                    {"question": "What is the capital of France?"},
                ]
            },
        )
        question: str = Field(min_length=1, max_length=limits.max_question_chars)
        options: list[str] | str | None = Field(
            None,
            description=f"2 to {limits.max_options} distinct option texts of at most {limits.max_option_chars} "
            'characters, as a list or as the reference string "A:x,B:y,...". Left out (or null, [] or ""): '
            "the answer is generated from memory, with no options to choose from",
        )

        @field_validator("question")
        @classmethod
        def _question(cls, v: str) -> str:
            return _text(v, "question")

        @field_validator("options")
        @classmethod
        def _options(cls, v: list[str] | str | None) -> list[str]:
            if not v:  # no options: a generated answer
                return []
            if isinstance(v, str):
                if len(v) > limits.max_options * (limits.max_option_chars + 3):
                    raise ValueError("options string is too long")
                try:
                    _, v = parse_options(v)
                except RowError as e:
                    raise ValueError(f"options string does not parse as 'A:x,B:y,...': {e}") from None
            if not 2 <= len(v) <= limits.max_options:
                raise ValueError(f"between 2 and {limits.max_options} options are needed, got {len(v)}")
            seen: dict[str, int] = {}
            for i, t in enumerate(v):
                _utf8(t, f"option {i}")
                if not t.strip():
                    raise ValueError(f"option {i} is blank")
                marker = find_control(t, CONTROL_TEXT)
                if marker:
                    raise ValueError(f"option {i} contains the chat template's control text {marker!r}")
                if len(t) > limits.max_option_chars:
                    raise ValueError(f"option {i} is longer than {limits.max_option_chars} characters")
                key = " ".join(t.split()).casefold()
                if key in seen:
                    raise ValueError(f"options {seen[key]} and {i} are the same text ({t.strip()!r})")
                seen[key] = i
            return [t.strip() for t in v]

    class EditRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"text": "The capital of France is Lyon."}]}
        )
        text: str = Field(min_length=1, max_length=limits.max_text_chars)

        @field_validator("text")
        @classmethod
        def _text_not_blank(cls, v: str) -> str:
            return _text(v, "text")

    class AddRequest(EditRequest):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"uuid": "my-fact-1", "text": "The capital of Atlantis is Poseidonia."}]},
        )
        uuid: str = Field(min_length=1, max_length=200, pattern=UUID_PATTERN)

    return AnswerRequest, EditRequest, AddRequest


# ---------------------------------------------------------------------- auth


bearer = HTTPBearer(auto_error=False, description=f"the server's {API_KEY_ENV}")


def check_key(credentials: HTTPAuthorizationCredentials | None, key: str) -> None:
    if not key:
        raise HTTPException(403, _STATUS[403])
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
        raise HTTPException(401, _STATUS[401], headers={"WWW-Authenticate": "Bearer"})


def key_first_route(backend: "Backend") -> type[APIRoute]:
    """A route class that checks the key before the body is read: FastAPI parses a body before it
    solves dependencies, so without this a keyless request with a malformed body would get a 422,
    not a 401."""

    class KeyFirstRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def checked(request: Request):
                check_key(await bearer(request), backend.api_key)
                return await handler(request)

            return checked

    return KeyFirstRoute


# ---------------------------------------------------------------------- the app


class Backend(Protocol):
    api_key: str  # the key editing and searching need (`read_api_key`, in the serving process); empty: off

    async def answer(self, q: Question) -> dict[str, Any]: ...
    async def edit(self, uuid: str, text: str, create: bool, key: str | None = None) -> dict[str, Any]: ...
    async def row(self, uuid: str) -> dict[str, Any] | None: ...
    async def search(self, fragment: str, limit: int) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def readiness(self) -> dict[str, Any]: ...  # {"ready": bool, "reason" | "bank_version", "adapter"}
    def alive(self) -> bool: ...
    async def close(self) -> None: ...


def _error(status: int, detail: str, errors: list[dict[str, str]] | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status_code=status, headers=headers)


class BodyLimit:
    """A 413, in the error model, for a body over `limit` bytes: by its Content-Length before it is
    read, or as soon as a chunked body passes the limit. A plain ASGI wrapper, so no task per request."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _error(413, _STATUS[413])(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, _STATUS[413])  # FastAPI passes it on to the app's handler
            return message

        await self.app(scope, limited, send)


def create_app(backend: Backend, limits: RequestLimits) -> FastAPI:
    AnswerRequest, EditRequest, AddRequest = request_models(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(
        title="ExplicitLM",
        version="0.2.0",
        lifespan=lifespan,
        description="Multiple-choice answers from a frozen Qwen3 reading an explicit, editable memory bank. "
        f"Editing and searching memory need `Authorization: Bearer <key>` (the server's {API_KEY_ENV}, "
        "or serve.api_key_file).",
    )

    async def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        check_key(credentials, backend.api_key)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "path", "query", "header")) or "body"
            errors.append({"field": loc, "message": e.get("msg", "invalid").removeprefix("Value error, ")})
        return _error(422, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(EditRejected)
    async def edit_rejected(request: Request, exc: EditRejected):
        return _error(exc.status, str(exc))

    @app.exception_handler(ModelUnavailable)
    async def unavailable(request: Request, exc: ModelUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _error(exc.status, str(exc), headers=headers)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError):
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        request_id = uuid_lib.uuid4().hex[:16]
        logger.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
        detail = f"internal error (request id {request_id}: the server's log has the details)"
        return _error(500, detail, headers={"X-Request-ID": request_id})

    @app.get("/healthz", responses=_responses(503))
    async def healthz():
        """Liveness: 503 once the model process has exited, which it never recovers from by itself."""
        if not backend.alive():
            return _error(503, "the model process has exited")
        return {"status": "alive"}

    @app.get("/readyz", response_model=Ready, responses=_responses(503))
    async def readyz():
        """Readiness: the model answers a probe question within serve.request_timeout_s (unless it has
        just answered others); ready again as soon as it does."""
        state = await backend.readiness()
        if not state["ready"]:
            return _error(503, state["reason"])
        return {
            "status": "ready",
            **{k: state[k] for k in ("bank_version", "adapter", "device", "edits") if k in state},
        }

    @app.post(
        "/answer",
        response_model=AnswerResponse,
        response_model_exclude_none=True,
        responses=_responses(413, 422, 500, 503, 504),
    )
    async def answer(req: AnswerRequest) -> dict[str, Any]:
        """Answer a question from the memory bank: pick one of `options`, or, without options,
        generate the answer (greedy, at most serve.max_new_tokens tokens)."""
        result = await backend.answer(Question(req.question, list(req.options or [])))
        if "error" in result:  # this question alone cannot be scored
            return _error(422, result["detail"], [{"field": result["field"], "message": result["detail"]}])
        return result

    @app.get("/memory", response_model=BankInfo, response_model_exclude_unset=True, responses=_responses(503))
    async def memory_info(request: Request) -> dict[str, Any]:
        """The bank's size and versions; with the key, also why the last rewrite of its file failed."""
        stats = await backend.stats()
        try:
            check_key(await bearer(request), backend.api_key)
        except HTTPException:
            stats.pop("compact_error", None)
        return stats

    @app.get("/memory/rows/{uuid}", response_model=RowInfo, responses=_responses(404, 422, 503))
    async def get_row(uuid: str = Path(min_length=1, max_length=200)) -> dict[str, Any]:
        row = await backend.row(uuid)
        if row is None:
            raise HTTPException(404, f"no memory row {uuid}")
        return row

    secured = APIRouter(route_class=key_first_route(backend), dependencies=[Security(require_key)])
    IdempotencyKey = Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=KEY_PATTERN,
            description="names this edit: sent again with the same key, it returns the first outcome (and header "
            "Idempotent-Replayed: true) instead of making a second version",
        ),
    ]

    def _edited(result: dict[str, Any], response: Response) -> dict[str, Any]:
        if result.get("replayed"):
            response.headers["Idempotent-Replayed"] = "true"
        return result

    edit_codes = (401, 403, 413, 422, 500, 503, 504)

    @secured.put("/memory/rows/{uuid}", response_model=EditResponse, responses=_responses(404, *edit_codes))
    async def put_row(
        req: EditRequest,
        response: Response,
        uuid: str = Path(min_length=1, max_length=200),
        idempotency_key: IdempotencyKey = None,
    ) -> dict[str, Any]:
        """Replace a row's text. Durable when it returns; every answer after it reads the new text."""
        return _edited(await backend.edit(uuid, req.text, False, idempotency_key), response)

    @secured.post("/memory/rows", status_code=201, response_model=EditResponse, responses=_responses(409, *edit_codes))
    async def add_row(req: AddRequest, response: Response, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
        """Add a row. Durable when it returns; every answer after it can read it."""
        return _edited(await backend.edit(req.uuid, req.text, True, idempotency_key), response)

    @secured.get("/memory/search", response_model=SearchResponse, responses=_responses(401, 403, 422, 503))
    async def search(
        q: str = Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$"), limit: int = Query(20, ge=1, le=100)
    ) -> dict[str, Any]:
        """Rows whose text contains `q` (case-insensitive), in bank order: a scan of the bank's text
        (about 50 MB per million rows), off the event loop, stopped after serve.search_timeout_s."""
        return await backend.search(q, limit)

    app.include_router(secured)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app
