"""What the HTTP layer calls: the loaded model, the scorer, and the memory bank's single owner.

`MemoryModel` holds one replica's backbone, bank and trained memory weights and answers batches of
questions with the same scorer evaluation uses. `BankOwner` is the one place that owns the bank's
current version: it applies an edit, writes the bank file atomically, logs the old text, and hands
every replica the edits it has not seen yet, so replicas never diverge silently.
"""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from explicitlm.bank import MemoryBank
from explicitlm.config import Config
from explicitlm.model import resolve_dtype
from explicitlm.scoring import Question, memory_rows, score_questions


class BankOwner:
    """The authoritative memory bank: version, durable file, edit log. Plain class or Ray actor."""

    def __init__(self, bank_path: str, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.path = Path(bank_path)
        self.log_path = self.path.with_name(self.path.stem + ".edits.jsonl")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.bank = MemoryBank.load(self.path)
        self.edits: list[dict[str, Any]] = []  # edits made since this owner started, in order
        self.base_version = self.bank.version
        self.lock = threading.Lock()

    def version(self) -> int:
        return self.bank.version

    def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        """Replace (create=False) or add (create=True) a row; durable before it returns."""
        with self.lock:
            row = self.bank.row_of(uuid)
            if create and row >= 0:
                raise KeyError(f"memory row {uuid} already exists")
            if not create and row < 0:
                raise LookupError(f"no memory row {uuid}")
            old = None if create else self.bank.texts[row]
            if create:
                self.bank.add_row(uuid, text, self.tokenizer)
            else:
                self.bank.set_row(row, text, self.tokenizer)
            self.bank.save(self.path)  # atomic replace: a crash leaves the old or the new file
            entry = {
                "version": self.bank.version,
                "uuid": uuid,
                "text": text,
                "old_text": old,
                "time": time.time(),
                "action": "add" if create else "replace",
            }
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.edits.append(entry)
            return entry

    def edits_since(self, version: int) -> list[dict[str, Any]]:
        return [e for e in self.edits if e["version"] > version]


class MemoryModel:
    """One replica: backbone + bank + memory weights, kept in step with the BankOwner."""

    def __init__(self, cfg: Config):
        import torch

        from explicitlm.loading import build_model, fill_from_weights

        if cfg.serve.torch_threads:
            torch.set_num_threads(cfg.serve.torch_threads)
        self.cfg = fill_from_weights(cfg, cfg.serve.weights)
        if not self.cfg.model.cache_path or not Path(self.cfg.model.cache_path).exists():
            raise FileNotFoundError(f"memory bank {self.cfg.model.cache_path!r} not found: set model.cache_path")
        self.tokenizer, self.model = build_model(self.cfg, adapter=self.cfg.serve.weights)
        self.model.eval()
        device = next(self.model.parameters()).device
        self.dtype = resolve_dtype(self.cfg.serve.dtype, device)
        # Inference only: the whole layer stack (memory modules too) can live in the compute dtype;
        # autocast covers the float32 index buffers the gate multiplies with.
        self.model.backbone.to(self.dtype)
        self.autocast = partial(torch.autocast, device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.version = self.model.bank.version
        self.lock = threading.Lock()

    def apply(self, edits: list[dict[str, Any]]) -> None:
        """Bring this replica's bank up to the owner's version (edits in order)."""
        with self.lock:
            for e in edits:
                if e["version"] > self.version:
                    self.model.set_memory_row(e["uuid"], e["text"], self.tokenizer)
                    self.version = e["version"]
                    self.model.bank.version = e["version"]

    def answer(self, questions: list[Question]) -> list[dict[str, Any]]:
        with self.lock, self.autocast():
            scored = score_questions(
                self.model,
                self.tokenizer,
                questions,
                self.cfg.model.max_seq_len,
                batch_size=max(64, 4 * len(questions)),
            )
            out = []
            for q, s in zip(questions, scored):
                label = chr(ord("A") + s.index)
                out.append(
                    {
                        "answer": f"{label}:{q.options[s.index]}",
                        "label": label,
                        "index": s.index,
                        "probabilities": [round(p, 6) for p in s.probabilities],
                        "memory": memory_rows(self.model.bank, s),
                        "memory_match": round(sum(s.match) / max(len(s.match), 1), 6),
                        "memory_used": any(s.used),
                    }
                )
            return out

    def row(self, uuid: str) -> dict[str, Any] | None:
        return bank_row(self.model.bank, uuid)

    def search(self, fragment: str, limit: int) -> list[dict[str, Any]]:
        return bank_search(self.model.bank, fragment, limit)


def bank_row(bank: MemoryBank, uuid: str) -> dict[str, Any] | None:
    """A row as the HTTP layer shows it, or None."""
    i = bank.row_of(uuid)
    return None if i < 0 else {"uuid": uuid, "text": bank.texts[i]}


def bank_search(bank: MemoryBank, fragment: str, limit: int) -> list[dict[str, Any]]:
    return [{"uuid": r["uuid"], "text": r["text"]} for r in bank.search(fragment, limit)]


def _worker_main(conn, cfg_dict: dict[str, Any]) -> None:
    """The model process: load, say ready (or why not), then answer calls until the pipe closes."""
    from explicitlm.loading import config_from_dict

    try:
        model = MemoryModel(config_from_dict(cfg_dict))
    except Exception as e:  # noqa: BLE001 - the parent reports it and exits
        conn.send((False, f"{type(e).__name__}: {e}"))
        return
    conn.send((True, None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
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
        ok, error = self.conn.recv()
        if not ok:
            self.proc.join(timeout=10)
            raise RuntimeError(f"the model process could not load the model: {error}")
        self.lock = threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        with self.lock:
            self.conn.send((method, args))
            ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def answer(self, questions: list[Question]) -> list[dict[str, Any]]:
        return self._call("answer", questions)

    def apply(self, edits: list[dict[str, Any]]) -> None:
        self._call("apply", edits)
