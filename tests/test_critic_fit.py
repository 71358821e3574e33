"""The critic's issue-31 knobs: `critic.fit_passes` (critic-only passes over cached inputs) and
`critic.hold_value_at_zero` (the tdpo_nocritic control)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator

from rewardtune.cli import main as cli
from rewardtune.critic import Critics
from rewardtune.training.optimize import PPOUpdate
from tests.test_algorithms import _config


def _fit_run(passes: int):
    torch.manual_seed(0)
    critics = Critics(["r"], input_dim=8, hidden_sizes=[16], dropout=[0.0], seed=0)
    policy = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW([{"params": policy.parameters()},
                                   {"params": critics.parameters(), "name": "critic", "lr": 1e-2}], lr=1e-2)
    cfg = SimpleNamespace(algorithm=SimpleNamespace(critic=SimpleNamespace(fit_passes=passes, fit_batch_size=16)),
                          training=SimpleNamespace(max_grad_norm=1.0))
    run = SimpleNamespace(cfg=cfg, critics=critics, optimizer=optimizer, accelerator=Accelerator(cpu=True),
                          trainable_steps=[0, 1, 2, 3, 4])
    update = PPOUpdate.__new__(PPOUpdate)
    update.run = run
    inputs = torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(1))
    returns = (inputs @ torch.linspace(-1, 1, 8))[..., None]  # a linear target the MLP can fit
    samples = SimpleNamespace(extras={"critic_inputs": inputs, "returns": returns})
    return update, samples, critics, policy, inputs, returns


def test_fit_passes_lower_the_value_loss_and_leave_the_policy_alone():
    update, samples, critics, policy, inputs, returns = _fit_run(passes=30)
    before_policy = [p.detach().clone() for p in policy.parameters()]
    with torch.no_grad():
        before = 0.5 * ((critics(inputs) - returns) ** 2).mean().item()
    last_pass = update.fit_critic(samples, torch.Generator().manual_seed(0)).item()
    with torch.no_grad():
        after = 0.5 * ((critics(inputs) - returns) ** 2).mean().item()
    assert after < 0.5 * before and last_pass < before
    assert all(torch.equal(a, b) for a, b in zip(before_policy, policy.parameters(), strict=True))


def test_fit_is_deterministic_for_a_generator_seed():
    a = _fit_run(passes=3)
    b = _fit_run(passes=3)
    la = a[0].fit_critic(a[1], torch.Generator().manual_seed(5))
    lb = b[0].fit_critic(b[1], torch.Generator().manual_seed(5))
    assert torch.equal(la, lb)
    assert all(torch.equal(x, y) for x, y in zip(a[2].parameters(), b[2].parameters(), strict=True))


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory) -> str:
    from rewardtune.rewards.tiny import init_tiny_rewards

    return init_tiny_rewards(tmp_path_factory.mktemp("rewards"), names=["aesthetic"])["aesthetic"]


def test_tdpo_with_fit_passes_and_a_zero_value_trains_and_logs(tmp_path, tiny_model_dir, aesthetic):
    algorithm = {"name": "tdpo", "critic": {"fit_passes": 2, "fit_batch_size": 4, "hold_value_at_zero": True}}
    config = _config(tmp_path, tiny_model_dir, aesthetic, algorithm, epochs=2)
    assert yaml.safe_load(config.read_text())["algorithm"]["critic"]["fit_passes"] == 2
    out = tmp_path / "run"
    assert cli(["train", "--config", str(config), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["critic_fit_loss"] >= 0 for r in records)
    assert records[1]["value_explained_variance"] is not None  # the critic is still trained and measured


def _advantages(hold: bool) -> torch.Tensor:
    from rewardtune.training.estimators import AdvantageEstimator

    critic = SimpleNamespace(kl_coef=0.0, advantage_norm="global", gamma=1.0, hold_value_at_zero=hold, reward_clip=0.0)
    cfg = SimpleNamespace(algorithm=SimpleNamespace(name="tdpo", critic=critic),
                          training=SimpleNamespace(stat_tracking=SimpleNamespace(enabled=False)))
    dual = SimpleNamespace(multipliers=[])
    estimator = AdvantageEstimator(cfg, Accelerator(cpu=True), torch.device("cpu"), [None], None, dual, has_critic=True)
    rewards = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    old_values = torch.arange(12, dtype=torch.float32).reshape(4, 3, 1) / 10
    samples = SimpleNamespace(timesteps=torch.zeros(4, 3), prompts=["a"] * 4, advantages=None,
                              extras={"all_rewards": rewards, "old_values": old_values})
    estimator.compute_advantages(samples)
    return samples.advantages


def test_hold_value_at_zero_gives_the_standardized_returns():
    held = _advantages(hold=True)
    # the batch-normalized terminal rewards (1, 2, 3, 6) are every step's return; with V = 0 the advantage is
    # their standardization over all (sample, step) pairs, the same at every step of a sample
    z = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z = (z - z.mean()) / z.std(unbiased=False)
    assert torch.allclose(held, z[:, None].expand(-1, 3), atol=1e-5)
    assert not torch.allclose(_advantages(hold=False), held, atol=1e-3)  # the critic's V changes them
