"""Frozen-base SFT on Ray Train with 2 CPU workers: learning, evaluation, checkpoints and faults."""

import io
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from explicitlm.errors import UserError


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, world, ray_session):
    from explicitlm.convert import convert
    from explicitlm.pipeline import split_by_subject

    d = tmp_path_factory.mktemp("sft_data")
    convert(world["omcq"], d / "all.parquet", fmt="parquet", progress=False)
    n_train, n_val = split_by_subject(d / "all.parquet", d / "train.parquet", d / "val.parquet", 0.2)
    return {"train": str(d / "train.parquet"), "val": str(d / "val.parquet"), "n_train": n_train, "n_val": n_val}


def _argv(tiny_base, bank_path, world, out, *extra):
    return [
        f"model.qwen3_model_path={tiny_base}",
        f"model.cache_path={bank_path}",
        f"model.database_init_path={world['knowledge']}",
        f"training.output_dir={out}",
        "model.fusion_dim=64",
        "training.num_workers=2",
        "training.batch_size=8",
        "logging.log_every=2",
        *extra,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "memory_modules.safetensors"))


def test_two_workers_learn_log_and_count_each_val_row_once(tiny_base, bank_path, world, sft_data, tmp_path, capsys):
    from explicitlm.cli import sft

    out = tmp_path / "run"
    summary = sft.run(
        _argv(
            tiny_base,
            bank_path,
            world,
            out,
            f"dataset.sft_dataset_path={sft_data['train']}",
            f"dataset.sft_val_dataset_path={sft_data['val']}",
            "training.epochs=3",
            "training.learning_rate=5e-3",
            "logging.swanlab_mode=offline",
        )
    )
    console = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 6
    # The answer's letter and the end of turn cannot be learned by a frozen random backbone, so the LM
    # loss has a high floor; what can be learned brings it down: the reading (which row answers)
    # most, and through it the answer's text.
    reading = [r["retrieval_loss"] for r in rows if "retrieval_loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert sum(reading[-2:]) < 0.25 * sum(reading[:2]), reading
    # Of the questions drawn with their own row hidden, the share with an option a visible row rules
    # out (what absent_target=spread spreads over): logged where any was drawn since the last line.
    ruled = [r["hidden_ruled_out"] for r in rows if "hidden_ruled_out" in r]
    assert len(ruled) >= len(losses) // 2 and all(0 <= x <= 1 for x in ruled), ruled
    val = [r for r in rows if "val_n" in r]
    assert len(val) == 3 and all(r["val_n"] == sft_data["n_val"] for r in val)  # every row once, over 2 workers
    assert summary["val_n"] == sft_data["n_val"]
    assert val[-1]["val_accuracy"] > 0.5 and val[-1]["val_accuracy"] > val[0]["val_accuracy"]  # chance: 0.25
    assert val[-1]["val_recall@1"] > val[0]["val_recall@1"] - 0.05
    # The job's closing checks on the held-out questions: the knowledge is in the memory.
    checks = summary["memory_checks"]
    print(json.dumps(checks))
    assert checks["questions"] == sft_data["n_val"] and checks["edited_questions"] > 0.9 * sft_data["n_val"]
    assert checks["bare_accuracy"] < 0.45 and checks["without_own_rows_accuracy"] < summary["val_accuracy"] - 0.2
    assert checks["edit_following"] > 0.5
    # Beside them, the no-training word rule on the same banks: it reads the own row when there is one
    # (the sample world's questions name their subject), guesses without it, and follows the edits.
    assert checks["rule_accuracy"] > 0.8 and checks["rule_without_own_rows_accuracy"] < 0.5
    assert checks["rule_edit_following"] > 0.8
    for name in ("sft_latest", "sft_best"):
        assert (out / name / "memory_modules.safetensors").exists() and (out / name / "adapter_config.json").exists()
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "config.yaml").exists()
    swan = list((out / "swanlog").rglob("*"))
    assert any(p.is_file() for p in swan), "SwanLab offline run files"
    # The console: each line once, a validation line per epoch, the last line the summary as JSON.
    assert json.loads(console[-1]) == json.loads(json.dumps(summary))
    assert summary["val_per_predicate"] == val[-1]["val_per_predicate"] and len(summary["val_per_predicate"]) == 5
    assert sum(line.startswith("freeze: frozen") for line in console) == 1
    assert [line.split(":")[0] for line in console if ": validation (" in line] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert sum(line.startswith("swanlab: offline run in ") for line in console) == 1


# Word dropout on: a resumed run (every worker) must draw the masks the uninterrupted one drew.
_STEPS = [
    "training.max_steps=8",
    "training.word_dropout=0.1",
    "training.checkpoint_every=3",
    "logging.swanlab_mode=disabled",
    "training.epochs=1",
]


