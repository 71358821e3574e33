"""PPO's clipped surrogate and diagnostics on hand-built numbers."""

import math

import torch

from rewardtune.losses import ppo_clipped_loss, ppo_diagnostics


def test_on_policy_loss_is_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0])
    assert ppo_clipped_loss(lp, lp, torch.tensor([2.0, -1.0]), 0.1).item() == -0.5


def test_clipping_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped); ratio 1.5, A=-1: max(1.5, 1.2) = 1.5 (pessimistic)
    # ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5;             ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    expected = (-1.2 + 1.5 - 0.5 + 0.8) / 4
    assert math.isclose(ppo_clipped_loss(new, old, adv, 0.2).item(), expected, rel_tol=1e-6)


def test_clipped_ratio_has_no_gradient():
    new = torch.log(torch.tensor([1.5])).requires_grad_()
    ppo_clipped_loss(new, torch.zeros(1), torch.tensor([1.0]), 0.2).backward()
    assert new.grad.item() == 0.0


def test_diagnostics_by_hand():
    old = torch.zeros(2)
    new = torch.tensor([0.1, 0.0])
    d = ppo_diagnostics(new, old, clip_range=0.05)
    assert math.isclose(d["approx_kl"].item(), 0.5 * (0.01 + 0) / 2, rel_tol=1e-6)
    assert d["clipfrac"].item() == 0.5
