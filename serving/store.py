"""The serving bank's durable state: its own bank file, a write-ahead edit log, the bank in memory.

An edit is appended to the log and fsynced before it changes anything; only then is it applied
(here, and in every model replica through `edits_since`) and acknowledged. The bank file is
rewritten in the background after every `compact_every` edits, at most once per
`compact_interval_s`, by a child process that replaces the rows edits changed (temp file, fsync,
rename); the log then keeps only the edits the file lacks. On start the file is loaded and the log
replayed. So an acknowledged edit is never lost, and an edit whose log line a crash cut short was
never acknowledged and is dropped whole.

Files, all named after the bank file B so that they travel with it:
    B        the bank (Parquet); its `version` is the last edit it contains
    B.wal    the log: one JSON line per edit {"version", "action", "uuid", "text", "old_text", "time"};
             {"version": v, "action": "abort"} cancels edit v (logged, then not applied)
    B.lock   held (flock) by the one process that owns the bank while it runs
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from explicitlm.bank import MemoryBank
from explicitlm.files import remove_temp_files, write_atomic


class StoreError(RuntimeError):
    """The bank cannot take edits now (its log cannot be written, or another process owns it)."""


class EditRejected(ValueError):
    """An edit that names a missing row (404) or an existing one (409); nothing was logged."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


REWRITE_TIMEOUT_S = 1800.0  # the longest a rewrite may take (at nice 19, a busy server slows it down)


def wal_path(bank_path: Path) -> Path:
    return bank_path.with_name(bank_path.name + ".wal")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_atomic(src: Path, dest: Path) -> None:
    def copy(tmp: str) -> None:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)

    write_atomic(dest, copy)


def serving_bank_path(serve_cache_path: str, weights: str, training_bank: str) -> Path:
    """`serve.cache_path`, or by default `{weights}/serving/<the training bank's file name>`."""
    if serve_cache_path:
        return Path(serve_cache_path)
    return Path(weights) / "serving" / Path(training_bank).name


