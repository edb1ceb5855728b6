import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from explicitlm.config import CONFIG_DIR, ConfigError, load_config, parse_cli

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
