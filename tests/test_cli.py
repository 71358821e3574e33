"""The CLI end to end on the tiny model, as a user runs it."""

import json
import subprocess
import sys

import yaml

from tests.conftest import tiny_config_dict


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rewardtune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_init_tiny_then_train_and_resume(tmp_path):
    model = tmp_path / "tiny-sd"
    proc = _cli("init-tiny", "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    assert _cli("init-tiny", "--out", str(model)).returncode == 2
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(model, training={"epochs": 1, "gradient_accumulation_steps": 1}, sampling={"batches_per_epoch": 1})))
    out = tmp_path / "run"
    proc = _cli("train", "--config", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"metrics: {out / 'metrics.jsonl'}" in proc.stdout
    record = json.loads((out / "metrics.jsonl").read_text())
    assert {"reward_mean", "reward_std", "approx_kl", "clipfrac", "loss", "lr", "images_per_s"} <= record.keys()
    assert (out / "checkpoints" / "epoch-000001" / "manifest.json").is_file()
    proc = _cli("train", "--config", str(config), "--out", str(out), "--set", "training.epochs=2", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_missing_model_and_cuda_errors_are_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "nope")))
    proc = _cli("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_every_help_text_renders_percent_signs_once():
    """argparse %-formats help strings but prints a description as written: "95%%" there showed literally."""
    from tests.cli_inproc import run_main

    for command in ("train", "evaluate", "export", "report", "prepare-prompts", "cache-models", "validate-config"):
        result = run_main([command, "--help"])
        assert result.returncode == 0, result.stderr
        assert "%%" not in result.stdout, command
    assert "95% CI" in run_main(["export", "--help"]).stdout
