"""TDPO, TDPO-R and CDPO end to end on the tiny model: through the CLI, with checkpointed resets."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rewardtune.cli import main as cli
from tests.conftest import tiny_config_dict


@pytest.fixture(scope="module")
def aesthetic_source(tmp_path_factory) -> str:
    from rewardtune.rewards.tiny import init_tiny_rewards

    return init_tiny_rewards(tmp_path_factory.mktemp("rewards"), names=["aesthetic"])["aesthetic"]


def _config(tmp_path: Path, model_dir: Path, aesthetic: str, algorithm: dict, **training) -> Path:
    data = tiny_config_dict(
        model_dir,
        model={"finetune": "lora"},
        reward={"name": "aesthetic", "source": aesthetic},
        algorithm=algorithm,
        sampling={"batches_per_epoch": 1, "num_steps": 4},
        training={"epochs": 3, "batch_size": 2, "gradient_accumulation_steps": 1, **training},
        checkpointing={"every_epochs": 1, "keep_last": 5},
    )
    path = tmp_path / f"{algorithm['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


ALGORITHMS = {
    "tdpo": {"name": "tdpo", "critic": {"kl_coef": 0.01, "gamma": 0.99, "input_stride": 2}},
    "tdpo_r": {"name": "tdpo_r", "reset": {"every": 2}},
    "cdpo": {"name": "cdpo", "reset": {"every": 2},
             "constraints": [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}],
             "lagrange": {"learning_rate": 1.0}},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_runs_three_epochs_through_the_cli(tmp_path, tiny_model_dir, aesthetic_source, name):
    config = _config(tmp_path, tiny_model_dir, aesthetic_source, ALGORITHMS[name])
    out = tmp_path / "run"
    assert cli(["train", "--config", str(config), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["critic_loss"] >= 0 and record["value_explained_variance"] is not None
        assert all(f"value_explained_variance_{t}_third" in record for t in ("first", "middle", "last"))
    ckpt = out / "checkpoints" / "epoch-000003"
    assert (ckpt / "critic.safetensors").is_file()
    # hidden sizes 1024+128+64+16 per critic head; measured (and logged) for plain TDPO too, as officially
    heads = 2 if name == "cdpo" else 1
    assert all(r["neurons_total"] == heads * (1024 + 128 + 64 + 16) for r in records)
    assert all(0 <= r["dormant_fraction"] <= 1 for r in records)
    if name == "tdpo":
        assert not any(r["reset"] for r in records) and records[1]["dormant_overlap"] is not None
        return
    assert [r["reset"] for r in records] == [False, True, False]
    assert records[1]["neurons_reset"] == records[1]["neurons_active"] > 0
    assert records[0]["dormant_overlap"] is None and records[1]["dormant_overlap"] is not None
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert {"epoch-000002-pre-reset", "epoch-000002-post-reset"} <= set(names)
    if name == "cdpo":
        lambdas = [r["lambda_jpeg_compressibility"] for r in records]
        assert all(lam >= 0 for lam in lambdas)
        threshold = records[0]["threshold_jpeg_compressibility"]
        assert threshold == pytest.approx(records[0]["constraint_jpeg_compressibility"])  # relative, margin 0
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["dual"]["multipliers"] == [lambdas[-1]]


def test_reset_changes_critic_only_at_reset_epochs(tmp_path, tiny_model_dir, aesthetic_source):
    config = _config(tmp_path, tiny_model_dir, aesthetic_source, ALGORITHMS["tdpo_r"])
    out = tmp_path / "run"
    assert cli(["train", "--config", str(config), "--out", str(out), "--set", "training.epochs=2"]) == 0
    pre = load_file(out / "checkpoints" / "epoch-000002-pre-reset" / "critic.safetensors")
    post = load_file(out / "checkpoints" / "epoch-000002-post-reset" / "critic.safetensors")
    changed = {k for k in pre if not torch.equal(pre[k], post[k])}
    assert changed and "heads.0.layers.0.weight" in changed
    # the output layer's weights change only in the columns of reset neurons; its bias never does
    assert "heads.0.layers.8.bias" not in changed


def _critic_and_policy(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(ckpt / "critic.safetensors"), **load_file(ckpt / "pytorch_lora_weights.safetensors")}


def test_resume_across_a_reset_is_bit_identical(tmp_path, tiny_model_dir, aesthetic_source):
    config = _config(tmp_path, tiny_model_dir, aesthetic_source, ALGORITHMS["cdpo"])
    straight = tmp_path / "straight"
    assert cli(["train", "--config", str(config), "--out", str(straight)]) == 0

    split = tmp_path / "split"
    assert cli(["train", "--config", str(config), "--out", str(split), "--set", "training.epochs=2"]) == 0
    # killed right after the pre-reset checkpoint: the post-reset one never landed
    shutil.rmtree(split / "checkpoints" / "epoch-000002-post-reset")
    assert cli(["train", "--config", str(config), "--out", str(split), "--resume"]) == 0

    a = _critic_and_policy(straight / "checkpoints" / "epoch-000003")
    b = _critic_and_policy(split / "checkpoints" / "epoch-000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = json.loads((straight / "checkpoints" / "epoch-000003" / "trainer_state.json").read_text())
    state_b = json.loads((split / "checkpoints" / "epoch-000003" / "trainer_state.json").read_text())
    assert state_a == state_b
