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
        else:
            load_config(str(path))


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
