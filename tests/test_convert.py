import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from explicitlm.convert import _convert_chunk, _split_slots, convert, plan_chunks, read_records

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"question": "What is the capital of France?", "options": "A:Paris,B:Rome, Italy,C:Oslo",
        "correct_answer": "A:Paris", "uuid": "u-good"}


def _item(**changes):
    t = dict(GOOD)
    t.update(changes)
    return {"target": [{k: v for k, v in t.items() if v is not None}]}


BAD_ITEMS = [
    (5, "not_an_object"),
    ({"nothing": 1}, "missing_target"),
    ({"target": []}, "empty_target"),
    (_item(question=None), "missing_question"),
    (_item(question="   "), "empty_question"),
    (_item(options=7), "bad_options_type"),
    (_item(correct_answer=""), "empty_correct_answer"),
    (_item(options="Paris or Rome"), "bad_options"),
    (_item(options="A:Paris", correct_answer="A:Paris"), "too_few_options"),
    (_item(options="A:Paris,A:Rome"), "duplicate_labels"),
    (_item(correct_answer="D:Berlin"), "answer_not_in_options"),
]


def _write_array(path: Path, items, raw_extra: bytes = b"") -> None:
    body = b",\n".join(json.dumps(i, ensure_ascii=False).encode() for i in items)
    path.write_bytes(b"[\n" + body + raw_extra + b"\n]")


def test_every_bad_kind_is_rejected_and_counted(tmp_path, ray_session):
    items = []
    for bad, _ in BAD_ITEMS:
        items += [_item(uuid=f"g{len(items)}"), bad]
    path = tmp_path / "in.json"
    # One more item with invalid UTF-8 bytes inside a string.
    _write_array(path, items, b',\n{"target":[{"question":"caf\xe9","options":"A:a,B:b","correct_answer":"A:a"}]}')
    s = convert(path, tmp_path / "out.jsonl", tmp_path / "rej.jsonl", progress=False)
    expected = {reason for _, reason in BAD_ITEMS} | {"invalid_utf8"}
    assert set(s.rejected) == expected
    assert sum(s.rejected.values()) == len(BAD_ITEMS) + 1
    assert s.converted == len(BAD_ITEMS) and s.items == 2 * len(BAD_ITEMS) + 1
    rejects = [json.loads(l) for l in open(tmp_path / "rej.jsonl")]
    assert [r["position"] for r in rejects] == list(range(1, 2 * len(BAD_ITEMS), 2)) + [2 * len(BAD_ITEMS)]
    assert all(r["reason"] and "raw" in r for r in rejects)
    out = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
    assert [r["uuid"] for r in out] == [f"g{2 * i}" for i in range(len(BAD_ITEMS))]  # input order
    assert out[0]["conversations"][1]["content"] == "A:Paris"
    assert out[0]["options"] == ["Paris", "Rome, Italy", "Oslo"] and out[0]["answer_index"] == 0


