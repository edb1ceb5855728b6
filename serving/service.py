"""What the HTTP layer calls: the request limits and the loaded model with its scorer.

`MemoryModel` holds one replica's backbone, bank and trained memory weights and answers batches of
questions with the same scorer evaluation uses. It takes the bank's edits from the serving bank's
owner (`serving.store.BankStore`) and applies them, in order, before the batch that follows them;
every answer names the bank version it was read from and the weights that read it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from explicitlm.config import Config
from explicitlm.data import LABELS, encode, render_answer
from explicitlm.loading import serving_dtype
from explicitlm.scoring import Question, memory_rows, score_questions
from explicitlm.threads import one_thread


class ModelUnavailable(RuntimeError):
    """The model (its process, or its replica) cannot answer."""


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
    `limit`, else None. The scorer would cut such a sequence and score what is left."""
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
        len(encode(tokenizer, q.user, q.question, LABELS[i], t, 1 << 30).input_ids) for i, t in enumerate(q.options)
    )
    return n if n > limit else None


def resolve_device(name: str):
    """serve.device: auto (cuda when available), cpu or cuda."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("serve.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


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

        from explicitlm.loading import build_model, fill_from_weights

        if cfg.serve.torch_threads:
            torch.set_num_threads(cfg.serve.torch_threads)
        self.cfg = fill_from_weights(cfg, cfg.serve.weights)
        self.device = resolve_device(self.cfg.serve.device)
        if not self.cfg.model.cache_path or not Path(self.cfg.model.cache_path).exists():
            raise FileNotFoundError(f"memory bank {self.cfg.model.cache_path!r} not found")
        self.dtype = serving_dtype(self.cfg.serve.dtype, self.device)
        # The backbone in the compute dtype; the memory modules keep float32 weights and run under
        # autocast, as in training. The bank's index is cached beside the serving bank.
        self.tokenizer, self.model = build_model(
            self.cfg, device=self.device, adapter=self.cfg.serve.weights, dtype=self.dtype
        )
        self.model.eval()
        self.autocast = partial(torch.autocast, self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.adapter = adapter_id(self.cfg.serve.weights)
        self.limits = RequestLimits.from_config(self.cfg)
        self.version = self.model.bank.version
        self.lock = threading.Lock()
        self.failed: str | None = None  # set when a batch raised: the replica should be replaced
        self.last_ok = time.monotonic()

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
        """Apply `edits`, then answer. A question whose sequences do not fit `model.max_seq_len` gets
        {"error": "prompt_too_long", "tokens", "limit"} instead of a score."""
        with self.lock:
            try:
                self._apply(list(edits))
                out: list[dict[str, Any] | None] = [None] * len(questions)
                todo = []
                for i, q in enumerate(questions):
                    over = prompt_tokens_over(self.tokenizer, q, self.limits.max_prompt_tokens)
                    if over is None:
                        todo.append(i)
                    else:
                        out[i] = {"error": "prompt_too_long", "tokens": over, "limit": self.limits.max_prompt_tokens}
                if todo:
                    with self.autocast():
                        scored = score_questions(
                            self.model,
                            self.tokenizer,
                            [questions[i] for i in todo],
                            self.cfg.model.max_seq_len,
                            batch_size=max(64, 4 * len(todo)),
                        )
                    for i, s in zip(todo, scored):
                        out[i] = self._result(questions[i], s)
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise
            self.failed = None
            self.last_ok = time.monotonic()
            return out

    def _result(self, q: Question, s: Any) -> dict[str, Any]:
        label = LABELS[s.index]
        return {
            "answer": f"{label}:{q.options[s.index]}",
            "label": label,
            "index": s.index,
            "probabilities": [round(p, 6) for p in s.probabilities],
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
            self.answer([Question("Is this a probe?", ["yes", "no"])])


def _worker_main(conn, cfg_dict: dict[str, Any]) -> None:
    """The model process: load, say ready (or why not), then answer calls until the pipe closes."""
    from explicitlm.loading import config_from_dict

    try:
        model = MemoryModel(config_from_dict(cfg_dict))
    except Exception as e:  # noqa: BLE001 - the parent reports it and exits
        conn.send((False, f"{type(e).__name__}: {e}"))
        return
    conn.send((True, model.status()))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the server is gone (a kill -9 closes its end too)
            return
        try:
            conn.send((True, getattr(model, method)(*args)))
        except Exception as e:  # noqa: BLE001 - a failed call fails its requests, not the process
            conn.send((False, f"{type(e).__name__}: {e}"))


class ModelProcess:
    """A MemoryModel in its own process, for the plain uvicorn server.

    The HTTP event loop (parsing, validation, JSON) and the forward pass's Python glue then never
    wait on one GIL: in one process, 32 concurrent clients slowed a batch's forward pass by half.
    Calls are serialised, like MemoryModel's own lock.
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
            ok, value = self.conn.recv()
        except EOFError:
            ok, value = False, f"it exited with code {self.proc.exitcode}"
        if not ok:
            self.proc.join(timeout=10)
            raise RuntimeError(f"the model process could not load the model: {value}")
        self.info = value
        self.version, self.adapter, self.device = value["version"], value["adapter"], value["device"]
        self.dtype = value["dtype"]
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def _call(self, method: str, *args: Any) -> Any:
        with self.lock:
            if not self.proc.is_alive():
                raise ModelUnavailable(f"the model process has exited (code {self.proc.exitcode})")
            try:
                self.conn.send((method, args))
                ok, value = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(timeout=5)
                raise ModelUnavailable(f"the model process has exited (code {self.proc.exitcode})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def answer(self, questions: list[Question], edits: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        return self._call("answer", questions, list(edits))

    def apply(self, edits: list[dict[str, Any]]) -> int:
        return self._call("apply", edits)

    def status(self) -> dict[str, Any]:
        return self._call("status")

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
