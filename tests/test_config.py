"""Config schema: defaults, overrides, and one-line errors naming the field and what is allowed."""

import subprocess
import sys

import pytest
import yaml

from rewardtune.config import load_config, parse_config
from rewardtune.errors import ConfigError
from tests.conftest import REPO, tiny_config_dict


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = parse_config(tiny_config_dict(tmp_path), ["training.epochs=3", "training.mixed_precision=bf16", "sampling.eta=0.5"])
    assert cfg.training.epochs == 3 and cfg.training.mixed_precision == "bf16" and cfg.sampling.eta == 0.5


BAD = [
    ({"training": {"learnig_rate": 1e-3}}, "training.learnig_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"training": {"learning_rate": -1.0}}, "training.learning_rate: Input should be greater than 0"),
    ({"training": {"epochs": "many"}}, "training.epochs: Input should be a valid integer"),
    ({"sampling": {"eta": 0.0}}, "sampling.eta: Input should be greater than 0"),
    ({"training": {"timestep_fraction": 1.5}}, "training.timestep_fraction: Input should be less than or equal to 1"),
    ({"training": {"timestep_fraction": 0.0}}, "training.timestep_fraction: Input should be greater than 0"),
    ({"training": {"clip_range": 0.0}}, "training.clip_range: Input should be greater than 0"),
    ({"algorithm": {"name": "ppo"}}, "algorithm.name: Input should be 'ddpo', 'grpo', 'tdpo', 'tdpo_r' or 'cdpo'"),
    ({"reward": {"name": "brightnes"}}, "unknown reward 'brightnes' (did you mean 'brightness'?)"),
    ({"algorithm": {"name": "cdpo"}}, "cdpo needs at least one entry in algorithm.constraints"),
    ({"training": {"batch_size": 3}}, "training.batch_size=3 must divide"),
    ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"),
    ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"model": {"finetune": "qlora"}}, "model.finetune: Input should be 'lora' or 'full'"),
    ({"prompts": {"template": "a photo"}}, "template must contain '{}'"),
]


@pytest.mark.parametrize(("patch", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_fail_with_one_line(tmp_path, patch, message):
    with pytest.raises(ConfigError) as info:
        parse_config(tiny_config_dict(tmp_path, **patch))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_cli_reports_config_error_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, training={"max_grad_nrom": 1.0})))
    proc = subprocess.run(
        [sys.executable, "-m", "rewardtune.cli", "validate-config", "--config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: config error at training.max_grad_nrom: unknown key (did you mean 'max_grad_norm'?); allowed keys here: "
        + ", ".join(sorted(__import__("rewardtune.config", fromlist=["TrainingConfig"]).TrainingConfig.model_fields))
    )
