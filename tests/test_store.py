"""The serving bank's store: write-ahead log, replay, compaction, ownership, search; in-process, no server."""

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explicitlm import bank_file as bank_file_io
from explicitlm.bank import MemoryBank
from serving.store import BankStore, EditRejected, StoreError, ensure_serving_bank, serving_bank_path, wal_path


@pytest.fixture
def bank_file(tmp_path, bank_path):
    path = tmp_path / "serving" / "bank.parquet"
    path.parent.mkdir()
    shutil.copy(bank_path, path)
    return path


def _log_lines(path, past: bool = False):
    """The log's edit records (the edits the bank file lacks), or with past=True the history records
    it keeps of edits the file holds."""
    lines = [json.loads(x) for x in wal_path(path).read_text().splitlines()]
    return [e for e in lines if bool(e.get("past")) == past]


def test_edits_are_logged_before_applied_replayed_and_compacted(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer, compact_every=1000)
    v0, uuids = store.version, store.bank.uuids[:5]
    for i, u in enumerate(uuids):
        e = store.edit(u, f"Edited fact number {i}.", create=False)
        assert e["version"] == v0 + i + 1 and e["old_text"] and e["tokens"] > 0 and not e["truncated"]
    added = store.edit("new-row-1", "The capital of Atlantis is Poseidonia.", create=True)
    assert added["action"] == "add" and added["old_text"] is None
    # Every edit is in the log; the file still holds the bank as it was.
    assert [e["version"] for e in _log_lines(bank_file)] == list(range(v0 + 1, v0 + 7))
    assert MemoryBank.load(bank_file).version == v0
    assert [e["uuid"] for e in store.edits_since(v0 + 4)] == [uuids[4], "new-row-1"]
    # A crash now (no close): a new store replays the log, and writes the file up to date at once.
    store.log.close()
    store._lock_fh.close()
    again = BankStore(bank_file, tokenizer)
    assert again.version == v0 + 6 and again.row("new-row-1")["text"] == "The capital of Atlantis is Poseidonia."
    assert [again.row(u)["text"] for u in uuids] == [f"Edited fact number {i}." for i in range(5)]
    assert MemoryBank.load(bank_file).version == v0 + 6 and _log_lines(bank_file) == []
    again.close()


def test_compaction_every_n_edits_keeps_only_the_edits_the_file_lacks(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer, compact_every=4)
    v0 = store.version

    def edit(rows, then_saved: int | None = None) -> None:
        for i in rows:
            store.edit(store.bank.uuids[i], f"Compacted edit {i}.", create=False)
        for _ in range(200 if then_saved else 0):  # the background rewrite the fourth unsaved edit starts
            if store.file_version >= then_saved:
                break
            store._thread.join(0.05)

    # In steps, so each rewrite takes exactly the edits it was started for, however long it runs.
    edit(range(4), then_saved=v0 + 4)
    edit(range(4, 8), then_saved=v0 + 8)
    edit(range(8, 10))  # two unsaved edits: no rewrite
    with store._compacting:  # between two compactions
        saved = MemoryBank.load(bank_file)
        logged = [e["version"] for e in _log_lines(bank_file)]
    assert saved.version == store.file_version >= v0 + 8
    assert logged == list(range(saved.version + 1, v0 + 11))
    store.close()  # closing writes the rest
    assert MemoryBank.load(bank_file).version == v0 + 10 and _log_lines(bank_file) == []
    assert MemoryBank.load(bank_file).texts[9] == "Compacted edit 9."


def test_child_rewrite_of_changed_rows_equals_a_whole_save(bank_file, tokenizer, tmp_path):
    store = BankStore(bank_file, tokenizer, compact_every=1000)
    for i in (0, 7, 3, 7):
        store.edit(store.bank.uuids[i], f"Rewritten fact {i}, twice for seven.", create=False)
    for k in range(3):
        store.edit(f"added-{k}", f"An added fact about place number {k}.", create=True)
    whole = tmp_path / "whole.parquet"
    store.bank.save(whole)
    store.compact()  # the child patches 3 rows and appends 3
    patched, expected = pq.read_table(bank_file), pq.read_table(whole)
    assert patched.num_rows == expected.num_rows == len(store.bank)
    assert patched.equals(expected) and patched.schema.metadata == expected.schema.metadata
    assert MemoryBank.load(bank_file).version == store.version == store.file_version
    store.close()


def test_failed_rewrite_keeps_every_edit_in_the_log(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer, compact_every=1000)
    store.edit(store.bank.uuids[0], "Kept in the log while the file cannot be rewritten.", create=False)
    good = bank_file.read_bytes()
    bank_file.write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="cannot read memory bank"):
        store.compact()
    assert store.file_version < store.version and [e["version"] for e in _log_lines(bank_file)] == [store.version]
    bank_file.write_bytes(good)
    store.close()
    assert MemoryBank.load(bank_file).texts[0] == "Kept in the log while the file cannot be rewritten."


