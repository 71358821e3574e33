"""The policy's learning-rate warm-up: hand-derived factors, diffusers' schedule as the reference, and
the rate a training run really uses (logged per epoch), with the critic's rate left constant."""

import json

import pytest
import torch

from rewardtune.config import parse_config
from rewardtune.lr_schedule import warmup_factor
from rewardtune.trainer import Trainer
from tests.conftest import tiny_config_dict


def test_hand_derived_factors():
    assert warmup_factor(1, 8) == 0.125
    assert warmup_factor(4, 8) == 0.5
    assert warmup_factor(8, 8) == 1.0
    assert warmup_factor(9, 8) == 1.0
    assert warmup_factor(1, 0) == 1.0 and warmup_factor(50, 0) == 1.0


def test_is_diffusers_constant_with_warmup_without_its_zero_rate_first_step():
    """diffusers' `constant_with_warmup` gives factor k/W to its (k+1)-th optimizer step (k = 0, 1, ...):
    its first step moves nothing. Ours gives k/W to the k-th step: the same curve, one step earlier."""
    from diffusers.optimization import get_scheduler

    warmup = 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    diffusers_rates = []
    for _ in range(9):
        diffusers_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert diffusers_rates[0] == 0.0
    assert [2.0 * warmup_factor(k, warmup) for k in range(1, 9)] == pytest.approx(diffusers_rates[1:])


@pytest.mark.parametrize(("step", "warmup"), [(0, 4), (3, -1)])
def test_refuses_impossible_arguments(step, warmup):
    with pytest.raises(ValueError):
        warmup_factor(step, warmup)


def test_a_run_uses_the_warmed_up_policy_rate_and_a_constant_critic_rate(tiny_model_dir, tiny_rewards, tmp_path):
    overrides = ["algorithm.name=tdpo", "model.finetune=lora", "sampling.batches_per_epoch=1", "sampling.num_steps=4",
                 "training.epochs=2", "training.batch_size=4", "training.gradient_accumulation_steps=1",
                 "training.learning_rate=1e-3", "training.lr_warmup_steps=1000", "checkpointing.every_epochs=100",
                 "algorithm.critic.learning_rate=5e-3", "reward.name=aesthetic", f"reward.source={tiny_rewards['aesthetic']}"]
    trainer = Trainer(parse_config(tiny_config_dict(tiny_model_dir), overrides), tmp_path)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and 0 < rows[0]["global_step"] < rows[1]["global_step"] < 1000
    for row in rows:  # the rate of each epoch's last optimizer step
        assert row["lr"] == pytest.approx(1e-3 * row["global_step"] / 1000)
    rates = {group.get("name"): group["lr"] for group in trainer.optimizer.param_groups}
    assert rates["critic"] == 5e-3
