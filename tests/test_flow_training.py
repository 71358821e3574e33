"""The flow families (tiny SD3, tiny FLUX) and GRPO through the same trainer and `rewardtune train`.

Default suite: one CLI epoch of every algorithm on each flow family (about 2 s each), GRPO on sd, the
flow trainer's invariants in process (only SDE steps shuffled, on-policy ratio 1, the critic's sigma
input) and a bit-identical resume on sd3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rewardtune.checkpoint import latest_checkpoint
from rewardtune.cli import main as cli
from rewardtune.config import parse_config
from rewardtune.group_advantages import group_advantages
from rewardtune.tiny_flow import init_tiny_flow
from tests.conftest import REPO, tiny_config_dict

ALGORITHMS = {
    "ddpo": {"name": "ddpo"},
    "grpo": {"name": "grpo", "group": {"group_size": 2}},
    "tdpo": {"name": "tdpo", "critic": {"kl_coef": 0.01, "input_stride": 2}},
    "tdpo_r": {"name": "tdpo_r", "reset": {"every": 1}},
    "cdpo": {"name": "cdpo", "reset": {"every": 1},
             "constraints": [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}]},
}


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family: init_tiny_flow(root / family, family) for family in ("sd3", "flux")}


@pytest.fixture(scope="module")
def aesthetic_source(tmp_path_factory) -> str:
    from rewardtune.rewards.tiny import init_tiny_rewards

    return init_tiny_rewards(tmp_path_factory.mktemp("rewards"), names=["aesthetic"])["aesthetic"]


def _flow_config(model: Path, family: str, aesthetic: str, algorithm: dict, **training) -> dict:
    return {
        "model": {"source": str(model), "family": family, "finetune": "lora"},
        "sampling": {"num_steps": 4, "guidance_scale": 3.0, "batch_size": 2, "batches_per_epoch": 1, "resolution": 32},
        "reward": {"name": "aesthetic", "source": aesthetic},
        "algorithm": algorithm,
        "training": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1,
                     "stat_tracking": {"enabled": False}, **training},
        "checkpointing": {"every_epochs": 1, "keep_last": 5},
        "device": "cpu",
        "logging": {"progress_bars": False},
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("family", "name"), [(f, n) for f in ("sd3", "flux") for n in ALGORITHMS])
def test_one_epoch_through_the_cli(tmp_path, flow_dirs, aesthetic_source, family, name):
    data = _flow_config(flow_dirs[family], family, aesthetic_source, ALGORITHMS[name])
    out = tmp_path / "run"
    assert cli(["train", "--config", str(_write(tmp_path, data)), "--out", str(out)]) == 0
    (record,) = _records(out)
    assert np.isfinite(record["loss"]) and record["samples"] == 2
    ckpt, _ = latest_checkpoint(out / "checkpoints")  # epoch-000001, or its -post-reset with a reset
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["meta"]["model_family"] == family
    lora = load_file(ckpt / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)  # the diffusers format of the flow pipelines
    if name in ("tdpo", "tdpo_r", "cdpo"):
        assert record["critic_loss"] >= 0 and (ckpt / "critic.safetensors").is_file()
    if name in ("tdpo_r", "cdpo"):
        assert record["reset"] and record["neurons_reset"] == record["neurons_active"] > 0
    if name == "cdpo":
        assert record["lambda_jpeg_compressibility"] >= 0


def test_grpo_on_sd_normalizes_within_groups(tmp_path, tiny_model_dir):
    from rewardtune.trainer import EpochTimes, Trainer

    data = tiny_config_dict(tiny_model_dir, algorithm=ALGORITHMS["grpo"] | {"group": {"group_size": 4}},
                            sampling={"batches_per_epoch": 2, "num_steps": 4}, training={"epochs": 1})
    trainer = Trainer(parse_config(data), tmp_path / "run")
    samples = trainer.sample_epoch(0, EpochTimes())
    assert [len(set(samples.prompts[i : i + 4])) for i in range(0, 8, 4)] == [1, 1]  # groups sampled whole
    trainer.compute_advantages(samples)
    expected = group_advantages(samples.prompts, samples.rewards.numpy(), "global").clip(-5, 5)
    assert torch.allclose(samples.advantages[:, 0], torch.as_tensor(expected, dtype=torch.float32))
    assert torch.equal(samples.advantages, samples.advantages[:, :1].expand(-1, 4))
    out = tmp_path / "cli"
    assert cli(["train", "--config", str(_write(tmp_path, data)), "--out", str(out)]) == 0
    assert _records(out)[0]["epoch"] == 0


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_grpo_kl_to_the_base_policy(tmp_path, flow_dirs, aesthetic_source, tiny_model_dir, family):
    """`algorithm.group.kl_coef` (Flow-GRPO's beta): the reference is the base policy (sd: tiny.yaml's full
    fine-tune, a frozen copy; sd3: LoRA with the adapters off), so the KL is 0 before the first update and > 0
    after one; the posterior's log-prob is the PPO one; the epoch logs the mean KL."""
    from rewardtune.kl import gaussian_kl_same_std
    from rewardtune.trainer import EpochTimes, Trainer
    from rewardtune.training.logprob import reference_policy

    algorithm = {"name": "grpo", "group": {"group_size": 2, "kl_coef": 0.5}}
    if family == "sd":
        data = tiny_config_dict(tiny_model_dir, algorithm=algorithm, sampling={"batch_size": 2, "batches_per_epoch": 1,
                                "num_steps": 4}, training={"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1})
    else:
        data = _flow_config(flow_dirs["sd3"], "sd3", aesthetic_source, algorithm)
    trainer = Trainer(parse_config(data), tmp_path / "run")
    samples = trainer.sample_epoch(0, EpochTimes())
    trainer.compute_advantages(samples)
    view = trainer._view(trainer._shuffled(samples, torch.Generator().manual_seed(0)), [(slice(None), 0)])

    def kl_now():
        with torch.no_grad():
            log_prob, mean, std = trainer.density.posterior_of(view)
            with reference_policy(trainer.built) as reference:
                ref_mean = trainer.density.posterior_of(view, reference)[1]
        return log_prob, gaussian_kl_same_std(mean, ref_mean, std)

    log_prob, kl = kl_now()
    assert torch.equal(log_prob, trainer.log_prob_of(view)) and torch.equal(kl, torch.zeros_like(kl))
    stats = trainer.ppo.train_epoch(samples, 0)
    assert stats["kl_to_reference"] >= 0 and np.isfinite(stats["kl_to_reference"])
    assert bool((kl_now()[1] > 0).all())  # the policy moved away from the base; the reference did not


def test_flow_trainer_shuffles_only_sde_steps_on_policy(tmp_path, flow_dirs, aesthetic_source):
    from rewardtune.trainer import EpochTimes, Trainer

    data = _flow_config(flow_dirs["sd3"], "sd3", aesthetic_source, ALGORITHMS["tdpo"])
    data["sampling"] |= {"num_steps": 6, "flow": {"sde_window": {"start": 1, "size": 3}}}
    trainer = Trainer(parse_config(data), tmp_path / "run")
    assert trainer.trainable_steps == [1, 2, 3] and trainer.num_train_steps == 3
    samples = trainer.sample_epoch(0, EpochTimes())
    assert torch.equal(samples.log_probs[:, [0, 4, 5]], torch.zeros(2, 3))  # ODE steps: no density
    # the critic sees [tower embedding, sigma]: the last input column is the step's sigma
    inputs = samples.extras["critic_inputs"]
    assert inputs.shape[-1] == trainer.tower.dim + 1 and torch.equal(inputs[..., -1], samples.sigmas)
    trainer.compute_advantages(samples)
    batch = trainer._shuffled(samples, torch.Generator().manual_seed(0))
    assert batch["timesteps"].shape == (2, 3)
    for row in range(2):  # each sample's columns are a permutation of its SDE steps
        picked = [int((samples.timesteps[0] == t).nonzero()) for t in batch["timesteps"][row]]
        assert sorted(picked) == [1, 2, 3]
    with torch.no_grad():
        view = trainer._view(batch, [(slice(None), j) for j in range(3)])
        assert torch.allclose(trainer.log_prob_of(view), view["log_probs"], atol=1e-5)  # ratio 1 on policy


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(ckpt / "critic.safetensors"), **load_file(ckpt / "pytorch_lora_weights.safetensors")}


def test_flow_resume_is_bit_identical(tmp_path, flow_dirs, aesthetic_source):
    data = _flow_config(flow_dirs["sd3"], "sd3", aesthetic_source, ALGORITHMS["tdpo_r"], epochs=2)
    config = _write(tmp_path, data)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(["train", "--config", str(config), "--out", str(straight)]) == 0
    assert cli(["train", "--config", str(config), "--out", str(split), "--set", "training.epochs=1"]) == 0
    assert cli(["train", "--config", str(config), "--out", str(split), "--resume"]) == 0
    a, b = (_state(d / "checkpoints" / "epoch-000002-post-reset") for d in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight) == [{**r, **{k: v for k, v in s.items() if k.startswith("time_") or k == "images_per_s"}}
                                   for r, s in zip(_records(split), _records(straight), strict=True)]


def test_resume_refuses_another_family(tmp_path, flow_dirs, aesthetic_source):
    data = _flow_config(flow_dirs["sd3"], "sd3", aesthetic_source, ALGORITHMS["ddpo"])
    out = tmp_path / "run"
    assert cli(["train", "--config", str(_write(tmp_path, data)), "--out", str(out)]) == 0
    manifest = out / "checkpoints" / "epoch-000001" / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["meta"]["model_family"] = "flux"
    manifest.write_text(json.dumps(meta))
    assert cli(["train", "--config", str(_write(tmp_path, data)), "--out", str(out), "--resume",
                "--set", "training.epochs=2"]) == 2


@pytest.mark.parametrize("name", ["grpo", "tdpo_r", "cdpo"])
def test_sd35m_presets_validate(name):
    cfg = parse_config(yaml.safe_load((REPO / "configs" / f"sd35m-pickscore-{name}.yaml").read_text()))
    assert (cfg.model.family, cfg.sampling.num_steps, cfg.sampling.resolution) == ("sd3", 10, 512)
    assert (cfg.sampling.flow.noise_level, cfg.sampling.guidance_scale) == (0.7, 4.5)
    assert cfg.algorithm.name == name and cfg.model.lora_target_modules[0] == "attn.add_k_proj"
    if name == "grpo":
        assert cfg.algorithm.group.group_size == 24


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sampling": {"flow": {"noise_level": 0.5}}}, "sampling.flow"),  # sd has no flow section
        ({"algorithm": {"name": "ddpo", "group": {"group_size": 2}}}, "algorithm.group"),
        ({"algorithm": {"name": "grpo", "group": {"group_size": 3}}}, "group_size=3"),
        ({"model": {"family": "sd3"}, "sampling": {"num_steps": 4, "flow": {"sde_window": {"start": 2, "size": 2}}}},
         "sde_window"),
    ],
)
def test_family_sections_are_validated(tiny_model_dir, change, field):
    from rewardtune.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        parse_config(tiny_config_dict(tiny_model_dir, **change))


