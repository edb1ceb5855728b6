import json

import pytest
import torch

from explicitlm.bank import MemoryBank, WordCounts
from explicitlm.errors import UserError
from explicitlm.words import word_id


def _rows(*texts):
    return [{"uuid": f"u{i}", "text": t} for i, t in enumerate(texts)]


def test_bank_build_load_and_refuse(tokenizer, world, tmp_path, tiny_base):
    from explicitlm.bank import load_or_build_bank
    from explicitlm.readers import read_knowledge

    path = tmp_path / "bank.parquet"
    bank = load_or_build_bank(path, world["knowledge"], tokenizer, 16, 10**6)
    rows = list(read_knowledge(world["knowledge"]))
    assert len(bank) == len(rows) and bank.uuids[0] == rows[0]["uuid"] and bank.texts[0] == rows[0]["text"]
    assert bank.token_ids.shape == (len(rows), 16)
    lengths = [len(tokenizer(" " + r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert bank.truncated == sum(n > 16 for n in lengths)
    assert bank.mask.sum(1).tolist() == [min(n, 16) for n in lengths]
    again = MemoryBank.load(path)
    assert torch.equal(again.token_ids, bank.token_ids) and again.uuids == bank.uuids
    assert torch.equal(again.word_ids, bank.word_ids) and again.fingerprint() == bank.fingerprint()
    with pytest.raises(UserError, match="knowledge_length"):
        load_or_build_bank(path, world["knowledge"], tokenizer, 8, 10**6)
    from explicitlm.base import make_base

    other = make_base(
        tmp_path / "other", ["completely different words"] * 20, vocab_size=300, hidden_size=64, num_layers=2
    )
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="another tokenizer"):
        load_or_build_bank(path, world["knowledge"], AutoTokenizer.from_pretrained(other), 16, 10**6)
    rebuilt = load_or_build_bank(path, world["knowledge"], tokenizer, 8, 10**6, recompute=True)
    assert rebuilt.knowledge_length == 8


def test_bank_rows_share_the_prompt_tokens_of_their_words(tokenizer, tmp_path):
    from explicitlm.data import render_user

    bank = MemoryBank.build([{"uuid": "u", "text": "Paris is the capital of France."}], tokenizer, 16)
    row = set(bank.token_ids[0][bank.mask[0]].tolist())
    prompt = set(
        tokenizer(render_user("What is Paris the capital of?", "A:France,B:Spain"), add_special_tokens=False)[
            "input_ids"
        ]
    )
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    # The subject opens the sentence but sits mid-question: both must give the same ids.
    assert set(paris) <= row and set(paris) <= prompt
    assert not set(tokenizer("Paris", add_special_tokens=False)["input_ids"]) <= row
    bank.save(tmp_path / "bank.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "bank.parquet")
    meta = json.loads(table.schema.metadata[b"explicitlm"])
    for fmt in ("explicitlm-memory-bank/1", "explicitlm-memory-bank/2"):
        old = table.drop_columns(["word_ids"]).replace_schema_metadata(
            {"explicitlm": json.dumps(dict(meta, format=fmt))}
        )
        pq.write_table(old, tmp_path / "old.parquet")
        with pytest.raises(UserError, match="database_init_path"):  # one line: how to get a current bank
            MemoryBank.load(tmp_path / "old.parquet")
    # The previous format lacks only the word ids: with its tokenizer at hand it is brought up to date.
    upgraded = MemoryBank.load(tmp_path / "old.parquet", tokenizer)
    assert torch.equal(upgraded.word_ids, bank.word_ids) and upgraded.texts == bank.texts


def test_reference_knowledge_format(tmp_path, tokenizer):
    from explicitlm.readers import read_knowledge

    ref = [
        {
            "target": [
                {
                    "uuid": "u1",
                    "sentence": "Paris is the capital of France.",
                    "subject": "Paris",
                    "predicate": "capital of",
                    "object": "France",
                }
            ]
        }
    ]
    (tmp_path / "sentence_trex_data.json").write_text(json.dumps(ref))
    assert list(read_knowledge(tmp_path / "sentence_trex_data.json")) == [
        {"uuid": "u1", "text": "Paris is the capital of France."}
    ]


def test_word_counts_are_the_banks_and_stay_exact_under_edits(tokenizer):
    """Counts belong to the bank that is loaded: a word no row contains weighs the most (never 0),
    and after edits and additions the counts equal those of a bank built from the final sentences."""
    texts = ["Paris is the capital of France.", "Rome is the capital of Italy.", "Oslo is in Norway."]
    bank = MemoryBank.build(_rows(*texts), tokenizer, 16)
    ids = torch.tensor([word_id(w) for w in ("capital", "Oslo", "Zorblax")])
    assert bank.counts.df_of(ids).tolist() == [2, 1, 0]
    idf = bank.counts.idf(ids)
    assert idf[2] > idf[1] > idf[0] > 0  # unseen words weigh the most
    bank.set_row(0, "Lyon is a city of France.", tokenizer)
    bank.add_row("u3", "Zorblax is the capital of Mars.", tokenizer)
    for _ in range(WordCounts.MERGE_AT + 5):  # past the side table's size: merged into the sorted one
        bank.set_row(2, f"Oslo is in Norway{len(bank.texts)} {bank.version}.", tokenizer)
    fresh = MemoryBank.build(_rows(*bank.texts), tokenizer, 16)
    probe = torch.cat([fresh.word_ids.flatten(), ids])
    assert torch.equal(bank.counts.df_of(probe), fresh.counts.df_of(probe))
    assert bank.counts.n_rows == fresh.counts.n_rows == 4
    assert torch.allclose(bank.counts.idf(probe), fresh.counts.idf(probe))


def test_bank_grows_without_copying_every_row(tokenizer):
    bank = MemoryBank.build(_rows("A first fact."), tokenizer, 16)
    capacities = set()
    for i in range(200):
        bank.add_row(f"n{i}", f"Fact number {i} is new.", tokenizer)
        capacities.add(bank._ids.shape[0])
    assert len(bank) == 201 and bank.texts[-1] == "Fact number 199 is new."
    assert len(capacities) <= 6  # doubling: a handful of reallocations for 200 additions
    assert bank.token_ids.shape == (201, 16) and bank.row_of("n199") == 200


def test_cut_rows_are_reported_with_what_they_lost_and_counted_through_edits(tokenizer, world, tmp_path, capsys):
    from explicitlm.bank import load_or_build_bank
    from explicitlm.readers import read_knowledge

    rows = list(read_knowledge(world["knowledge"]))
    path = tmp_path / "bank.parquet"
    bank = load_or_build_bank(path, world["knowledge"], tokenizer, 8, 10**6)
    spaced = [" " + r["text"].lstrip() for r in rows]
    enc = tokenizer(spaced, add_special_tokens=False, return_offsets_mapping=True)
    lost = [t[o[7][1] :].strip() for t, ids, o in zip(spaced, enc["input_ids"], enc["offset_mapping"]) if len(ids) > 8]
    lost_words = [x for x in lost if any(c.isalnum() for c in x)]
    assert bank.truncated == len(lost) and bank.cuts.lost_words == len(lost_words) > 5
    assert [lost for _, lost in bank.cuts.examples] == lost_words[:5]
    out = capsys.readouterr().out.splitlines()
    assert f"{len(lost_words):,} of them lost their last word" in out[0] and out[0].startswith("memory: built")
    assert len(out) == 6 and all(line.startswith("memory:   cut: ") for line in out[1:])
    assert f"lost {lost_words[0]!r}" in out[1]
    again = MemoryBank.load(path)  # the report travels in the bank file
    assert (again.cuts.rows, again.cuts.lost_words, again.cuts.examples) == (
        len(lost),
        len(lost_words),
        bank.cuts.examples,
    )
    short = next(i for i, ids in enumerate(enc["input_ids"]) if len(ids) <= 8)
    again.set_row(short, "A long sentence that goes on well past eight tokens and ends in Saxony.", tokenizer)
    assert (again.truncated, again.cuts.lost_words) == (len(lost) + 1, len(lost_words) + 1)
    again.set_row(short, "Short again.", tokenizer)
    assert (again.truncated, again.cuts.lost_words) == (len(lost), len(lost_words))


def test_auto_knowledge_length_fits_99_percent_and_is_fixed_in_the_bank_file(tokenizer, world, tmp_path, capsys):
    import math

    from explicitlm.bank import load_or_build_bank
    from explicitlm.readers import read_knowledge

    rows = list(read_knowledge(world["knowledge"]))
    lengths = sorted(len(tokenizer(" " + r["text"].lstrip(), add_special_tokens=False)["input_ids"]) for r in rows)
    p99 = lengths[math.ceil(0.99 * len(lengths)) - 1]
    path = tmp_path / "bank.parquet"
    bank = load_or_build_bank(path, world["knowledge"], tokenizer, "auto", 10**6)
    assert bank.knowledge_length == p99 > 16 and bank.truncated == sum(n > p99 for n in lengths) <= len(rows) // 100
    assert "model.knowledge_length=auto" in capsys.readouterr().out
    assert MemoryBank.load(path).knowledge_length == p99 and MemoryBank.load(path).auto_length
    assert load_or_build_bank(path, world["knowledge"], tokenizer, "auto", 10**6).knowledge_length == p99
    with pytest.raises(UserError, match="knowledge_length"):
        load_or_build_bank(path, world["knowledge"], tokenizer, 16, 10**6)


def test_ensure_bank_resolves_auto_before_anything_reads_the_length(tiny_base, world, tmp_path):
    from explicitlm.pipeline import ensure_bank
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_base, tmp_path / "bank.parquet", world, tmp_path, "model.knowledge_length=auto")
    bank = ensure_bank(cfg)
    assert cfg.model.knowledge_length == bank.knowledge_length and isinstance(cfg.model.knowledge_length, int)
