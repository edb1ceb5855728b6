"""What the HTTP layer calls: the request limits and the loaded model with its scorer.

`MemoryModel` holds one replica's backbone, bank and trained memory weights and answers batches of
questions with the same scorer evaluation uses. It takes the bank's edits from the serving bank's
owner (`serving.store.BankStore`) and applies them, in order, before the batch that follows them;
every answer names the bank version it was read from and the weights that read it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from explicitlm.config import Config
from explicitlm.data import LABELS, RenderError, control_markers, encode, find_control, render_answer
from explicitlm.loading import resolve_device, serving_dtype
from explicitlm.scoring import Generated, Question, generate_answers, memory_rows, open_prompt, score_questions
from explicitlm.threads import one_thread

logger = logging.getLogger("explicitlm.serve")
PROBE = Question("Is this a probe?", ["yes", "no"])
RELOAD_TIMEOUT_S = 1800.0  # loading the bank file again (with the model around it) on a large bank


class ModelUnavailable(RuntimeError):
    """The model (its process, or its replica) cannot answer: a 503, with Retry-After when waiting helps."""

    status = 503
    retry_after: int | None = None


class Overloaded(ModelUnavailable):
    """More questions wait for the model than serve.max_queue: come back in a second."""

    retry_after = 1


class ModelTimeout(ModelUnavailable):
    """The model did not answer within serve.request_timeout_s (hung, or far behind): a 504."""

    status = 504
    retry_after = 5


class EditOutcomeUnknown(ModelTimeout):
    """An edit whose outcome did not come back in time: it may or may not have been made."""

    @classmethod
    def for_row(cls, uuid: str, why: str) -> EditOutcomeUnknown:
        return cls(
            f"{why}: the edit may or may not have been made. Send it again with the same Idempotency-Key "
            f"(it is never made twice), or read GET /memory/rows/{uuid}: its text and version (the bank "
            "version that last changed it) say whether it was"
        )


@dataclass(frozen=True)
class RequestLimits:
    """Every request limit, from the config: the HTTP layer and the model read them from here."""

    max_options: int
    max_question_chars: int
    max_option_chars: int
    max_text_chars: int
    max_prompt_tokens: int  # model.max_seq_len: the scorer reads no more

    @classmethod
    def from_config(cls, cfg: Config) -> RequestLimits:
        s = cfg.serve
        return cls(s.max_options, s.max_question_chars, s.max_option_chars, s.max_text_chars, cfg.model.max_seq_len)


def prompt_tokens_over(tokenizer: Any, q: Question, limit: int) -> int | None:
    """The tokens of a question's longest scored sequence (prompt and answer) when that exceeds
    `limit`, else None. The scorer would cut such a sequence and score what is left. Without
    options: the prompt and the answer's first token."""
    if not q.options:
        n = len(open_prompt(tokenizer, q, 1 << 30)[0].input_ids) + 1
        return n if n > limit else None
    longest = max(q.options, key=lambda t: len(t.encode()))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": q.user}, {"role": "assistant", "content": render_answer("A", longest)}],
        tokenize=False,
    )
    # A byte-level BPE token covers at least one byte: a sequence of at most `limit` bytes fits, and
    # most questions are decided without tokenising them twice.
    if len(rendered.encode()) <= limit:
        return None
    n = max(
        len(encode(tokenizer, q.user, q.question, render_answer(LABELS[i], t), t, 1 << 30).input_ids)
        for i, t in enumerate(q.options)
    )
    return n if n > limit else None


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_cpu_kernels(capacity: int) -> None:
    """oneDNN's primitive cache to `capacity` kernels in this process, unless the environment says
    otherwise; oneDNN reads it when it makes its first kernel, so call this before the first forward."""
    os.environ.setdefault(ONEDNN_CACHE, str(capacity))


