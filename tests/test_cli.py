"""The installed commands: entry points, per-program --help, one-line errors (exit 2) for expected
mistakes, --debug tracebacks, weights folders that survive a copy, and explicitlm-ask."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from explicitlm.cli import ask, convert, evaluate, sft, user_error
from explicitlm.errors import UserError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base, bank_path, world):
    """A run folder as explicitlm-sft leaves it: base/, the bank, and a weights folder in sft_latest/
    (saved by the same code as training's, from untrained memory modules: retrieval already finds a
    question's own row, and nothing here needs trained fusion)."""
    from explicitlm.adapter import save_adapter
    from explicitlm.loading import build_model

    run = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(tiny_base, run / "base")
    shutil.copy(bank_path, run / "knowledge_cache.parquet")
    cfg = tiny_config(run / "base", run / "knowledge_cache.parquet", world, run)
    _, model = build_model(cfg)
    provenance = {
        "backbone_path": cfg.model.qwen3_model_path,
        "bank_path": cfg.model.cache_path,
        "database_init_path": cfg.model.database_init_path,
    }
    save_adapter(model, run / "sft_latest", provenance)
    return run


def _one_line_error(capsys, code: int, program: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{program}: error: "), err
    return err


# ---- entry points and --help


def test_every_entry_point_resolves_to_a_main():
    import importlib

    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.M))
    assert set(scripts) == {
        "explicitlm-sft",
        "explicitlm-convert",
        "explicitlm-evaluate",
        "explicitlm-serve",
        "explicitlm-ask",
    }
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    # The ray_jobs scripts are the same programs, without sys.path edits.
    for job in ("sft", "convert", "evaluate"):
        text = (ROOT / "ray_jobs" / f"{job}.py").read_text()
        assert f"from explicitlm.cli.{job} import main" in text and "sys.path" not in text


@pytest.mark.parametrize(
    "module, shown, required",
    [
        (sft, ["training.learning_rate=0.002", "dataset.sft_dataset_path", "eval.memory_checks"], None),
        (evaluate, ["eval.weights", "model.top_k=16"], "eval.data"),
    ],
)
def test_help_lists_the_programs_keys_with_defaults(capsys, module, shown, required):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {module.PROGRAM.name} ")
    for key in shown:
        assert f"  {key}" in out, key
    assert ("required:" in out) == bool(required)
    if required:
        assert out.index("required:") < out.index(f"  {required}") < out.index("eval:")
    assert "serve.port" not in out  # keys the program does not read


def test_serve_help_is_the_servers(capsys):
    from explicitlm.cli import serve

    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "required:" in out and "  serve.weights" in out and "  serve.max_options=26" in out
    assert "\n  training." not in out


# ---- one-line errors


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["training.lr=1"], "unknown config key 'training.lr' (did you mean 'training.learning_rate'?)"),
        (["training.trainable_modules=gate"], "'gate' is not a memory module (did you mean 'memory_gate'?)"),
        (["model.qwen3_model_path=/no/such/model"], "model folder /no/such/model does not exist"),
        (
            ["dataset.sft_dataset_path=/no/such/train.jsonl"],
            "dataset.sft_dataset_path: no such file: /no/such/train.jsonl",
        ),
        (["dataset.pretrained_sft_model_path=/no/such/w"], "weights folder /no/such/w does not exist"),
        (
            ["model.database_init_path=/no/knowledge.jsonl"],
            "model.database_init_path=/no/knowledge.jsonl is not a file",
        ),
        (["--bogus"], "unknown option '--bogus'"),
    ],
)
def test_sft_mistakes_before_any_work_are_one_line(capsys, tmp_path, argv, expected):
    code = sft.main([*argv, f"training.output_dir={tmp_path / 'never'}"])
    assert expected in _one_line_error(capsys, code, "explicitlm-sft")
    assert not (tmp_path / "never").exists()


def test_sft_truncated_or_reference_records_and_too_few_questions(
    capsys, tmp_path, tiny_base, bank_path, world, records, ray_session
):
    common = [
        f"model.qwen3_model_path={tiny_base}",
        f"model.cache_path={bank_path}",
        f"model.database_init_path={world['knowledge']}",
        f"training.output_dir={tmp_path / 'out'}",
        "logging.swanlab_mode=disabled",
    ]
    cut = tmp_path / "cut.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records[:20])
    cut.write_text(text[: len(text) - 40])  # the last record ends mid-line
    code = sft.main([*common, f"dataset.sft_dataset_path={cut}"])
    assert f"{cut} line 20 is not JSON" in _one_line_error(capsys, code, "explicitlm-sft")

    reference = tmp_path / "reference.jsonl"  # the reference converter's records: no parsed options
    reference.write_text("".join(json.dumps({"conversations": r["conversations"]}) + "\n" for r in records[:20]))
    code = sft.main([*common, f"dataset.sft_dataset_path={reference}"])
    assert f"{reference} line 1 lacks options, answer_index" in _one_line_error(capsys, code, "explicitlm-sft")

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    code = sft.main([*common, f"dataset.sft_dataset_path={few}", "training.batch_size=4"])
    err = _one_line_error(capsys, code, "explicitlm-sft")
    assert "5 training questions are too few for one step of training.batch_size=4" in err