def test_patch_refuses_rows_it_cannot_place_and_a_file_it_was_not_made_for(bank_file, tokenizer):
    bank = MemoryBank.load(bank_file)
    v, n = bank.version, len(bank)
    for row, match in ((n + 1, "leave a gap"), (-1, "negative")):
        changes = bank.rows_table([0]).add_column(0, "row", pa.array([row], pa.int64()))
        with pytest.raises(ValueError, match=match):
            bank_file_io.patch(bank_file, changes, since=v)
    bank.version = v + 5  # changes of the edits v+3..v+5, for a file that lacks v+1..v+2
    changes = bank.rows_table([0]).add_column(0, "row", pa.array([0], pa.int64()))
    with pytest.raises(ValueError, match="not the one they were made for"):
        bank_file_io.patch(bank_file, changes, since=v + 2)
    assert bank_file_io.patch(bank_file, changes, since=v) == n  # a file that holds the version they start from
    assert MemoryBank.load(bank_file).version == v + 5


def test_a_restart_removes_temp_files_a_killed_rewrite_left(bank_file, tokenizer):
    stale = [bank_file.parent / f".{bank_file.name}.k3x_9.tmp", bank_file.parent / f".{bank_file.name}.wal.q1.tmp"]
    other = bank_file.parent / f".{bank_file.name}.index.safetensors.z2.tmp"  # a model's cache write: not ours
    for f in (*stale, other):
        f.write_bytes(b"partial")
    BankStore(bank_file, tokenizer).close()
    assert not any(f.exists() for f in stale) and other.exists()


def test_cut_short_log_line_is_dropped_and_damage_is_refused(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer)
    v0 = store.version
    store.edit(store.bank.uuids[0], "Kept edit.", create=False)
    store.log.close()
    store._lock_fh.close()
    whole = wal_path(bank_file).read_bytes()
    torn = json.dumps({"version": v0 + 2, "action": "replace", "uuid": store.bank.uuids[1], "text": "Torn"})
    wal_path(bank_file).write_bytes(whole + torn[:30].encode())  # a crash in the middle of a write
    again = BankStore(bank_file, tokenizer)
    assert again.version == v0 + 1 and again.row(store.bank.uuids[1])["text"] != "Torn"
    assert b"Torn" not in wal_path(bank_file).read_bytes()  # the torn piece is gone
    again.edit(again.bank.uuids[2], "After the tear.", create=False)
    again.log.close()
    again._lock_fh.close()
    lines = wal_path(bank_file).read_bytes().split(b"\n")
    wal_path(bank_file).write_bytes(b"\n".join([b"{not json"] + lines))  # damage before the last line
    with pytest.raises(StoreError, match="line 1"):
        BankStore(bank_file, tokenizer)


def test_a_log_that_cannot_be_cut_back_stops_edits_and_loses_the_refused_one(bank_file, tokenizer, monkeypatch):
    """A failed append whose record cannot be cut off the log again (ftruncate fails too): the store
    takes no more edits, and closing it rewrites the log from memory, so the refused edit never
    comes back."""
    store = BankStore(bank_file, tokenizer)
    u, before, v0 = store.bank.uuids[0], store.row(store.bank.uuids[0])["text"], store.version
    store.edit(store.bank.uuids[1], "Acknowledged before the disk failed.", create=False)

    def failing(errno: int, what: str):
        def fail(*args):
            raise OSError(errno, what)

        return fail

    monkeypatch.setattr(os, "fsync", failing(28, "No space left on device"))
    monkeypatch.setattr(os, "ftruncate", failing(5, "Input/output error"))
    with pytest.raises(StoreError, match="No space left.*cutting it back .* failed: .*Input/output error"):
        store.edit(u, "Never acknowledged.", create=False)
    monkeypatch.undo()
    assert b"Never acknowledged." in wal_path(bank_file).read_bytes()  # written, not cut back
    assert store.row(u)["text"] == before and store.version == v0 + 1 and store.read_only
    with pytest.raises(StoreError, match="edits are off until a restart"):
        store.edit(u, "Refused while read-only.", create=False)
    store.close()
    assert b"Never acknowledged." not in wal_path(bank_file).read_bytes()
    again = BankStore(bank_file, tokenizer)
    assert again.version == v0 + 1 and again.row(u)["text"] == before
    assert again.edit(u, "Acknowledged after the restart.", create=False)["version"] == v0 + 2
    again.close()