def test_truncated_array_keeps_complete_rows_and_exits_nonzero(tmp_path, ray_session):
    items = [_item(uuid=f"u{i}") for i in range(20)]
    full = tmp_path / "full.json"
    _write_array(full, items)
    data = full.read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(data[: len(data) * 2 // 3])
    proc = subprocess.run([sys.executable, str(ROOT / "ray_jobs" / "convert.py"), "--input", str(cut),
                           "--output", str(tmp_path / "out.jsonl"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    n = summary["converted"]
    assert 10 <= n < 20
    assert summary["truncated_at_byte"] is not None and "truncated" in proc.stderr
    assert data[: summary["truncated_at_byte"] + 1].rstrip().endswith(b"},")
    out = [json.loads(l)["uuid"] for l in open(tmp_path / "out.jsonl")]
    assert out == [f"u{i}" for i in range(n)]


def test_multi_target_jsonl_max_samples_and_option_counts(tmp_path, ray_session):
    lines = [{"target": [dict(GOOD, uuid=f"a{i}"), dict(GOOD, uuid=f"b{i}", options="A:x,B:y,C:z,D:w,E:Paris",
                                                     correct_answer="E:Paris")]} for i in range(10)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    s = convert(path, tmp_path / "out.jsonl", max_samples=4, progress=False)
    out = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
    assert s.items == 4 and s.converted == 8  # every target of an item is a question
    assert [r["uuid"] for r in out[:2]] == ["a0", "b0"]
    assert {len(r["options"]) for r in out} == {3, 5} and out[1]["answer_index"] == 4


def test_reruns_are_byte_identical_and_parquet_round_trip(tmp_path, world, ray_session):
    a = convert(world["omcq"], tmp_path / "a.jsonl", progress=False)
    b = convert(world["omcq"], tmp_path / "b.jsonl", progress=False)
    assert a.converted == b.converted > 300
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    convert(world["omcq"], tmp_path / "a.parquet", fmt="parquet", progress=False)
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.num_rows == a.converted
    jsonl, parquet = read_records(tmp_path / "a.jsonl"), read_records(tmp_path / "a.parquet")
    for x, y in zip(jsonl[:50], parquet[:50]):
        assert x["conversations"] == y["conversations"] and x["uuid"] == y["uuid"]
        assert x["options"] == y["options"] and x["answer_index"] == y["answer_index"]


@pytest.mark.parametrize("window", [1, 3, 17, 1 << 20])
def test_scanner_is_window_independent(tmp_path, window):
    items = [{"target": [{"question": 'a "quoted", [bracketed] }', "options": "A:x\\\\,B:y"}]}, 3, "s, ]", {"e": "\\\""}]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(items, indent=2))
    data = path.read_bytes()
    kind, chunks, truncated = plan_chunks(path, window=window, chunk_bytes=window)
    assert kind == "array" and truncated is None
    slots = [x for c in chunks for x in _split_slots(data[c.start : c.end])]
    assert [json.loads(b) for b in slots] == items


@pytest.mark.parametrize("chunk_bytes", [1, 300, 1 << 20])
@pytest.mark.parametrize("kind", ["array", "lines"])
def test_chunks_hold_every_item_once_in_order(tmp_path, chunk_bytes, kind):
    """However the input is cut, each item lands in exactly one range at its own position, and a
    range with a bad item still converts its good ones."""
    raws = [json.dumps(_item(uuid=f"u{i}")).encode() for i in range(12)]
    raws[5] = b'{"target": [nope, {"a": "b"}]}'  # balanced, so it can be cut out, but not JSON
    raws[8] = json.dumps(_item(question="caf\u00e9 \"quoted\", [x]")).encode()
    path = tmp_path / ("in.json" if kind == "array" else "in.jsonl")
    path.write_bytes(b"[\n" + b",\n".join(raws) + b"\n]" if kind == "array" else b"\n".join(raws) + b"\n")
    found, chunks = plan_chunks(path, chunk_bytes=chunk_bytes)[:2]
    assert found == kind and sum(c.count for c in chunks) == 12
    data = path.read_bytes()
    records, bad = [], []
    for c in chunks:
        r, b, _ = _convert_chunk(data[c.start : c.end], kind, c.first, c.count)
        records += r
        bad += b
    assert [r["uuid"] for r in records] == [f"u{i}" if i != 8 else "u-good" for i in range(12) if i != 5]
    assert [b[0] for b in bad] == [5] and bad[0][2].startswith("invalid_json")
    assert records[7]["question"] == 'café "quoted", [x]'
    assert plan_chunks(path, max_items=4, chunk_bytes=chunk_bytes)[1][-1].first + \
        plan_chunks(path, max_items=4, chunk_bytes=chunk_bytes)[1][-1].count == 4


def test_evaluation_reads_raw_omcq_like_the_converter(tmp_path):
    from explicitlm.evaluation import load_questions

    items = [_item(uuid=f"u{i}") for i in range(6)] + [item for item, _ in BAD_ITEMS]
    _write_array(tmp_path / "in.json", items)
    records, rejected = load_questions(tmp_path / "in.json")
    assert [r["uuid"] for r in records] == [f"u{i}" for i in range(6)] and [r["idx"] for r in records] == list(range(6))
    assert sum(rejected.values()) == len(BAD_ITEMS) and rejected["missing_target"] == 1