def test_sft_takes_raw_omcq_by_converting_it(tmp_path, world, ray_session):
    from explicitlm.pipeline import to_parquet_records
    from explicitlm.readers import load_questions, read_records

    converted = read_records(to_parquet_records(str(world["omcq"]), tmp_path))
    expected, _ = load_questions(world["omcq"])
    assert len(converted) == len(expected) > 300
    assert [r["uuid"] for r in converted] == [r["uuid"] for r in expected]
    assert [r["answer_index"] for r in converted] == [r["answer_index"] for r in expected]
    bad = tmp_path / "bad.json"  # knowledge rows are not questions: every row rejected
    bad.write_text(json.dumps([{"uuid": "u1", "text": "Paris is in France."}, {"uuid": "u2", "text": "x"}]))
    with pytest.raises(UserError, match=r"has no usable question \(all 2 items rejected: missing_target 2\)"):
        to_parquet_records(str(bad), tmp_path)


def test_evaluate_mistakes_are_one_line(capsys, tmp_path, run_dir, world):
    weights = run_dir / "sft_latest"
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    cut = tmp_path / "cut.json"
    data = Path(world["omcq"]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cut_parquet = tmp_path / "cut.parquet"
    parquet = (run_dir / "knowledge_cache.parquet").read_bytes()
    cut_parquet.write_bytes(parquet[: len(parquet) // 2])
    cases = [
        (
            [f"eval.weights={weights}", f"eval.data={cut_parquet}"],
            f"cannot read {cut_parquet} as Parquet (is it complete?)",
        ),
        ([f"eval.weights={weights}"], "eval.data is required: Questions to score, as OMCQ"),
        ([f"eval.weights={weights}", "eval.data=/no/such.json"], "no such file: /no/such.json"),
        ([f"eval.weights={weights}", f"eval.data={empty}"], f"{empty} is empty"),
        ([f"eval.weights={weights}", f"eval.data={cut}"], f"{cut} ends mid-array: its last complete item ends at byte"),
        (
            [f"eval.weights={weights}", f"eval.data={world['knowledge']}"],
            "has no usable question (all 400 rows rejected: missing_target 400)",
        ),
        ([f"eval.weights={tmp_path / 'nope'}", f"eval.data={world['omcq']}"], "weights folder"),
        ([f"eval.weights={run_dir}", f"eval.data={world['omcq']}"], f"did you mean {run_dir / 'sft_latest'}?"),
        (
            [f"eval.weights={weights}", f"eval.data={world['omcq']}", "model.qwen3_model_path=/no/model"],
            "model folder /no/model does not exist",
        ),
    ]
    for argv, expected in cases:
        code = evaluate.main(argv)
        assert expected in _one_line_error(capsys, code, "explicitlm-evaluate"), argv


def test_debug_shows_the_traceback(tmp_path, world):
    with pytest.raises(UserError, match="weights folder"):
        evaluate.main(["--debug", f"eval.weights={tmp_path / 'nope'}", f"eval.data={world['omcq']}"])


def test_a_user_error_inside_a_training_worker_is_found():
    import ray.train

    failure = ray.train.WorkerGroupError("rank 0 failed", {0: UserError("the real problem")})
    assert str(user_error(failure)) == "the real problem"
    assert user_error(ValueError("a bug")) is None


def test_convert_mistakes_are_one_line(capsys, tmp_path, world, records):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    done = tmp_path / "done.jsonl"
    done.write_text(json.dumps(records[0]) + "\n")
    cases = [
        (["--input", "/no/in.json", "--output", str(tmp_path / "o.jsonl")], "no such input file: /no/in.json"),
        (["--input", str(empty), "--output", str(tmp_path / "o.jsonl")], "is empty: nothing to convert"),
        (["--input", str(done), "--output", str(tmp_path / "o.jsonl")], "holds converted records already"),
        (
            ["--input", str(world["omcq"]), "--output", str(tmp_path / "x.jsonl"), "--format", "parquet"],
            f"--format parquet but --output {tmp_path / 'x.jsonl'} names a jsonl file: write to {tmp_path / 'x.parquet'}",
        ),
        (["--input", str(world["omcq"])], "the following arguments are required: --output"),
    ]
    for argv, expected in cases:
        code = convert.main(argv)
        assert expected in _one_line_error(capsys, code, "explicitlm-convert"), argv
    assert not (tmp_path / "x.jsonl").exists()


def test_convert_with_no_usable_row_exits_2(capsys, tmp_path, world, ray_session):
    for name, body, expected in [
        ("knowledge.jsonl", Path(world["knowledge"]).read_text(), "all 400 items rejected (missing_target: 400)"),
        ("empty_array.json", "[]", "holds no questions"),
    ]:
        path = tmp_path / name
        path.write_text(body)
        code = convert.main(["--input", str(path), "--output", str(tmp_path / "out.jsonl"), "--no-progress"])
        assert expected in _one_line_error(capsys, code, "explicitlm-convert")


def test_convert_summary_is_the_last_line(capsys, tmp_path, world, ray_session):
    code = convert.main(["--input", str(world["omcq"]), "--output", str(tmp_path / "o.parquet"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["converted"] == 400 and summary["rejected"] == 0 and summary["items_in"] == 400
    assert out[0].startswith("convert: 400 items in, 400 converted, 0 rejected")
    assert summary["startup_seconds"] <= summary["seconds"]


def test_evaluate_answers_without_options(capsys, run_dir, records, tmp_path):
    """eval.mode=open: the last line holds exact match, token F1 and the answers that name another
    row's words, the same figures as the evaluator in this process."""
    from explicitlm.config import load_config
    from explicitlm.evaluation import evaluate_open, summarize_open
    from explicitlm.loading import build_model, fill_from_weights

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    weights = str(run_dir / "sft_latest")
    assert (
        evaluate.main([f"eval.weights={weights}", f"eval.data={data}", "eval.mode=open", "eval.max_new_tokens=8"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "open" and result["n"] == 12
    cfg = fill_from_weights(load_config(), weights)
    tok, model = build_model(cfg, adapter=weights)
    here = summarize_open(evaluate_open(model, tok, records[:12], 512, max_new_tokens=8))
    for key in ("exact_match", "token_f1", "other_row_answers", "memory_read"):
        assert result[key] == pytest.approx(here[key]) and 0 <= result[key] <= 1, key


# ---- weights folders survive a copy


def test_a_copied_run_folder_loads_and_answers_the_same(run_dir, records, tmp_path):
    weights = run_dir / "sft_latest"
    saved = json.loads((weights / "adapter_config.json").read_text())
    assert saved["backbone_path"] == "../base" and saved["bank_path"] == "../knowledge_cache.parquet"
    questions = records[:6]
    before = ask.Asker(str(weights), top=3)
    answers = [before.ask(r["question"], r["options"]) for r in questions]
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    after = ask.Asker(str(moved / "sft_latest"), top=3)
    assert after.cfg.model.qwen3_model_path == str((moved / "base").resolve())
    assert after.cfg.model.cache_path == str((moved / "knowledge_cache.parquet").resolve())
    for r, a in zip(questions, answers):
        b = after.ask(r["question"], r["options"])
        assert b["index"] == a["index"] and b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-6)


def test_absolute_paths_of_older_weights_still_load(run_dir, tmp_path):
    from explicitlm.config import load_config
    from explicitlm.loading import fill_from_weights

    old = tmp_path / "old_weights"
    shutil.copytree(run_dir / "sft_latest", old)
    config = json.loads((old / "adapter_config.json").read_text())
    config["backbone_path"], config["bank_path"] = str(run_dir / "base"), str(run_dir / "knowledge_cache.parquet")
    (old / "adapter_config.json").write_text(json.dumps(config))
    cfg = fill_from_weights(load_config(), str(old))
    assert cfg.model.qwen3_model_path == str(run_dir / "base")
    assert cfg.model.cache_path == str(run_dir / "knowledge_cache.parquet")


# ---- explicitlm-ask


def test_ask_through_the_entry_point_once_and_interactively(run_dir, records, capsys):
    from explicitlm.bank import MemoryBank
    from explicitlm.scoring import Question, score_questions

    weights = run_dir / "sft_latest"
    questions = records[:8]
    flags = ["--weights", str(weights), "--json", "--top", "4"]
    # Interactive, through the real entry point: a question line, an options line, ... from a pipe;
    # the last question with an empty options line, answered without options.
    piped = (
        "".join(f"{r['question']}\n{' | '.join(r['options'])}\n" for r in questions) + f"{questions[0]['question']}\n\n"
    )
    session = subprocess.run(
        [sys.executable, "-m", "explicitlm.cli.ask", *flags],
        input=piped,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert session.returncode == 0, session.stderr
    answers = [json.loads(line) for line in session.stdout.splitlines()]
    assert len(answers) == len(questions) + 1
    *answers, generated = answers
    first = questions[0]
    options = ",".join(f"{'ABCD'[i]}:{o}" for i, o in enumerate(first["options"]))
    assert ask.main([*flags, first["question"], "--options", options]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == answers[0]
    # Without options: the answer the generator gives in this process, and the rows it read.
    assert ask.main([*flags, first["question"]]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone == generated and "options" not in alone and isinstance(alone["text"], str)
    from explicitlm.scoring import generate_answers

    # The same choices and probabilities as the scorer in this process, and rows from the bank.
    asker = ask.Asker(str(weights))
    scored = score_questions(
        asker.model, asker.tokenizer, [Question(r["question"], r["options"]) for r in questions], 512
    )
    bank = MemoryBank.load(run_dir / "knowledge_cache.parquet")
    own = 0
    for r, a, s in zip(questions, answers, scored):
        assert a["index"] == s.index and a["answer"] == f"{'ABCD'[s.index]}:{r['options'][s.index]}"
        assert a["probability"] == pytest.approx(max(s.probabilities), abs=1e-6)
        assert sum(a["probabilities"]) == pytest.approx(1.0)
        assert len(a["memory"]) == 4
        for row in a["memory"]:
            assert bank.texts[bank.row_of(row["uuid"])] == row["text"]
        own += any(row["uuid"] == r["uuid"] for row in a["memory"])
    assert own >= 6, own  # the rows it read are the question's own fact
    made = generate_answers(asker.model, asker.tokenizer, [Question(first["question"], [])], 512)[0]
    assert generated["text"] == made.text and len(generated["memory"]) == 4
    # --max-new-tokens bounds the generated answer.
    assert ask.main([*flags, first["question"], "--max-new-tokens", "1"]) == 0
    short = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one = generate_answers(asker.model, asker.tokenizer, [Question(first["question"], [])], 512, 1)[0]
    assert short["text"] == one.text and one.tokens == made.tokens[:1]
    if made.tokens:  # its first token is not the end of turn: one step cannot finish it
        assert short["finished"] is False


def test_ask_mistakes_are_one_line(capsys, run_dir, tmp_path):
    weights = str(run_dir / "sft_latest")
    cases = [
        (["--weights", weights, "Capital of France?", "--options", "Paris"], "do not parse"),
        (["--weights", str(tmp_path / "none"), "Q?", "--options", "A:x,B:y"], "weights folder"),
        (["Q?", "--options", "A:x,B:y"], "the following arguments are required: --weights"),
        (["--weights", weights, "Q?", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ]
    for argv, expected in cases:
        code = ask.main(argv)
        assert expected in _one_line_error(capsys, code, "explicitlm-ask"), argv


def test_evaluate_on_a_gpu_worker_stops_in_one_line_where_this_machine_has_no_gpu(world):
    """eval.num_gpus > 0 runs the evaluation in a Ray task holding GPUs; a Ray this command started
    on a machine without one cannot give them, so it stops at once instead of waiting forever. In a
    fresh process, so that it starts its own Ray."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the task would get it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "explicitlm.cli.evaluate", f"eval.data={world['omcq']}", "eval.num_gpus=1"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = [line for line in done.stderr.splitlines() if line.startswith("explicitlm-evaluate:")]
    assert err == [
        "explicitlm-evaluate: error: eval.num_gpus=1 but this machine's Ray has 0 GPUs: drop it, or submit to a cluster"
    ]


def test_evaluate_on_a_gpu_worker_gives_what_the_process_gives(trained, records, tmp_path, capsys):
    """eval.num_gpus=1 on a Ray that has one GPU: the evaluation runs in a task holding it and returns
    the same figures as in this process. The Ray here advertises a GPU it does not have (`num_gpus=1`
    on a CPU machine), so the task's device is the CPU (eval.device=auto): this checks the path, not
    a GPU. In a fresh process, with its own Ray."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the advertised one would be real")
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:24]))
    argv = [f"eval.weights={trained['weights']}", f"eval.data={data}"]
    assert evaluate.main(argv) == 0
    here = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert here["accuracy"] > 0.5  # trained weights (chance: 0.25), so a task that lost them would show
    code = (
        "import ray, sys; ray.init(num_cpus=2, num_gpus=1, include_dashboard=False); "
        "from explicitlm.cli.evaluate import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "eval.num_gpus=1"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate: in a Ray task holding 1 GPU(s)" in done.stdout
    there = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("n", "accuracy", "recall@1", "memory_read", "bank_rows"):
        assert there[key] == pytest.approx(here[key]), key
    assert there["n"] == 24
    # A mistake found inside the task is still one line: eval.device=cuda where the task has no CUDA.
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "eval.num_gpus=1", "eval.device=cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    err = [line for line in done.stderr.splitlines() if line.startswith("explicitlm-evaluate:")]
    assert done.returncode == 2 and err == [
        "explicitlm-evaluate: error: eval.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)"
    ], done.stderr[-3000:]