def _starts(out: Path) -> list[int]:
    return [json.loads(line)["start_step"] for line in open(out / "attempts.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, bank_path, world, sft_data, tmp_path_factory):
    """Eight steps without a fault: the weights an interrupted run must end with."""
    from explicitlm.cli import sft

    out = tmp_path_factory.mktemp("uninterrupted")
    sft.run(_argv(tiny_base, bank_path, world, out, f"dataset.sft_dataset_path={sft_data['train']}", *_STEPS))
    assert _starts(out) == [0]
    weights = _weights(out / "sft_latest")
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights.items() if "out_proj" in k)
    return weights


def _equal_weights(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert got.keys() == reference.keys()
    for name, ref in reference.items():
        assert torch.allclose(got[name], ref, atol=1e-6), name


def _failing_at_step_5(tiny_base, bank_path, world, sft_data, out, max_failures: int) -> list[str]:
    return _argv(
        tiny_base,
        bank_path,
        world,
        out,
        f"dataset.sft_dataset_path={sft_data['train']}",
        *_STEPS,
        "training.fail_at_step=5",
        f"training.max_failures={max_failures}",
    )


def test_a_failed_run_resumes_from_its_checkpoint_and_gives_the_uninterrupted_weights(
    tiny_base, bank_path, world, sft_data, uninterrupted, tmp_path
):
    """No retries allowed: a worker dies at step 5 and the run fails; the same command with another
    memory shape or objective is refused, and the same command again resumes from the step-3
    checkpoint and ends with the weights of a run that never failed."""
    import ray.train

    from explicitlm.cli import sft

    argv = _failing_at_step_5(tiny_base, bank_path, world, sft_data, tmp_path, max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        sft.run(argv)
    # Resumed with another memory shape (a default that changed since the run began): one message
    # naming the key and both values, and the checkpoint is kept for the right resume below.
    with pytest.raises(ray.train.TrainingFailedError, match=r"reader_encoder: adapter 256 vs model 0") as e:
        sft.run([*argv, "model.reader_encoder=0"])
    assert "to resume it, set each model.* key named there to its adapter value" in str(e.value)
    # Resumed with another objective: refused by the driver before any worker starts, naming the
    # training key and both values.
    with pytest.raises(UserError, match=r"training.word_dropout: 0.1 there, 0.2 now") as e:
        sft.run([*argv, "training.word_dropout=0.2"])
    assert "set them back to resume it" in str(e.value)
    sft.run(argv)
    assert _starts(tmp_path) == [0, 3]  # resumed by running the same command again (the refused one wrote none)
    _equal_weights(_weights(tmp_path / "sft_latest"), uninterrupted)


def test_a_resume_is_refused_only_for_the_keys_that_make_the_run(tmp_path):
    """The driver reads what Ray Train's latest checkpoint recorded: a changed objective or batch is
    refused with every such key named; a longer run, another output folder or checkpoint interval,
    the same modules in another order, and a checkpoint from before the record all resume."""
    from explicitlm.checkpoint import TRAIN_STATE, check_same_run, recorded_run, run_keys
    from explicitlm.config import load_config

    storage = tmp_path / "ray_results" / "sft"
    assert recorded_run(storage) is None  # no run yet
    trained = load_config(None, ["training.trainable_modules=[memory_gate,gated_memory_fusion]"]).training
    for name, step in (("checkpoint_2026-01-01_00-00-01.000000", 3), ("checkpoint_2026-01-01_00-00-02.000000", 6)):
        (storage / name).mkdir(parents=True)
        torch.save({"step": step, "run": run_keys(trained) if step == 6 else {}}, storage / name / TRAIN_STATE)
    recorded = recorded_run(storage)  # no snapshot: the newest by name
    assert recorded == run_keys(trained)
    longer = [
        "training.epochs=9",
        "training.max_steps=500",
        f"training.output_dir={tmp_path / 'elsewhere'}",
        "training.checkpoint_every=7",
        "training.trainable_modules=[gated_memory_fusion,memory_gate]",
    ]
    check_same_run(recorded, load_config(None, longer).training, tmp_path)
    check_same_run(None, load_config(None, ["training.seed=1"]).training, tmp_path)  # from before the record
    changed = load_config(None, ["training.others_null=0.5", "training.batch_size=4"]).training
    with pytest.raises(UserError, match=r"training.batch_size: 16 there, 4 now; training.others_null: 0.0 there"):
        check_same_run(recorded, changed, tmp_path)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01.000000"}}
    (storage / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert recorded_run(storage) == {}  # Ray's own record of its latest wins over the names


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_checkpoint_and_gives_the_uninterrupted_weights(
    tiny_base, bank_path, world, sft_data, uninterrupted, tmp_path
):
    """A worker process dies at step 5; FailureConfig restarts the group from the step-3 checkpoint,
    within the same run. (Slow: the resume above reaches the same checkpoint code in CI.)"""
    from explicitlm.cli import sft

    sft.run(_failing_at_step_5(tiny_base, bank_path, world, sft_data, tmp_path, max_failures=1))
    assert (tmp_path / ".fault_injected").exists()
    assert _starts(tmp_path) == [0, 3]  # restarted by FailureConfig from the step-3 checkpoint
    _equal_weights(_weights(tmp_path / "sft_latest"), uninterrupted)


def test_own_and_other_rows_are_hidden_by_independent_draws_at_their_rates():
    from explicitlm.train import absent

    n = 20_000
    own = [absent(i, 0, 0.2, 42) for i in range(n)]
    others = [absent(i, 0, 0.2, 42, "others") for i in range(n)]
    assert own == [absent(i, 0, 0.2, 42, "own") for i in range(n)]
    assert sum(own) / n == pytest.approx(0.2, abs=0.01) and sum(others) / n == pytest.approx(0.2, abs=0.01)
    assert sum(a and b for a, b in zip(own, others)) / n == pytest.approx(0.04, abs=0.006)
    assert [absent(i, 1, 0.2, 42) for i in range(100)] != own[:100]  # a new draw each epoch


def test_the_readers_priors_train_at_their_own_rate():
    """training.prior_lr_scale: the readers' word-statistic weights and null biases take steps that
    many times AdamW's; every other parameter's step is unchanged."""
    from explicitlm.modules import MemoryGate
    from explicitlm.train import PRIORS, param_groups

    steps = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        named = {f"backbone.model.layers.0.memory_gate.{n}": p for n, p in MemoryGate(8, 4).named_parameters()}
        before = {n: p.detach().clone() for n, p in named.items()}
        optimizer = torch.optim.AdamW(param_groups(named, 1e-3, scale), lr=1e-3, weight_decay=0.0)
        for p in named.values():
            p.grad = torch.ones_like(p)
        optimizer.step()
        steps[scale] = {
            n.split(".memory_gate.")[1]: (p.detach() - before[n]).abs().max().item() for n, p in named.items()
        }
    priors = [n for n in steps[1.0] if n.removeprefix("x_") in PRIORS]
    assert sorted(priors) == [
        "lexical.bias",
        "lexical.weight",
        "null.bias",
        "x_lexical.bias",
        "x_lexical.weight",
        "x_null.bias",
    ]
    for name, step in steps[10.0].items():
        assert step == pytest.approx(steps[1.0][name] * (10 if name in priors else 1), rel=1e-2), name
    assert steps[1.0]["lexical.weight"] == pytest.approx(1e-3, rel=1e-2)  # AdamW's first step is lr
    assert len(param_groups(named, 1e-3, 1.0)) == 1  # as checkpoints written before the key hold


def test_a_checkpoint_written_unfused_resumes_fused_and_steps_as_it_would_have():
    """The recipe's AdamW is fused; a checkpoint from the per-tensor loop loads into it, stays fused,
    and its next step moves the weights as the loop's own next step does."""
    from explicitlm.train import adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    loop_params = [torch.nn.Parameter(w.clone()) for w in weights]
    loop = torch.optim.AdamW([{"params": loop_params}], lr=1e-2, weight_decay=0.01, fused=False)
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    for g in grads[:2]:
        for p, gi in zip(loop_params, g, strict=True):
            p.grad = gi.clone()
        loop.step()
    buffer = io.BytesIO()  # through a file, as a checkpoint goes: the loop's state is not shared
    torch.save(loop.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in loop_params]
    fused = adamw([{"params": fused_params}], 1e-2, 0.01, torch.device("cpu"))
    fused.load_state_dict(saved)
    assert fused.param_groups[0]["fused"] is True
    for params, opt in ((loop_params, loop), (fused_params, fused)):
        for p, gi in zip(params, grads[2], strict=True):
            p.grad = gi.clone()
        opt.step()
    for a, b in zip(loop_params, fused_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (loop_params[0] - weights[0]).abs().max() > 1e-3  # the steps moved the weights


def test_a_question_whose_fact_is_gone_is_taught_only_what_a_visible_row_rules_out():
    """training.absent_target=spread: a question whose own row is hidden is taught no option over
    the others but the one a row it sees names as not the answer: its option loss is least with that
    option at zero and the rest even, whichever is right. A question not drawn keeps the right
    option's cross-entropy; a first token two options share counts once."""
    from explicitlm.objective import option_loss

    def loss(z, options, right, spread, ruled_out):
        logits = torch.full((len(z), 2, 16), -30.0)  # (B, A, V): the answer's first slot is at A = 0
        logits[:, 0, 5:9] = torch.tensor(z)
        b = len(z)
        return option_loss(
            logits,
            torch.tensor([[-1, 0, 1]] * b),
            torch.tensor([[1, 2]] * b),
            torch.tensor(options),
            torch.tensor(right),
            torch.tensor(spread),
            torch.tensor(ruled_out),
        ).item()

    opts, ruled = [[5, 6, 7, 8]], [[6, -1]]  # a row the question sees names option B (token 6)
    least = loss([[0.0, -30.0, 0.0, 0.0]], opts, [2], [True], ruled)
    assert least == pytest.approx(math.log(3), abs=1e-4)
    assert loss([[0.0, 2.0, 0.0, 0.0]], opts, [2], [True], ruled) > least + 0.3  # the ruled-out option up
    assert loss([[0.0, -30.0, 3.0, 0.0]], opts, [2], [True], ruled) > least + 0.3  # a guess, even the right one
    assert loss([[0.0, 0.0, 0.0, 0.0]], opts, [2], [True], [[-1, -1]]) == pytest.approx(math.log(4), abs=1e-4)
    assert loss([[0.0, -30.0, 0.0, 0.0]], opts, [0], [True], ruled) == pytest.approx(least, abs=1e-6)  # any right
    assert loss([[0.0, 0.0, 0.0, 0.0]], [[5, 6, 7, 7]], [0], [True], [[-1, -1]]) == pytest.approx(math.log(3), abs=1e-4)
    z = [0.0, 0.0, 3.0, 0.0]
    plain = loss([z], opts, [2], [False], ruled)
    assert plain == pytest.approx(-torch.log_softmax(torch.tensor(z), 0)[2].item(), abs=1e-5)
    both = loss([z, z], opts * 2, [2, 2], [False, True], ruled * 2)  # each question by its own draw
    assert both == pytest.approx((plain + loss([z], opts, [2], [True], ruled)) / 2, abs=1e-5)


@pytest.mark.parametrize("target", ["answer", "spread", "spread_choices"])
def test_a_step_teaches_a_hidden_fact_its_answer_only_when_asked_to(
    tiny_base, bank_path, world, records, tmp_path, target
):
    """The recipe's step with every question's own row hidden and asked without options: with
    absent_target=answer (or spread_choices, which spreads only questions with options) the answer's
    loss reaches the fusion; with spread nothing does (no LM loss, and an open question has no option
    loss), while the reader still learns its null."""
    from dataclasses import asdict

    from explicitlm.train import SFTRecipe
    from tests.conftest import tiny_config

    cfg = tiny_config(
        tiny_base,
        bank_path,
        world,
        tmp_path,
        "training.absent_rate=1.0",
        "training.others_absent_rate=0.0",
        "training.open_answer_share=1.0",
        f"training.absent_target={target}",
        "training.batch_size=8",
    )
    # A wrong option of some questions is the object of another fact about their subject, whose row
    # (retrieved by the subject's words) then rules that option out.
    objects = defaultdict(list)
    for row in map(json.loads, open(world["knowledge"])):
        objects[row["subject"]].append(row["object"])
    rows = [dict(r) for r in records[:64]]
    swapped = []
    for r in rows:
        other = [o for o in objects[r["subject"]] if o not in r["options"]]
        wrong = (r["answer_index"] + 1) % len(r["options"])
        r["options"] = [other[0] if other and k == wrong else o for k, o in enumerate(r["options"])]
        swapped.append(bool(other))
    recipe = SFTRecipe({"config": asdict(cfg), "train_rows": rows})
    recipe.setup()
    recipe.model.train()
    assert all(recipe.targets[i] >= 0 for i in range(16))  # every question's row is known (and hidden)
    fusion = {n: p for n, p in recipe.core.named_parameters() if "gated_memory_fusion" in n and p.requires_grad}
    gate = {n: p for n, p in recipe.core.named_parameters() if "memory_gate" in n and p.requires_grad}
    before = {n: p.detach().clone() for n, p in {**fusion, **gate}.items()}
    losses = [recipe._step([list(range(s, s + 8))])[0].item() for s in (0, 8)]  # fusion writes from the 2nd
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in {**fusion, **gate}.items()}
    assert max(moved[n] for n in gate) > 0  # the reading loss trains the reader either way
    hidden, ruled = recipe._hidden.tolist()  # counted for the logged hidden_ruled_out
    # Ruled out only where another fact's object was put among the options (where its row was
    # retrieved and its first token is not the answer's), and there at least once.
    assert hidden == 16 and 0 < ruled <= sum(swapped[:16]) < 16
    if target == "spread":
        assert losses == [0.0, 0.0]
        assert max(moved[n] for n in fusion) == 0.0
    else:
        assert min(losses) > 1.0
        assert max(moved[n] for n in fusion) > 0