def test_edit_that_fails_to_apply_is_taken_out_of_the_log(bank_file, tokenizer, monkeypatch):
    store = BankStore(bank_file, tokenizer)
    u, before, v0 = store.bank.uuids[3], store.row(store.bank.uuids[3])["text"], store.version

    def broken(*args, **kwargs):
        raise MemoryError("no room for the row")

    monkeypatch.setattr(store.bank, "set_row", broken)
    with pytest.raises(MemoryError):
        store.edit(u, "Logged, then failed.", create=False)
    assert store.row(u)["text"] == before and store.version == v0  # the bank was rebuilt from file and log
    assert wal_path(bank_file).read_bytes() == b""  # cut off again
    # When the log cannot be cut back, the edit is cancelled by an abort record instead.
    monkeypatch.setattr(store.bank, "set_row", broken)
    with monkeypatch.context() as m:

        def no_truncate(*args):
            raise OSError(5, "Input/output error")

        m.setattr(os, "ftruncate", no_truncate)
        with pytest.raises(MemoryError):
            store.edit(u, "Logged, then failed again.", create=False)
    assert [e["action"] for e in _log_lines(bank_file)] == ["replace", "abort"] and not store.broken
    assert store.edit(u, "Next edit.", create=False)["version"] == v0 + 1
    store.close()
    reopened = BankStore(bank_file, tokenizer)
    assert reopened.row(u)["text"] == "Next edit." and reopened.version == v0 + 1
    reopened.close()


def test_one_owner_per_bank(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer)
    with pytest.raises(StoreError, match=r"served by another process \(pid \d+"):
        BankStore(bank_file, tokenizer, lock_timeout_s=0.3)
    store.close()
    BankStore(bank_file, tokenizer, lock_timeout_s=0.3).close()  # released on close


def test_a_rewrite_that_outlived_its_server_is_waited_for(bank_file, tokenizer):
    lock = bank_file.with_name(bank_file.name + ".lock")
    server = subprocess.Popen(["true"])  # the server that started the rewrite, exited
    server.wait()
    lock.write_text(f"pid {server.pid} on {os.uname().nodename}\n")
    hold = "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); time.sleep(2)"
    rewrite = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE)
    rewrite.stdout.readline()
    t0 = time.monotonic()
    store = BankStore(bank_file, tokenizer, lock_timeout_s=0.5)  # past its timeout: the holder's server is gone
    assert time.monotonic() - t0 > 1.0 and rewrite.wait() == 0
    store.close()


def test_serving_bank_is_a_copy_with_its_sidecars(tmp_path, bank_path):
    training = tmp_path / "run" / "knowledge_cache.parquet"
    training.parent.mkdir()
    shutil.copy(bank_path, training)
    (tmp_path / "run" / "knowledge_cache.parquet.index.safetensors").write_bytes(b"cached index")
    (tmp_path / "run" / "other.txt").write_text("not the bank's")
    dest = serving_bank_path("", str(tmp_path / "run" / "sft_latest"), str(training))
    assert dest == tmp_path / "run" / "sft_latest" / "serving" / "knowledge_cache.parquet"
    before = training.read_bytes()
    assert ensure_serving_bank(training, dest) and not ensure_serving_bank(training, dest)
    assert dest.read_bytes() == before
    assert (dest.parent / "knowledge_cache.parquet.index.safetensors").read_bytes() == b"cached index"
    assert not (dest.parent / "other.txt").exists()
    renamed = tmp_path / "elsewhere" / "mine.parquet"
    ensure_serving_bank(training, renamed)
    assert (renamed.parent / "mine.parquet.index.safetensors").exists()
    with pytest.raises(ValueError, match="training bank"):
        ensure_serving_bank(training, training)
    assert training.read_bytes() == before


