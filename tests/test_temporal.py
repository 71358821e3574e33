"""TDPO's returns, advantages and value loss on a hand-built 3-step trajectory."""

import math

import pytest
import torch

from rewardtune.temporal import (
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    explained_variance_by_thirds,
    standardize,
    step_rewards,
    temporal_advantages,
)


def test_returns_with_gamma_and_kl_by_hand():
    terminal = torch.tensor([1.0])
    kl = torch.tensor([[0.5, 0.2, 0.1]])
    rewards = step_rewards(terminal, 3, kl, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.02, 1.0 - 0.01]]))
    returns = discounted_returns(rewards, gamma=0.9)
    r2 = 0.99
    r1 = -0.02 + 0.9 * r2
    r0 = -0.05 + 0.9 * r1
    torch.testing.assert_close(returns, torch.tensor([[r0, r1, r2]]))


def test_gamma_one_without_kl_gives_the_terminal_reward_everywhere():
    returns = discounted_returns(step_rewards(torch.tensor([2.0, -1.0]), 4), gamma=1.0)
    torch.testing.assert_close(returns, torch.tensor([[2.0] * 4, [-1.0] * 4]))


def test_step_specific_advantages_subtract_values_then_standardize():
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0], [0.0, -0.5]])
    raw = torch.tensor([[0.5, 0.0], [0.0, 0.5]])  # R - V
    expected = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(temporal_advantages(returns, values), expected)


def test_per_prompt_standardization():
    values = torch.tensor([[1.0], [3.0], [10.0], [30.0]])
    out = standardize(values, ["a", "a", "b", "b"])
    torch.testing.assert_close(out, torch.tensor([[-1.0], [1.0], [-1.0], [1.0]]), atol=1e-6, rtol=0)


def test_value_loss_unclipped_and_clipped():
    old = torch.tensor([0.0, 0.0])
    returns = torch.tensor([1.0, 1.0])
    # inside the clip range: plain ½ squared error
    assert math.isclose(clipped_value_loss(torch.tensor([0.1, 0.1]), old, returns, 0.2).item(), 0.5 * 0.81, rel_tol=1e-6)
    # V = 0.5 leaves the range: clipped V = 0.2 is further from R (0.64 > 0.25) and the max picks it
    assert math.isclose(clipped_value_loss(torch.tensor([0.5, 0.5]), old, returns, 0.2).item(), 0.5 * 0.64, rel_tol=1e-6)
    # V = 1.5 overshoots R: unclipped 0.25 vs clipped (0.2 - 1)^2 = 0.64 -> pessimistic 0.64
    assert math.isclose(clipped_value_loss(torch.tensor([1.5, 1.5]), old, returns, 0.2).item(), 0.5 * 0.64, rel_tol=1e-6)


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0])
    assert explained_variance(target, target) == 1.0
    assert math.isclose(explained_variance(torch.full((3,), 2.0), target), 0.0, abs_tol=1e-7)


def test_explained_variance_by_thirds():
    """K = 6: steps (0, 1), (2, 3), (4, 5). Target per step [1, -1] over two samples (variance 1). A constant
    prediction explains nothing (0), the exact one everything (1), half the target explains 1 - 1/4 = 0.75."""
    target = torch.tensor([[1.0] * 6, [-1.0] * 6])
    predicted = torch.cat([torch.zeros(2, 2), target[:, 2:4], 0.5 * target[:, 4:]], dim=1)
    assert explained_variance_by_thirds(predicted, target) == pytest.approx([0.0, 1.0, 0.75])
