"""Trainer-level parity with the official TDPO code (ZiyiZhang27/tdpo): the unclipped terminal reward
and the KL controller's place in the returns and in checkpoints (values derived by hand)."""

import json
import math

import pytest
import torch

from rewardtune.config import parse_config
from rewardtune.trainer import EpochSamples, Trainer
from tests.conftest import tiny_config_dict


@pytest.fixture(scope="module")
def aesthetic_source(tmp_path_factory) -> str:
    from rewardtune.rewards.tiny import init_tiny_rewards

    return init_tiny_rewards(tmp_path_factory.mktemp("rewards"), names=["aesthetic"])["aesthetic"]


def _trainer(model_dir, out, aesthetic, overrides=()) -> Trainer:
    data = tiny_config_dict(model_dir, model={"finetune": "lora"}, reward={"name": "aesthetic", "source": aesthetic},
                            algorithm={"name": "tdpo"}, sampling={"batches_per_epoch": 1, "num_steps": 4},
                            training={"epochs": 3, "batch_size": 2, "gradient_accumulation_steps": 1})
    return Trainer(parse_config(data, list(overrides)), out)


def _samples(rewards: torch.Tensor, steps: int, log_probs: torch.Tensor | None = None, ref: torch.Tensor | None = None):
    """The fields compute_advantages reads; everything else is a placeholder."""
    n = rewards.shape[0]
    empty = torch.zeros(n, 1)
    extras = {"all_rewards": rewards[:, None], "old_values": torch.zeros(n, steps, 1)}
    if ref is not None:
        extras["ref_log_probs"] = ref
    return EpochSamples(prompts=["p"] * n, latents=empty, next_latents=empty, timesteps=torch.zeros(n, steps),
                        log_probs=log_probs if log_probs is not None else torch.zeros(n, steps), prompt_embeds=empty,
                        negative_embeds=empty, images=empty, rewards=rewards, extras=extras)


# 36 rewards of 0 and one of 1: the batch-normalized outlier is (1 - 1/37) / (sqrt(36)/37 + 1e-6) ~ 6.0 > 5
REWARDS = torch.tensor([0.0] * 36 + [1.0])
OUTLIER = (1 - 1 / 37) / (math.sqrt(36) / 37 + 1e-6)


def test_tdpo_terminal_reward_is_not_clipped(tiny_model_dir, tmp_path, aesthetic_source):
    trainer = _trainer(tiny_model_dir, tmp_path, aesthetic_source, ["training.stat_tracking.enabled=false"])
    samples = _samples(REWARDS, 3)
    assert trainer.compute_advantages(samples) == {}
    returns = samples.extras["returns"][..., 0]
    # gamma 1, no KL: R_k = the normalized terminal reward at every step, unclipped (official clip_range_reward 0)
    torch.testing.assert_close(returns[-1], torch.full((3,), OUTLIER))
    torch.testing.assert_close(returns[0], torch.full((3,), -(1 / 37) / (math.sqrt(36) / 37 + 1e-6)))
    raw = returns  # V_old = 0
    torch.testing.assert_close(samples.advantages, (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8))


def test_reward_clip_option_and_ddpo_keep_their_clips(tiny_model_dir, tmp_path, aesthetic_source):
    clipped = _trainer(tiny_model_dir, tmp_path / "a", aesthetic_source,
                       ["training.stat_tracking.enabled=false", "algorithm.critic.reward_clip=5"])
    samples = _samples(REWARDS, 2)
    clipped.compute_advantages(samples)
    torch.testing.assert_close(samples.extras["returns"][-1, :, 0], torch.full((2,), 5.0))
    ddpo = _trainer(tiny_model_dir, tmp_path / "b", aesthetic_source,
                    ["training.stat_tracking.enabled=false", "algorithm.name=ddpo"])
    samples = _samples(REWARDS, 2)
    ddpo.compute_advantages(samples)
    torch.testing.assert_close(samples.advantages[-1], torch.full((2,), 5.0))  # DDPO's ±adv_clip_max


def test_kl_penalty_uses_coef_times_controller_and_the_controller_adapts(tiny_model_dir, tmp_path, aesthetic_source):
    trainer = _trainer(tiny_model_dir, tmp_path, aesthetic_source,
                       ["training.stat_tracking.enabled=false", "algorithm.critic.kl_coef=0.5",
                        "algorithm.critic.kl_target=0.1", "algorithm.critic.kl_horizon=100"])
    rewards = torch.tensor([1.0, -1.0])  # normalized: ±1/(1 + 1e-6)
    log_probs = torch.tensor([[0.2, -0.1], [0.0, 0.4]])
    samples = _samples(rewards, 2, log_probs, torch.zeros(2, 2))
    stats = trainer.compute_advantages(samples)
    beta = 0.5 * 0.2  # kl_coef x the controller's initial value (official init_kl_coef)
    clip = log_probs.clamp(min=0)  # the default estimator, clip
    r = 1 / (1 + 1e-6)
    expected = torch.stack([
        torch.tensor([r - beta * (clip[0, 0] + clip[0, 1]), r - beta * clip[0, 1]]),
        torch.tensor([-r - beta * (clip[1, 0] + clip[1, 1]), -r - beta * clip[1, 1]]),
    ])
    torch.testing.assert_close(samples.extras["returns"][..., 0], expected)
    # measured KL: per-sample sums 0.1 and 0.4, mean 0.25; error clip(0.25/0.1 - 1, ±0.2) = 0.2; 2 samples / 100
    assert stats == pytest.approx({"kl_mean": 0.25, "kl_controller": 0.2, "kl_beta": beta})
    assert trainer.kl_controller.value == pytest.approx(0.2 * (1 + 0.2 * 2 / 100))


def test_adaptive_kl_controller_resumes_bit_identically(tiny_model_dir, tmp_path, aesthetic_source):
    common = ["algorithm.critic.kl_coef=0.05", "algorithm.critic.kl_target=1e-6", "algorithm.critic.kl_horizon=10",
              "checkpointing.every_epochs=1", "training.epochs=2", "sampling.num_steps=2"]
    straight = tmp_path / "straight"
    _trainer(tiny_model_dir, straight, aesthetic_source, common).run()
    split = tmp_path / "split"
    _trainer(tiny_model_dir, split, aesthetic_source, [*common, "training.epochs=1"]).run()
    _trainer(tiny_model_dir, split, aesthetic_source, common).run(resume=True)

    def state(out):
        return json.loads((out / "checkpoints" / "epoch-000002" / "trainer_state.json").read_text())

    assert state(straight)["kl_controller"] == state(split)["kl_controller"]
    assert state(straight)["kl_controller"]["value"] != 0.2  # it did adapt (and was restored, not re-initialized)
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    rows_straight = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_controller"] for r in rows] == [r["kl_controller"] for r in rows_straight]
    assert [r["kl_beta"] for r in rows] == [r["kl_beta"] for r in rows_straight]
