import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from explicitlm.cli.options import Program, help_text, load_cli
from explicitlm.config import CONFIG_DIR, ConfigError, load_config, parse_cli, schema_fields, suggest_keys

ROOT = Path(__file__).resolve().parent.parent


def test_override_sets_typed_value():
    cfg = load_config(None, ["training.epochs=5", "training.learning_rate=0.5", "model.knowledge_length=8"])
    assert cfg.training.epochs == 5
    assert cfg.training.learning_rate == 0.5
    assert cfg.model.knowledge_length == 8


def test_unknown_key_names_key_and_suggestion():
    with pytest.raises(ConfigError, match="training.learning_rat'.*training.learning_rate"):
        load_config(None, ["training.learning_rat=1"])
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(None, ["training.no_such_key=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(None, ["training.epochs=three"])
    with pytest.raises(ConfigError, match="model.use_ema_update"):
        load_config(None, ["model.use_ema_update=true"])
    with pytest.raises(ConfigError, match="trainable_modules"):
        load_config(None, ["training.trainable_modules=[memory_gate,lm_head]"])


def test_reference_spelling_and_config_name():
    cfg = parse_cli(["--config-name", "sft_omcq", "--training.batch_size=3", "model.qwen3_model_path=/m"])
    assert cfg.training.batch_size == 3
    assert cfg.model.knowledge_num == 1048576
    assert cfg.model.qwen3_model_path == "/m"


def _is_serve_config(data) -> bool:
    return isinstance(data, dict) and "applications" in data


def test_every_yaml_under_configs_loads():
    from ray.serve.schema import ServeDeploySchema

    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path} must start with the command that uses it"
        data = yaml.safe_load(path.read_text())
        if _is_serve_config(data):
            ServeDeploySchema.model_validate(data)
        else:  # a `???` value is one the command line must give
            required = [k for k, v in _flat(data) if v == "???"]
            load_config(str(path), [f"{k}=/given" for k in required])


def _flat(data, prefix=""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_sft_omcq_refuses_an_empty_backbone_path_in_one_line_naming_the_key(tmp_path):
    """The production config trains a real Qwen3: without a folder it stops before any work
    instead of training the tiny test base; the embedded default still builds that base."""
    with pytest.raises(ConfigError, match="model.qwen3_model_path"):
        load_config("sft_omcq")
    with pytest.raises(ConfigError, match="model.qwen3_model_path"):
        load_config("sft_omcq", ["model.qwen3_model_path="])
    assert load_config("sft_omcq", ["model.qwen3_model_path=/m"]).model.qwen3_model_path == "/m"
    assert load_config(None).model.qwen3_model_path == "" and load_config("sft_tiny").model.qwen3_model_path == ""
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "sft.py"), "--config-name", "sft_omcq", f"training.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "model.qwen3_model_path" in errors[0], proc.stderr
    assert not out.exists()


def test_precision_and_memory_keys_are_checked():
    assert load_config(None, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(None, ["model.dtype=float16"])
    with pytest.raises(ConfigError, match="training.gpu_memory_gb"):
        load_config(None, ["training.gpu_memory_gb=-1"])
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="training.prior_lr_scale"):
            load_config(None, [f"training.prior_lr_scale={bad}"])
    assert load_config(None, ["training.prior_lr_scale=10"]).training.prior_lr_scale == 10
    for bad in ("-1", "-256"):
        with pytest.raises(ConfigError, match="model.reader_encoder must be 0 or a positive width"):
            load_config(None, [f"model.reader_encoder={bad}"])
    assert load_config(None, ["model.reader_encoder=256"]).model.reader_encoder == 256
    assert load_config(None, []).training.absent_target == "answer"
    assert load_config(None, ["training.absent_target=spread"]).training.absent_target == "spread"
    with pytest.raises(
        ConfigError, match="training.absent_target must be answer, spread or spread_choices, got 'uniform'"
    ):
        load_config(None, ["training.absent_target=uniform"])
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(ConfigError, match="training.word_dropout is a share of a question's tokens"):
            load_config(None, [f"training.word_dropout={bad}"])
    assert load_config(None, ["training.word_dropout=0.2"]).training.word_dropout == 0.2
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"training.others_null is a loss weight, 0 or more; got {bad}"):
            load_config(None, [f"training.others_null={bad}"])
    with pytest.raises(ConfigError, match="serve.onednn_cache must be 0 or more, got -1"):
        load_config(None, ["serve.onednn_cache=-1"])
    cfg = load_config(None, ["training.worker_resources={worker_node: 1}", "training.gradient_checkpointing=true"])
    assert cfg.training.worker_resources == {"worker_node": 1.0} and cfg.training.gradient_checkpointing