def test_evaluate_a_flow_run_with_the_ode_sampler(tmp_path, flow_dirs, aesthetic_source):
    """`rewardtune evaluate` on a trained SD3 run: base and checkpoint from the same fixed noise with the
    deterministic Euler ODE, so the base images reproduce exactly and the checkpoint's LoRA changes them."""
    from rewardtune.evaluate import Evaluator

    data = _flow_config(flow_dirs["sd3"], "sd3", aesthetic_source, ALGORITHMS["ddpo"], learning_rate=0.05)
    data["evaluation"] = {"num_heldout_prompts": 2, "num_train_prompts": 0, "images_per_prompt": 1, "batch_size": 2}
    config, out = _write(tmp_path, data), tmp_path / "run"
    assert cli(["train", "--config", str(config), "--out", str(out)]) == 0
    assert cli(["evaluate", "--config", str(config), "--run", str(out), "--out", str(tmp_path / "eval")]) == 0
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "eval").glob("*/metrics.json")}
    assert set(results) == {"base", "epoch-000001"}
    evaluator = Evaluator(parse_config(data), out, None)
    assert evaluator.settings()["sampler"] == "ode"
    first, *_ = evaluator.generate()
    again, *_ = evaluator.generate()
    assert torch.equal(first, again)  # base: no SDE noise, the same initial noise
    evaluator.load("epoch-000001")
    trained, *_ = evaluator.generate()
    assert not torch.equal(trained, first)
    # export merged: a plain StableDiffusion3Pipeline whose transformer computes what base + LoRA computes
    from diffusers import StableDiffusion3Pipeline

    from rewardtune.export import export_model

    summary = export_model(out, tmp_path / "eval", "last", tmp_path / "merged", merge=True)
    assert summary["checkpoint"] == "epoch-000001" and summary["merged"]
    shipped = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged", local_files_only=True).transformer
    latents, embeds, pooled = torch.randn(1, 16, 8, 8), torch.randn(1, 5, 32), torch.randn(1, 32)
    args = {"hidden_states": latents, "encoder_hidden_states": embeds, "pooled_projections": pooled,
            "timestep": torch.tensor([500.0]), "return_dict": False}
    with torch.no_grad():
        torch.testing.assert_close(shipped(**args)[0], evaluator.policy(**args)[0], rtol=1e-4, atol=1e-5)
