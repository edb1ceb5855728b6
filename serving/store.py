"""The serving bank's durable state: its own bank file, a write-ahead edit log, the bank in memory.

An edit is appended to the log and fsynced before it changes anything; only then is it applied
(here, and in every model replica through `edits_since`) and acknowledged. The log is written with
`os.write` on an unbuffered descriptor: a write that fails (a full disk) is cut off again with
`ftruncate`, so no refused edit lingers in a buffer to reach the file with the next one; when even
that fails, the store takes no more edits until a restart. The bank file is rewritten in the
background after every `compact_every` edits, at most once per `compact_interval_s`, by a child
process that replaces the rows edits changed (temp file, fsync, rename); the log then keeps only the
edits the file lacks, and the store only those in memory (a replica further behind loads the file).
On start the file is loaded and the log replayed. So an acknowledged edit is never lost, and an edit
whose log line a crash cut short was never acknowledged and is dropped whole.

The last `history` edits are remembered, also across rewrites and restarts: an edit sent again with
the same Idempotency-Key gets the first one's outcome instead of a second version, and a row says
which version last changed it.

Files, all named after the bank file B so that they travel with it:
    B        the bank (Parquet); its `version` is the last edit it contains
    B.wal    the log: one JSON line per edit {"version", "action", "uuid", "text", "old_text", "time", "key"?};
             {"version": v, "action": "abort"} cancels edit v (logged, then not applied); an edit with
             "past": true is one the file holds, kept for its key and row version
    B.lock   held (flock) by the one process that owns the bank while it runs
"""

from __future__ import annotations

import bisect
import collections
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
from explicitlm.data import control_markers, find_control
from explicitlm.files import remove_temp_files, write_atomic


class StoreError(RuntimeError):
    """The bank cannot take edits now (its log cannot be written, or another process owns it)."""


class LogStuck(StoreError):
    """A failed append could not be cut off the log: edits stop until a restart."""