def test_search_is_bounded_and_sees_edits(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer)
    word = store.bank.texts[0].split()[-1].strip(".")
    expected = [i for i, t in enumerate(store.bank.texts) if word.lower() in t.lower()]
    found = store.search(word.upper(), 100, 5.0)
    assert found["complete"] and [store.bank.row_of(r["uuid"]) for r in found["rows"]] == expected[:100]
    assert len(store.search(word, 1, 5.0)["rows"]) == 1
    store.edit(store.bank.uuids[-1], "Zyxwvut is a word no other row has.", create=False)
    assert [r["uuid"] for r in store.search("zyxWVUT", 10, 5.0)["rows"]] == [store.bank.uuids[-1]]
    assert store.search("e", 100, 0.0)["complete"] is False  # out of time before the first block
    store.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, to be filled for real (root only; skipped where mounting is refused)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path, leave: int) -> None:
    """Fill the filesystem of `path` with one file, then give back `leave` bytes of it."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == 28  # ENOSPC
    os.truncate(path, max(os.path.getsize(path) - leave, 0))


def _crash(store: BankStore) -> None:
    """What a kill -9 leaves: descriptors closed, nothing flushed, no rewrite."""
    store._closing.set()
    store.log.close()
    store._lock_fh.close()


def test_a_full_disk_refuses_edits_and_a_restart_applies_none_of_them(small_disk, bank_path, tokenizer):
    """The disk fills in the middle of a stream of edits: the ones it refuses are 503s that change
    nothing, then and after a crash and a restart, and the edits acknowledged around them all stay."""
    bank = small_disk / "bank.parquet"
    shutil.copy(bank_path, bank)
    store = BankStore(bank, tokenizer)
    v0, uuids = store.version, store.bank.uuids[:60]
    filler = small_disk / "filler"
    _fill(filler, leave=8192)  # room for a few edits
    acked, refused = {}, {}
    for i, u in enumerate(uuids[:40]):
        text = f"Edit {i} while the disk fills: " + "a long sentence about the place " * 8
        try:
            store.edit(u, text, create=False)
            acked[u] = text
        except StoreError as e:
            assert "No space left" in str(e)
            refused[u] = text
    assert acked and len(refused) > 5, (len(acked), len(refused))
    assert store.version == v0 + len(acked)
    filler.unlink()  # space again: the next edits land, and must not carry a refused one with them
    for u in uuids[40:45]:
        acked[u] = store.edit(u, f"After the disk had room again: {u}.", create=False)["text"]
    _crash(store)
    again = BankStore(bank, tokenizer)  # on a log that carried a refused edit: "jumps from version"
    try:
        assert again.version == v0 + len(acked)
        for u, text in acked.items():
            assert again.row(u)["text"] == text
        for u, text in refused.items():
            assert again.row(u)["text"] != text
    finally:
        again.close()


def test_recovering_from_a_failed_edit_leaves_a_running_rewrite_s_file_alone(bank_file, tokenizer, monkeypatch):
    store = BankStore(bank_file, tokenizer)
    running = bank_file.parent / f".{bank_file.name}.r8w2_z.tmp"  # what a rewrite in flight is writing
    running.write_bytes(b"half a bank file")

    def broken(*args, **kwargs):
        raise MemoryError("no room for the row")

    monkeypatch.setattr(store.bank, "set_row", broken)
    with pytest.raises(MemoryError):
        store.edit(store.bank.uuids[0], "Fails to apply.", create=False)
    assert running.read_bytes() == b"half a bank file"
    running.unlink()
    store.close()


def test_an_idempotency_key_gives_the_first_outcome_across_rewrites_and_restarts(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer, compact_every=1000, history=4)
    u, v0 = store.bank.uuids[5], store.version
    first = store.edit(u, "Edited once.", create=False, key="k-1")
    again = store.edit(u, "Edited once.", create=False, key="k-1")
    assert again.pop("replayed") and again == first and store.version == v0 + 1
    with pytest.raises(EditRejected, match="sent before with another edit") as e:
        store.edit(store.bank.uuids[6], "Another edit.", create=False, key="k-1")
    assert e.value.status == 422
    added = store.edit("key-row", "An added row.", create=True, key="k-2")
    assert store.edit("key-row", "An added row.", create=True, key="k-2")["version"] == added["version"]
    store.compact()  # the file holds them now; the log keeps them as history
    assert _log_lines(bank_file) == [] and [e["key"] for e in _log_lines(bank_file, past=True)] == ["k-1", "k-2"]
    _crash(store)
    store = BankStore(bank_file, tokenizer, history=4)
    replayed = store.edit(u, "Edited once.", create=False, key="k-1")
    assert replayed["version"] == v0 + 1 and replayed["replayed"] and store.version == v0 + 2
    assert store.row(u)["version"] == v0 + 1 and store.row(store.bank.uuids[7])["version"] is None
    for i in range(4):  # four more edits: the history of four forgets k-1 and k-2
        store.edit(store.bank.uuids[10 + i], f"Later edit {i}.", create=False)
    assert "replayed" not in store.edit(u, "Edited once.", create=False, key="k-1")
    assert store.row(u)["version"] == store.version
    store.close()


def test_the_store_keeps_only_the_edits_the_file_lacks(bank_file, tokenizer):
    store = BankStore(bank_file, tokenizer, compact_every=1000, history=3)
    v0 = store.version
    for i in range(10):
        store.edit(store.bank.uuids[i], f"Bounded edit {i}.", create=False)
    assert [e["version"] for e in store.edits_since(v0 + 8)] == [v0 + 9, v0 + 10]
    store.compact()
    store.edit(store.bank.uuids[11], "One the file lacks.", create=False)
    assert len(store.pending) == 1 and len(store.history) == 3
    assert store.edits_since(v0 + 5) is None  # further behind than the file: load it again
    assert [e["version"] for e in store.edits_since(v0 + 10)] == [v0 + 11] and store.edits_since(v0 + 11) == []
    store.close()