def ensure_serving_bank(training_bank: str | Path, dest: str | Path) -> bool:
    """Copy the training bank to the serving path once, with every file beside it whose name starts
    with the bank's stem (cached statistics, an index), renamed after the serving bank. The bank file
    goes last: its presence says the copy is complete. Returns whether it copied."""
    source, dest = Path(training_bank), Path(dest)
    if dest.exists():
        if source.exists() and os.path.samefile(source, dest):
            raise ValueError(
                f"serve.cache_path is the training bank {source}: the server would write it; name another file"
            )
        return False
    if not source.exists():
        raise FileNotFoundError(f"no serving bank at {dest} and no training bank at {source} to copy it from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.parent.iterdir()):
        if f.is_file() and f.name.startswith(source.stem) and f != source and not f.name.endswith(".lock"):
            _copy_atomic(f, dest.parent / (dest.stem + f.name[len(source.stem) :]))
    _copy_atomic(source, dest)
    fsync_dir(dest.parent)
    return True


def rewrite_rows(path: Path, changes: pa.Table, since: int, lock_fd: int, timeout_s: float = REWRITE_TIMEOUT_S) -> None:
    """Rewrite rows of the bank file (the edits after version `since`) in a child process
    (`explicitlm.bank_file`, at nice 19, `bank_file.background`), so the rewrite neither holds this
    process's interpreter lock nor takes its cores from requests. The child inherits the bank's
    lock: should this process die first, the next owner waits for the rewrite to finish instead of
    racing it."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, changes.schema) as writer:
        writer.write_table(changes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen(
        [sys.executable, "-m", "explicitlm.bank_file", "patch", str(path), str(since)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(lock_fd,),
        env=env,
        # Out of the server's process group from the start (a Ctrl-C for the server spares it).
        **({"process_group": 0} if sys.version_info >= (3, 11) else {}),
    )
    try:
        _, err = child.communicate(sink.getvalue().to_pybytes(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.terminate()  # SIGTERM: its temporary file is removed on the way out
        try:
            child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        raise StoreError(f"rewriting {path} took more than {timeout_s:.0f} s; stopped") from None
    if child.returncode:
        raise StoreError(f"rewriting {path} failed: {err.decode(errors='replace').strip()[-500:]}")
    fsync_dir(path.parent)  # the rename is durable before the log lets go of the edits


class EditLog:
    """The write-ahead log file: complete lines only, appended and fsynced one edit at a time."""

    ACTIONS = ("replace", "add", "abort")

    def __init__(self, path: Path):
        self.path = path
        self.fh: Any = None

    def read(self) -> list[dict[str, Any]]:
        """The logged edits, aborted ones left out. A last line cut short by a crash (never
        acknowledged) is dropped from the file; a bad line before it means the file was damaged."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        keep = len(data) - len(lines[-1])  # the piece after the last newline is a cut-short write
        records = []
        for n, line in enumerate(lines[:-1]):
            try:
                e = json.loads(line)
                if not isinstance(e.get("version"), int) or e.get("action") not in self.ACTIONS:
                    raise ValueError("not an edit record")
            except ValueError:
                if n == len(lines) - 2:
                    keep -= len(line) + 1
                    break
                raise StoreError(f"edit log {self.path}, line {n + 1}, is damaged: {line[:80]!r}") from None
            records.append(e)
        if keep < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
                os.fsync(fh.fileno())
        entries: list[dict[str, Any]] = []
        for e in records:
            if e["action"] != "abort":
                entries.append(e)
            elif entries and entries[-1]["version"] == e["version"]:
                entries.pop()
        return entries

    def open(self) -> None:
        self.fh = open(self.path, "ab")

    def append(self, entry: dict[str, Any]) -> None:
        """Durable when it returns; on failure the file is as it was and StoreError is raised."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        pos = self.fh.tell()
        try:
            self.fh.write(line)
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as e:
            try:
                self.fh.truncate(pos)
                self.fh.seek(pos)
            except OSError:
                pass
            raise StoreError(f"the edit log {self.path} cannot be written: {e}") from None

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the log with `entries`, atomically."""
        data = b"".join((json.dumps(e, ensure_ascii=False) + "\n").encode() for e in entries)
        try:
            write_atomic(self.path, lambda tmp: Path(tmp).write_bytes(data))
            fsync_dir(self.path.parent)
        finally:  # appends go to the file now at the path, whichever it is
            self.fh.close()
            self.open()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class TextSearch:
    """Case-insensitive substring search over the bank's texts, bounded in time.

    Texts are kept lower-cased and joined in blocks of `block` rows, so a search is one `str.find`
    per block, at C speed, instead of a Python loop over rows; an edit marks only its block stale.
    Cost: one pass over the bank's text, about 50 MB per million rows of sentences.
    """

    SEP = "\x00"

    def __init__(self, texts: list[str], block: int = 4096):
        self.texts, self.block = texts, block
        self.blocks: dict[int, tuple[str, list[int]]] = {}
        self.stale: set[int] = set()
        self.lock = threading.Lock()

    def touch(self, row: int) -> None:
        self.stale.add(row // self.block)

    def _block(self, b: int) -> tuple[str, list[int]]:
        if b in self.stale or b not in self.blocks:
            self.stale.discard(b)  # before reading the texts: an edit during the rebuild marks it again
            lowered = [t.lower() for t in self.texts[b * self.block : (b + 1) * self.block]]
            starts = [0]
            for t in lowered:
                starts.append(starts[-1] + len(t) + 1)
            self.blocks[b] = (self.SEP.join(lowered), starts)
        return self.blocks[b]

    def search(self, fragment: str, limit: int, timeout_s: float) -> tuple[list[int], bool]:
        """Rows whose text contains `fragment`, in row order, up to `limit`; and whether the search
        covered the bank (or reached the limit) before `timeout_s`."""
        needle = fragment.lower()
        deadline = time.monotonic() + timeout_s
        rows: list[int] = []
        with self.lock:
            n_blocks = (len(self.texts) + self.block - 1) // self.block
            for b in range(n_blocks):
                if time.monotonic() > deadline:
                    return rows, False
                blob, starts = self._block(b)
                pos = blob.find(needle)
                while pos >= 0:
                    i = bisect.bisect_right(starts, pos) - 1
                    rows.append(b * self.block + i)
                    if len(rows) >= limit:
                        return rows, True
                    pos = blob.find(needle, starts[i + 1])
        return rows, True


def _holder_exited(holder: str) -> bool:
    """Whether the lock file's "pid N on HOST" names a process of this host that has exited: the
    lock is then held by a rewrite of the bank file that outlived its server."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[3] != os.uname().nodename:
        return False
    return not Path(f"/proc/{parts[1]}").exists()


def _acquire(lock_path: Path, timeout_s: float):
    """An exclusive flock on `lock_path`, waited for up to timeout_s (a previous owner shutting
    down), or up to REWRITE_TIMEOUT_S while the holder is a rewrite whose server has exited."""
    fh = open(lock_path, "a+")
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited > timeout_s:
                fh.seek(0)
                holder = fh.read().strip()
                if not (_holder_exited(holder) and waited < REWRITE_TIMEOUT_S):
                    fh.close()
                    raise StoreError(
                        f"the memory bank {lock_path.name.removesuffix('.lock')} is served by another process "
                        f"({holder or 'unknown'}); give each server its own serve.cache_path"
                    ) from None
            time.sleep(0.1)
    fh.truncate(0)
    fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    fh.flush()
    return fh


class BankStore:
    """The authoritative serving bank: file, log, the bank in memory and the edits since start.

    Edits are serialised by one lock and take a log append (an fsync) and a row update; a background
    thread has the file rewritten, holding the lock only to copy the rows edits changed.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        compact_every: int = 1000,
        lock_timeout_s: float = 30.0,
        compact_interval_s: float = 0.0,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer  # used under self.lock only: a fast tokenizer is not safe to share across threads
        self.compact_every = compact_every
        # Rewriting a bank of a million rows takes seconds of CPU: under a stream of edits, at most
        # one rewrite per interval (the log holds the edits in between, replayed on a restart).
        self.compact_interval_s = compact_interval_s
        self._last_compact = time.monotonic()
        self._closing = threading.Event()
        self.lock = threading.Lock()
        self._compacting = threading.Lock()
        self.compact_error: str | None = None
        self.broken: str | None = None
        self.closed = False
        self._lock_fh = _acquire(self.path.with_name(self.path.name + ".lock"), lock_timeout_s)
        try:
            self._recover()
            if self.bank.version > self.file_version or self._log_behind:
                self.compact()  # the file catches up with the replayed log before any replica loads it
        except BaseException:
            self._lock_fh.close()
            raise
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._compactor, name="bank-compactor", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """Load the bank file and replay the logged edits it lacks."""
        for written in (self.path, wal_path(self.path)):  # what a killed rewrite left; the lock is ours
            remove_temp_files(written)
        self.bank = MemoryBank.load(self.path)
        self.file_version = self.bank.version
        # The edits since the file was loaded, for replicas to catch up: entries[k] is version base + 1 + k.
        self.base = self.bank.version
        self.entries: list[dict[str, Any]] = []
        self.log = EditLog(wal_path(self.path))
        self._log_behind = False  # the log still holds edits the file has (a compaction stopped midway)
        for e in self.log.read():
            if e["version"] <= self.file_version:
                self._log_behind = True
                continue
            if e["version"] != self.bank.version + 1:
                raise StoreError(
                    f"edit log {self.log.path} jumps from version {self.bank.version} to {e['version']}: "
                    f"it does not continue the bank file {self.path}"
                )
            self._apply(e)
            self.entries.append(e)
        self.log.open()
        self.search_index = TextSearch(self.bank.texts)

    def _apply(self, e: dict[str, Any]) -> None:
        if e["action"] == "add":
            self.bank.add_row(e["uuid"], e["text"], self.tokenizer)
        else:
            self.bank.set_row(self.bank.row_of(e["uuid"]), e["text"], self.tokenizer)
        self.bank.version = e["version"]

    @property
    def version(self) -> int:
        return self.bank.version

    def edit(self, uuid: str, text: str, create: bool) -> dict[str, Any]:
        """Replace (create=False) or add (create=True) a row: logged durably, then applied, then returned."""
        with self.lock:
            if self.closed or self.broken:
                raise StoreError(self.broken or "the memory bank is closed")
            row = self.bank.row_of(uuid)
            if create and row >= 0:
                raise EditRejected(409, f"memory row {uuid} already exists")
            if not create and row < 0:
                raise EditRejected(404, f"no memory row {uuid}")
            n_tokens = len(self.tokenizer(" " + text.lstrip(), add_special_tokens=False)["input_ids"])
            entry = {
                "version": self.bank.version + 1,
                "action": "add" if create else "replace",
                "uuid": uuid,
                "text": text,
                "old_text": None if create else self.bank.texts[row],
                "time": round(time.time(), 6),
            }
            self.log.append(entry)
            try:
                self._apply(entry)
            except Exception:
                # Logged but not applied: cancel it in the log, and rebuild the bank from file and log.
                try:
                    kept = (self.base, self.entries)
                    self.log.append({"version": entry["version"], "action": "abort"})
                    self.log.close()
                    self._recover()
                    if self.bank.version == kept[0] + len(kept[1]):  # the same edits: replicas behind
                        self.base, self.entries = kept  # still catch up from them, not from the file
                except Exception as e:  # noqa: BLE001 - no edit is safe any more; a restart replays the log
                    self.broken = f"the memory bank could not recover from a failed edit: {e}"
                raise
            self.entries.append(entry)
            self.search_index.touch(self.bank.row_of(uuid))
            due = self.bank.version - self.file_version >= self.compact_every
        if due:
            self._wake.set()
        return {**entry, "tokens": n_tokens, "truncated": n_tokens > self.bank.knowledge_length}

    def edits_since(self, version: int) -> list[dict[str, Any]] | None:
        """The edits after `version`, in order; None when they are not kept (load the bank file again)."""
        if version < self.base:
            return None
        return self.entries[version - self.base :]

    def row(self, uuid: str) -> dict[str, Any] | None:
        i = self.bank.row_of(uuid)
        return None if i < 0 else {"uuid": uuid, "text": self.bank.texts[i]}

    def search(self, fragment: str, limit: int, timeout_s: float) -> dict[str, Any]:
        rows, complete = self.search_index.search(fragment, limit, timeout_s)
        return {"rows": [{"uuid": self.bank.uuids[i], "text": self.bank.texts[i]} for i in rows], "complete": complete}

    def stats(self) -> dict[str, Any]:
        return {
            "rows": len(self.bank),
            "version": self.bank.version,
            "saved_version": self.file_version,
            "compact_error": self.compact_error,
        }

    def compact(self) -> None:
        """Bring the bank file up to the bank in memory, then drop the logged edits it now holds.

        Only the rows that edits changed leave this process (copied under the lock, a few KB per
        edit); a child process rewrites the file with them (`rewrite_rows`)."""
        with self._compacting:
            with self.lock:
                if self.bank.version == self.file_version and not self._log_behind:
                    return
                since = self.file_version
                rows = sorted({self.bank.row_of(e["uuid"]) for e in self.entries[since - self.base :]})
                changes = self.bank.rows_table(rows) if rows else None
                version = self.bank.version
            if changes is not None:
                changes = changes.add_column(0, "row", pa.array(rows, pa.int64()))
                rewrite_rows(self.path, changes, since, self._lock_fh.fileno())
            with self.lock:
                self.file_version = version
                self._log_behind = True  # until the log no longer holds the edits the file has
                self.log.rewrite(self.entries[version - self.base :])
                self._log_behind = False

    def _compactor(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self.closed:
                return
            if self._closing.wait(self._last_compact + self.compact_interval_s - time.monotonic()):
                return  # closing: close() brings the file up to date itself
            if self.bank.version - self.file_version < self.compact_every:
                continue  # woken by edits that counted from the file before the last rewrite ended
            try:
                self.compact()
                self._last_compact = time.monotonic()
                self.compact_error = None
            except Exception as e:  # noqa: BLE001 - the log still holds every edit; the next edit retries
                self.compact_error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        """Bring the file up to date, stop the compactor, release the bank."""
        if self.closed:
            return
        self._closing.set()
        try:
            if not self.broken:
                self.compact()
        finally:
            with self.lock:
                self.closed = True
            self._wake.set()
            self._thread.join(timeout=30)
            self.log.close()
            self._lock_fh.close()