class EditRejected(ValueError):
    """An edit that names a missing row (404) or an existing one (409), or that cannot be made as
    sent (422); nothing was logged."""

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
    """The write-ahead log file: complete lines only, appended and fsynced one edit at a time.

    Appends go through an unbuffered descriptor opened for appending; `size` is the length of the
    file's complete, durable records, where a failed or cancelled append is cut back to."""

    ACTIONS = ("replace", "add", "abort")

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.size = 0

    def read(self) -> list[dict[str, Any]]:
        """The logged edits in order, aborted ones left out. A last line cut short by a crash (never
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
            elif entries and entries[-1]["version"] == e["version"] and not entries[-1].get("past"):
                entries.pop()
        return entries

    def open(self) -> None:
        new = not self.path.exists()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        if new:
            fsync_dir(self.path.parent)  # the new file's name is durable before an edit is acknowledged

    def append(self, entry: dict[str, Any]) -> None:
        """Durable when it returns. On failure the file is cut back to its last complete record and
        StoreError is raised; LogStuck when even that failed (the failed record may remain)."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        data = memoryview(line)
        try:
            while data:  # a full disk can take part of a write and refuse the rest
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
        except OSError as e:
            self.cut(self.size, f"the edit log {self.path} cannot be written: {e}")
            raise StoreError(f"the edit log {self.path} cannot be written: {e}") from None
        self.size += len(line)

    def cut(self, size: int, why: str = "") -> None:
        """Cut the file back to `size` bytes (a record that failed, or was cancelled), durably."""
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as e:
            raise LogStuck(
                f"{why + '; ' if why else ''}cutting it back to its last complete record failed: {e}"
            ) from None
        self.size = size

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Replace the log with `entries`, atomically."""
        data = b"".join((json.dumps(e, ensure_ascii=False) + "\n").encode() for e in entries)
        try:
            write_atomic(self.path, lambda tmp: Path(tmp).write_bytes(data))
            fsync_dir(self.path.parent)
        finally:  # appends go to the file now at the path, whichever it is
            self.close()
            self.open()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
    """The authoritative serving bank: file, log, the bank in memory, the edits the file lacks and the
    last `history` edits.

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
        history: int = 10_000,
    ):
        self.path = Path(path)
        self.tokenizer = tokenizer  # used under self.lock only: a fast tokenizer is not safe to share across threads
        self.control = control_markers(tokenizer)
        self.compact_every = compact_every
        # Rewriting a bank of a million rows takes seconds of CPU: under a stream of edits, at most
        # one rewrite per interval (the log holds the edits in between, replayed on a restart).
        self.compact_interval_s = compact_interval_s
        self.history_size = history
        self._last_compact = time.monotonic()
        self._closing = threading.Event()
        self.lock = threading.Lock()
        self._compacting = threading.Lock()
        self.compact_error: str | None = None
        self.broken: str | None = None  # no edit is safe: the bank in memory may not match file and log
        self.read_only: str | None = None  # the log may hold a refused edit: no more edits until a restart
        self.closed = False
        self._lock_fh = _acquire(self.path.with_name(self.path.name + ".lock"), lock_timeout_s)
        try:
            # What a killed rewrite left: the lock is ours, and no rewrite of this store runs yet.
            for written in (self.path, wal_path(self.path)):
                remove_temp_files(written)
            self._recover()
            if self.bank.version > self.file_version or self._log_stale:
                self.compact()  # the file catches up with the replayed log before any replica loads it
        except BaseException:
            self._lock_fh.close()
            raise
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._compactor, name="bank-compactor", daemon=True)
        self._thread.start()

    def _recover(self) -> None:
        """Load the bank file and replay the logged edits it lacks."""
        self.bank = MemoryBank.load(self.path)
        self.file_version = self.bank.version
        # The edits the file lacks, for replicas to catch up: pending[k] is version file_version + 1 + k.
        self.pending: list[dict[str, Any]] = []
        self.history: collections.deque[dict[str, Any]] = collections.deque()
        self.keys: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> its edit, over the history
        self.row_versions: dict[str, int] = {}  # uuid -> the version that last changed it, over the history
        self.log = EditLog(wal_path(self.path))
        # The log must be rewritten from memory: it holds edits the file has (a compaction stopped
        # midway), or a refused edit it could not cut off.
        self._log_stale = False
        for e in self.log.read():
            if e.get("past") or e["version"] <= self.file_version:
                self._log_stale |= not e.get("past")
                self._remember(e)
                continue
            if e["version"] != self.bank.version + 1:
                raise StoreError(
                    f"edit log {self.log.path} jumps from version {self.bank.version} to {e['version']}: "
                    f"it does not continue the bank file {self.path}"
                )
            self._apply(e)
            self.pending.append(e)
            self._remember(e)
        self.log.open()
        self.search_index = TextSearch(self.bank.texts)

    def _apply(self, e: dict[str, Any]) -> None:
        if e["action"] == "add":
            self.bank.add_row(e["uuid"], e["text"], self.tokenizer)
        else:
            self.bank.set_row(self.bank.row_of(e["uuid"]), e["text"], self.tokenizer)
        self.bank.version = e["version"]

    def _remember(self, e: dict[str, Any]) -> None:
        e = {k: v for k, v in e.items() if k != "past"}
        self.history.append(e)
        if e.get("key"):
            self.keys[e["key"]] = e
        self.row_versions[e["uuid"]] = e["version"]
        while len(self.history) > self.history_size:
            old = self.history.popleft()
            if old.get("key") and self.keys.get(old["key"]) is old:
                del self.keys[old["key"]]
            if self.row_versions.get(old["uuid"]) == old["version"]:
                del self.row_versions[old["uuid"]]

    @property
    def version(self) -> int:
        return self.bank.version

    def edit(self, uuid: str, text: str, create: bool, key: str | None = None) -> dict[str, Any]:
        """Replace (create=False) or add (create=True) a row: logged durably, then applied, then
        returned. An edit sent before with the same `key` (an Idempotency-Key) is not made again:
        the first one's outcome comes back, marked "replayed"."""
        action = "add" if create else "replace"
        with self.lock:
            if self.closed or self.broken or self.read_only:
                raise StoreError(self.broken or self.read_only or "the memory bank is closed")
            if key and key in self.keys:
                first = self.keys[key]
                if (first["action"], first["uuid"], first["text"]) != (action, uuid, text):
                    raise EditRejected(
                        422,
                        f"Idempotency-Key {key!r} was sent before with another edit ({first['action']} of row "
                        f"{first['uuid']}, version {first['version']}); use a new key for a new edit",
                    )
                return {**self._response(first), "replayed": True}
            row = self.bank.row_of(uuid)
            if create and row >= 0:
                raise EditRejected(409, f"memory row {uuid} already exists")
            if not create and row < 0:
                raise EditRejected(404, f"no memory row {uuid}")
            marker = find_control(text, self.control)
            if marker:
                raise EditRejected(422, f"text contains the tokenizer's control text {marker!r}")
            entry = {
                "version": self.bank.version + 1,
                "action": action,
                "uuid": uuid,
                "text": text,
                "old_text": None if create else self.bank.texts[row],
                "time": round(time.time(), 6),
                **({"key": key} if key else {}),
            }
            start = self.log.size
            try:
                self.log.append(entry)
            except LogStuck as e:
                self.read_only = f"{e}: edits are off until a restart"
                self._log_stale = True  # closing rewrites the log from memory, without the refused edit
                raise
            try:
                self._apply(entry)
            except Exception:
                self._cancel(entry, start)
                raise
            self.pending.append(entry)
            self._remember(entry)
            self.search_index.touch(self.bank.row_of(uuid))
            due = self.bank.version - self.file_version >= self.compact_every
            response = self._response(entry)
        if due:
            self._wake.set()
        return response

    def _response(self, entry: dict[str, Any]) -> dict[str, Any]:
        n_tokens = len(self.tokenizer(" " + entry["text"].lstrip(), add_special_tokens=False)["input_ids"])
        return {**entry, "tokens": n_tokens, "truncated": n_tokens > self.bank.knowledge_length}

    def _cancel(self, entry: dict[str, Any], start: int) -> None:
        """An edit logged but not applied: cut it off the log (or, failing that, log its cancellation),
        then rebuild the bank from file and log."""
        try:
            try:
                self.log.cut(start)
            except LogStuck:
                self.log.append({"version": entry["version"], "action": "abort"})
            self.log.close()
            self._recover()
        except Exception as e:  # noqa: BLE001 - no edit is safe any more; a restart replays the log
            self.broken = f"the memory bank could not recover from a failed edit: {e}"

    def edits_since(self, version: int) -> list[dict[str, Any]] | None:
        """The edits after `version`, in order; None when they are not kept (the bank file holds
        them: load it again)."""
        with self.lock:
            if version < self.file_version:
                return None
            return self.pending[version - self.file_version :]

    def row(self, uuid: str) -> dict[str, Any] | None:
        """A row with `version`, the edit that last changed it (None when none of the last `history`
        edits did), and `bank_version`, the bank's version as read."""
        bank = self.bank
        i = bank.row_of(uuid)
        if i < 0:
            return None
        return {
            "uuid": uuid,
            "text": bank.texts[i],
            "version": self.row_versions.get(uuid),
            "bank_version": bank.version,
        }

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
        """Bring the bank file up to the bank in memory, then drop the logged edits it now holds
        (the log keeps the history's as "past" records).

        Only the rows that edits changed leave this process (copied under the lock, a few KB per
        edit); a child process rewrites the file with them (`rewrite_rows`)."""
        with self._compacting:
            with self.lock:
                if self.bank.version == self.file_version and not self._log_stale:
                    return
                since = self.file_version
                rows = sorted({self.bank.row_of(e["uuid"]) for e in self.pending})
                changes = self.bank.rows_table(rows) if rows else None
                version = self.bank.version
            if changes is not None:
                changes = changes.add_column(0, "row", pa.array(rows, pa.int64()))
                rewrite_rows(self.path, changes, since, self._lock_fh.fileno())
            with self.lock:
                self.file_version = max(self.file_version, version)
                self.pending = [e for e in self.pending if e["version"] > self.file_version]
                self._log_stale = True  # until the log is rewritten
                past = [{**e, "past": True} for e in self.history if e["version"] <= self.file_version]
                self.log.rewrite(past + self.pending)
                self._log_stale = False

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
        """Bring the file up to date, stop the compactor, release the bank. (A store that went read-only
        rewrites its log here too, from memory: the refused edit it may hold is gone.)"""
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
