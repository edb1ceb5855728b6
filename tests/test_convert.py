import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from explicitlm.convert import convert
from explicitlm.omcq_cut import plan_chunks
from explicitlm.omcq_rows import _convert_chunk, _split_slots
from explicitlm.readers import read_records

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "question": "What is the capital of France?",
    "options": "A:Paris,B:Rome, Italy,C:Oslo",
    "correct_answer": "A:Paris",
    "uuid": "u-good",
}


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
    rejects = [json.loads(line) for line in open(tmp_path / "rej.jsonl")]
    assert [r["position"] for r in rejects] == list(range(1, 2 * len(BAD_ITEMS), 2)) + [2 * len(BAD_ITEMS)]
    assert all(r["reason"] and "raw" in r for r in rejects)
    out = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
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
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs" / "convert.py"),
            "--input",
            str(cut),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    n = summary["converted"]
    assert 10 <= n < 20
    assert summary["truncated_at_byte"] is not None and "truncated" in proc.stderr
    assert data[: summary["truncated_at_byte"] + 1].rstrip().endswith(b"},")
    out = [json.loads(line)["uuid"] for line in open(tmp_path / "out.jsonl")]
    assert out == [f"u{i}" for i in range(n)]


def test_multi_target_jsonl_max_samples_and_option_counts(tmp_path, ray_session):
    lines = [
        {
            "target": [
                dict(GOOD, uuid=f"a{i}"),
                dict(GOOD, uuid=f"b{i}", options="A:x,B:y,C:z,D:w,E:Paris", correct_answer="E:Paris"),
            ]
        }
        for i in range(10)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    s = convert(path, tmp_path / "out.jsonl", max_samples=4, progress=False)
    out = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
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
    items = [{"target": [{"question": 'a "quoted", [bracketed] }', "options": "A:x\\\\,B:y"}]}, 3, "s, ]", {"e": '\\"'}]
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
    raws[8] = json.dumps(_item(question='caf\u00e9 "quoted", [x]')).encode()
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
    assert (
        plan_chunks(path, max_items=4, chunk_bytes=chunk_bytes)[1][-1].first
        + plan_chunks(path, max_items=4, chunk_bytes=chunk_bytes)[1][-1].count
        == 4
    )


def test_evaluation_reads_raw_omcq_like_the_converter(tmp_path):
    from explicitlm.readers import load_questions

    items = [_item(uuid=f"u{i}") for i in range(6)] + [item for item, _ in BAD_ITEMS]
    _write_array(tmp_path / "in.json", items)
    records, rejected = load_questions(tmp_path / "in.json")
    assert [r["uuid"] for r in records] == [f"u{i}" for i in range(6)] and [r["idx"] for r in records] == list(range(6))
    assert sum(rejected.values()) == len(BAD_ITEMS) and rejected["missing_target"] == 1


# ---------------------------------------------------------------- the columnar path


def _tricky_items(n: int, seed: int = 0) -> list:
    """Good items with everything that makes strings hard: quotes, backslashes, control
    whitespace, CJK, emoji, edge whitespace str.strip() removes, commas inside options, 3-5 options."""
    import random

    rng = random.Random(seed)
    words = [
        "Paris, Texas",
        'say "hi"',
        "back\\slash",
        "tab\there",
        "line\nbreak",
        "东京",
        "emoji 🎉",
        "\u3000ideographic\u3000",
        "nbsp\u00a0",
        "plain",
        "a,b:c",
        "x: y",
    ]
    items = []
    for i in range(n):
        k = rng.randint(3, 5)
        opts = rng.sample(words, k)
        pad = rng.choice(["", " ", "\t", "\u2003", "\n"])
        target = {
            "question": f"{pad}Question {i} about {rng.choice(words)}?{pad}",
            "options": pad + ",".join(f"{'ABCDE'[j]}:{o}" for j, o in enumerate(opts)),
            "correct_answer": f"A:{pad}{opts[0]}",
        }
        choice = rng.randrange(4)
        if choice == 0:
            target["uuid"] = f"u{i}"
        elif choice == 1:
            target["uuid"] = None
        elif choice == 2:
            target["subject"], target["predicate"] = rng.choice(words), "capital of"
        items.append({"target": [target] * rng.randint(1, 2), "meta": i})
    return items


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_columnar_path_gives_the_row_by_row_records(ensure_ascii):
    import orjson
    import pyarrow as pa

    from explicitlm.omcq_rows import RECORD_SCHEMA, _arrow_records, jsonl_bytes

    items = _tricky_items(300)
    for kind, sep in (("array", b",\n "), ("lines", b"\n")):
        data = sep.join(json.dumps(i, ensure_ascii=ensure_ascii).encode() for i in items)
        records, bad, n = _convert_chunk(data, kind, 0, len(items))
        assert not bad and n == len(items) and len(records) > len(items)  # every target is a question
        table = _arrow_records(data, kind, len(items))
        assert table is not None
        assert table.equals(pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
        assert jsonl_bytes(table) == b"".join(orjson.dumps(r) + b"\n" for r in records)


def test_columnar_path_declines_every_bad_row():
    from explicitlm.omcq_rows import _arrow_records

    good = json.dumps(_item()).encode()
    for bad, reason in BAD_ITEMS:
        data = good + b"," + json.dumps(bad).encode()
        assert _arrow_records(data, "array", 2) is None, reason
    for raw in (
        b'{"target":[{"question":"caf\xe9","options":"A:a,B:b","correct_answer":"A:a"}]}',  # invalid UTF-8
        b'{"target":[{"question":"q","question":"r","options":"A:a,B:b","correct_answer":"A:a"}]}',  # a key twice
        b'{"target":[{"question":"q","options":"A:a,B:b","correct_answer":"A:a","uuid":7}]}',
    ):  # a number uuid
        assert _arrow_records(good + b"," + raw, "array", 2) is None
    assert _arrow_records(good + b"\n\n" + good, "lines", 3) is None  # a blank line counts as a position
    assert _arrow_records(good + b",", "array", 2) is None


def test_arrow_strips_exactly_what_python_strips():
    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    got = pc.utf8_trim_whitespace(pa.array([c + "x" + c for c in chars])).to_pylist()
    assert [c for c, g in zip(chars, got) if (c + "x" + c).strip() != g] == []


def test_jsonl_bytes_writes_what_orjson_writes():
    import orjson
    import pyarrow as pa

    from explicitlm.omcq_rows import RECORD_SCHEMA, jsonl_bytes

    rows = [
        {
            "conversations": [
                {"role": "user", "content": f"q{i}\n{s}\n请选择正确答案。"},
                {"role": "assistant", "content": f"A:{s}"},
            ],
            "uuid": s,
            "question": s,
            "options": [s, "b"],
            "answer_index": 0,
            "subject": "",
            "predicate": s,
        }
        for i, s in enumerate(["plain", 'quote " and \\ back', "bell \x07 and \x1f", "\b\f\r\t", "东京 🎉", "\x7f del"])
    ]
    for k in range(1, len(rows) + 1):
        table = pa.Table.from_pylist(rows[:k], schema=RECORD_SCHEMA)
        assert jsonl_bytes(table) == b"".join(orjson.dumps(r) + b"\n" for r in rows[:k])
    assert jsonl_bytes(RECORD_SCHEMA.empty_table()) == b""