def adapter_id(weights: str) -> str:
    """The trained weights' identity: a hash of their tensors file, which /answer reports."""
    from explicitlm.adapter import ADAPTER_WEIGHTS

    h = hashlib.sha256()
    with open(Path(weights) / ADAPTER_WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class MemoryModel:
    """One replica: backbone + the serving bank + memory weights. `cfg.model.cache_path` is the serving bank."""

    def __init__(self, cfg: Config):
        import torch

        from explicitlm.loading import fill_from_weights

        if cfg.serve.torch_threads:
            torch.set_num_threads(cfg.serve.torch_threads)
        self.cfg = fill_from_weights(cfg, cfg.serve.weights)
        self.device = resolve_device(self.cfg.serve.device, "serve.device")
        if self.device.type == "cpu":
            limit_cpu_kernels(self.cfg.serve.onednn_cache)
        self.dtype = serving_dtype(self.cfg.serve.dtype, self.device)
        self.autocast = partial(torch.autocast, self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.adapter = adapter_id(self.cfg.serve.weights)
        self.limits = RequestLimits.from_config(self.cfg)
        self.lock = threading.Lock()
        self._load()
        self.control = control_markers(self.tokenizer)
        self.failed: str | None = None  # set when a batch raised: the replica should be replaced
        self.last_ok = time.monotonic()

    def _load(self) -> None:
        from explicitlm.loading import build_model

        if not self.cfg.model.cache_path or not Path(self.cfg.model.cache_path).exists():
            raise FileNotFoundError(f"memory bank {self.cfg.model.cache_path!r} not found")
        self.model = None  # one model in memory at a time
        # The backbone in the compute dtype; the memory modules run under autocast, as in training,
        # with their weights held in that dtype (cast once here, not in every forward). The bank's
        # index is cached beside the serving bank.
        self.tokenizer, self.model = build_model(
            self.cfg, device=self.device, adapter=self.cfg.serve.weights, dtype=self.dtype
        )
        self.model.eval().hold_for_answers(self.dtype)
        self.model.memory_off = not self.cfg.serve.memory
        self.version = self.model.bank.version

    def reload(self) -> int:
        """Load the bank file again (with the model around it), for a replica further behind than the
        edits the bank's owner keeps; returns the version loaded."""
        with self.lock:
            self._load()
            return self.version

    def _apply(self, edits: list[dict[str, Any]]) -> None:
        if not edits:
            return
        with one_thread():
            for e in edits:
                if e["version"] <= self.version:
                    continue
                if e["version"] != self.version + 1:
                    raise RuntimeError(f"edit {e['version']} does not follow the model's bank version {self.version}")
                self.model.set_memory_row(e["uuid"], e["text"], self.tokenizer)
                self.version = self.model.bank.version = e["version"]

    def apply(self, edits: list[dict[str, Any]]) -> int:
        """Bring this replica's bank up to the owner's version (edits in order); returns the version."""
        with self.lock:
            try:
                self._apply(edits)
            except Exception as e:
                self.failed = f"applying an edit failed: {type(e).__name__}: {e}"
                raise
            return self.version

    def answer(self, questions: list[Question], edits: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Apply `edits`, then answer. A question that cannot be scored gets {"error", "field",
        "detail"} instead of a score, and its batch-mates are answered: control text in it, too many
        tokens for `model.max_seq_len` ("prompt_too_long", with "tokens" and "limit"), or a failure
        that only it meets."""
        with self.lock:
            try:
                self._apply(list(edits))
                out: list[dict[str, Any] | None] = [self._refusal(q) for q in questions]
                todo = [i for i, r in enumerate(out) if r is None]
                if todo:
                    for i, s in zip(todo, self._score([questions[i] for i in todo])):
                        out[i] = s if isinstance(s, dict) else self._result(questions[i], s)
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise
            self.failed = None
            self.last_ok = time.monotonic()
            return out

    def _refusal(self, q: Question) -> dict[str, Any] | None:
        """Why a question cannot be scored, found before any forward pass; None when it can be."""
        for field, texts in (("question", [q.question]), ("options", q.options)):
            for text in texts:
                marker = find_control(text, self.control)
                if marker:
                    detail = f"{field} contains the chat template's control text {marker!r}"
                    return {"error": "control_text", "field": field, "detail": detail}
        field = "options" if q.options else "question"
        try:
            over = prompt_tokens_over(self.tokenizer, q, self.limits.max_prompt_tokens)
        except RenderError as e:
            return {"error": "unrenderable", "field": field, "detail": str(e)}
        except Exception:  # noqa: BLE001 - this question's own failure, in the log; its batch-mates go on
            logger.exception("a question could not be rendered: %.200r", q.question)
            return {"error": "unrenderable", "field": field, "detail": "this question could not be rendered"}
        if over is None:
            return None
        limit = self.limits.max_prompt_tokens
        detail = (
            f"the question{' and options' if q.options else ''} take{'' if q.options else 's'} {over} tokens "
            "with the chat template; "
            f"the model reads at most {limit} (model.max_seq_len)"
        )
        return {"error": "prompt_too_long", "field": "question", "tokens": over, "limit": limit, "detail": detail}

    def _score(self, questions: list[Question]) -> list[Any]:
        """Score questions in one batch. When the batch fails, each is scored alone: one that fails
        alone gets an error of its own; when every one does, the model is what fails, and it raises."""
        try:
            return self._forward(questions)
        except RenderError as e:
            if len(questions) == 1:
                return [{"error": "unrenderable", "field": "options", "detail": str(e)}]
            failure: Exception = e
        except Exception as e:
            if len(questions) == 1:
                raise
            failure = e
        out: list[Any] = []
        for q in questions:
            try:
                out.append(self._forward([q])[0])
            except RenderError as e:
                out.append({"error": "unrenderable", "field": "options", "detail": str(e)})
            except Exception:  # noqa: BLE001 - this question's own failure, in the log; its 422 says no more
                logger.exception("a question failed to score on its own: %.200r", q.question)
                out.append({"error": "unscorable", "field": "question", "detail": "this question could not be scored"})
        if all(isinstance(o, dict) and o["error"] == "unscorable" for o in out):
            raise failure
        return out

    def _forward(self, questions: list[Question]) -> list[Any]:
        """Questions with options scored, those without answered by generation, in one call."""
        out: list[Any] = [None] * len(questions)
        choice = [i for i, q in enumerate(questions) if q.options]
        opened = [i for i, q in enumerate(questions) if not q.options]
        with self.autocast():
            if choice:
                scored = score_questions(
                    self.model,
                    self.tokenizer,
                    [questions[i] for i in choice],
                    self.cfg.model.max_seq_len,
                    batch_size=max(64, 4 * len(choice)),
                )
                for i, s in zip(choice, scored):
                    out[i] = s
            if opened:
                generated = generate_answers(
                    self.model,
                    self.tokenizer,
                    [questions[i] for i in opened],
                    self.cfg.model.max_seq_len,
                    self.cfg.serve.max_new_tokens,
                    batch_size=max(32, len(opened)),
                )
                for i, g in zip(opened, generated):
                    out[i] = g
        return out

    def _result(self, q: Question, s: Any) -> dict[str, Any]:
        if isinstance(s, Generated):
            head: dict[str, Any] = {"answer": s.text, "text": s.text, "finished": s.finished}
        else:
            label = LABELS[s.index]
            head = {
                "answer": f"{label}:{q.options[s.index]}",
                "text": q.options[s.index],
                "label": label,
                "index": s.index,
                "probabilities": [round(p, 6) for p in s.probabilities],
            }
        return {
            **head,
            "memory": memory_rows(self.model.bank, s),
            "memory_match": round(sum(s.trust) / max(len(s.trust), 1), 6),
            "memory_used": sum(s.used) > len(s.used) / 2,
            "bank_version": self.version,
            "adapter": self.adapter,
        }

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "adapter": self.adapter,
            "failed": self.failed,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def probe(self) -> None:
        """Answer one small question when nothing was answered lately: proof that the model still can."""
        if time.monotonic() - self.last_ok > 10:
            self.answer([PROBE])


def _worker_main(conn, cfg_dict: dict[str, Any]) -> None:
    """The model process: load, say ready (or why not), then answer calls until the pipe closes.
    Every call carries an id that its reply repeats, so the parent can tell a late reply from the next."""
    from explicitlm.loading import config_from_dict

    try:
        model = MemoryModel(config_from_dict(cfg_dict))
    except Exception as e:  # noqa: BLE001 - the parent reports it and exits
        conn.send((0, False, f"{type(e).__name__}: {e}"))
        return
    conn.send((0, True, model.status()))
    while True:
        try:
            call, method, args = conn.recv()
        except EOFError:  # the server is gone (a kill -9 closes its end too)
            return
        try:
            conn.send((call, True, getattr(model, method)(*args)))
        except Exception as e:  # noqa: BLE001 - a failed call fails its requests, not the process
            logger.exception("model call %s failed", method)
            conn.send((call, False, f"{type(e).__name__}: {e}"))


class ModelProcess:
    """A MemoryModel in its own process, for the plain uvicorn server.

    The HTTP event loop (parsing, validation, JSON) and the forward pass's Python glue then never
    wait on one GIL: in one process, 32 concurrent clients slowed a batch's forward pass by half.
    Calls are serialised, like MemoryModel's own lock, and each waits at most `timeout_s`
    (serve.request_timeout_s) for its reply: a model process that hangs fails its calls with
    ModelTimeout instead of holding them forever. A call that timed out is still owed a reply; the
    next call waits for that one first (within its own deadline) and sends nothing before it, so the
    pipe never fills and no reply is taken for another call's.
    """

    def __init__(self, cfg: Config):
        import multiprocessing as mp
        from dataclasses import asdict

        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch or event-loop state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, asdict(cfg)), daemon=True, name="explicitlm-model")
        self.proc.start()
        child.close()
        try:
            _, ok, value = self.conn.recv()
        except EOFError:
            ok, value = False, f"it exited with code {self.proc.exitcode}"
        if not ok:
            self.proc.join(timeout=10)
            raise RuntimeError(f"the model process could not load the model: {value}")
        self.info = value
        self.version, self.adapter, self.device = value["version"], value["adapter"], value["device"]
        self.dtype = value["dtype"]
        self.timeout_s = cfg.serve.request_timeout_s
        self.lock = threading.Lock()
        self._calls = 0  # the id of the last call sent
        self._owed: int | None = None  # a call whose reply has not been read (it timed out)

    def alive(self) -> bool:
        return self.proc.is_alive()

    def _exited(self) -> ModelUnavailable:
        self.proc.join(timeout=5)
        return ModelUnavailable(f"the model process has exited (code {self.proc.exitcode})")

    def _reply(self, call: int, deadline: float, timeout_s: float) -> tuple[bool, Any]:
        """The reply to `call`; replies to calls before it (that timed out) are dropped."""
        while True:
            try:
                if not self.conn.poll(max(deadline - time.monotonic(), 0)):
                    if not self.proc.is_alive():
                        raise self._exited()
                    raise ModelTimeout(f"the model did not answer within {timeout_s:g} s (serve.request_timeout_s)")
                got, ok, value = self.conn.recv()
            except (EOFError, OSError):
                raise self._exited() from None
            if got == call:
                self._owed = None
                return ok, value

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if not self.lock.acquire(timeout=timeout_s):
            raise ModelTimeout(f"the model did not take the call within {timeout_s:g} s (serve.request_timeout_s)")
        try:
            if not self.proc.is_alive():
                raise self._exited()
            if self._owed is not None:
                self._reply(self._owed, deadline, timeout_s)
            self._calls += 1
            try:
                self.conn.send((self._calls, method, args))
            except (EOFError, OSError):
                raise self._exited() from None
            self._owed = self._calls
            ok, value = self._reply(self._calls, deadline, timeout_s)
        finally:
            self.lock.release()
        if not ok:
            raise RuntimeError(value)
        return value

    def answer(self, questions: list[Question], edits: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        return self._call("answer", questions, list(edits))

    def apply(self, edits: list[dict[str, Any]]) -> int:
        return self._call("apply", edits)

    def reload(self) -> int:
        return self._call("reload", timeout_s=max(self.timeout_s, RELOAD_TIMEOUT_S))

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()  # a stopped or hung process: SIGTERM would wait for it to run again
            self.proc.join(timeout=10)