def test_cli_unknown_key_exits_nonzero_before_work(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs" / "sft.py"),
            "training.no_such_key=1",
            f"training.output_dir={tmp_path / 'never'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("training.lr", "training.learning_rate"),  # by meaning: spelling alone ranks training.seed first
        ("training.learning_rat", "training.learning_rate"),
        ("training.bs", "training.batch_size"),
        ("training.num_epochs", "training.epochs"),
        ("training.wd", "training.weight_decay"),
        ("model.model_path", "model.qwen3_model_path"),
        ("model.learning_rate", "training.learning_rate"),  # the right name in the wrong section
        ("train.epochs", "training.epochs"),
        ("lr", "training.learning_rate"),
    ],
)
def test_suggestions_rank_by_meaning_and_spelling(typed, meant):
    assert suggest_keys(typed) == [meant]
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        load_config(None, [f"{typed}=1"])


def test_no_suggestion_for_a_key_like_no_other():
    assert suggest_keys("training.no_such_key") == []


def test_list_keys_take_brackets_or_a_bare_value_and_name_a_bad_element():
    both = ["memory_gate", "gated_memory_fusion"]
    assert (
        load_config(None, ["training.trainable_modules=[memory_gate,gated_memory_fusion]"]).training.trainable_modules
        == both
    )
    assert (
        load_config(None, ["training.trainable_modules=memory_gate,gated_memory_fusion"]).training.trainable_modules
        == both
    )
    assert load_config(None, ["training.trainable_modules=memory_gate"]).training.trainable_modules == ["memory_gate"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training.trainable_modules=gate"])
    assert "'gate' is not a memory module (did you mean 'memory_gate'?)" in str(e.value)
    assert "\n" not in str(e.value)


def test_wrong_type_says_what_is_expected():
    with pytest.raises(ConfigError, match=r"training.epochs=three: expected an integer$"):
        load_config(None, ["training.epochs=three"])
    with pytest.raises(ConfigError, match=r"training.use_gpu=maybe: expected true or false$"):
        load_config(None, ["training.use_gpu=maybe"])


def test_every_key_is_described_in_the_schema_and_help_shows_it():
    entries = schema_fields()
    assert len(entries) > 60
    assert [key for key, _, text, _ in entries if not text] == []
    program = Program("explicitlm-evaluate", "Score weights.", ("eval", "model"), required=("eval.data",))
    text = help_text(program)
    lines = text.splitlines()
    # Required keys come first, then the program's sections with their defaults and descriptions.
    assert lines.index("required:") < lines.index("eval:") < lines.index("model:")
    assert any(line.startswith("  eval.data ") and "Questions to score" in line for line in lines)
    assert any(
        line.startswith("  model.top_k=16 ") and "Candidate rows each layer's reader reads" in line for line in lines
    )
    assert not [line for line in lines if line.startswith(("  training.", "  serve."))]  # keys it does not read


def test_missing_required_key_is_one_line():
    program = Program("explicitlm-evaluate", "Score weights.", ("eval",), required=("eval.data",))
    with pytest.raises(ConfigError, match=r"^eval.data is required: Questions to score, as OMCQ"):
        load_cli([], program)
