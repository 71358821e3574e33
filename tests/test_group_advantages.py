"""GRPO's group-normalized advantages, against values derived by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rewardtune.group_advantages import group_advantages, group_prompts


def test_group_std_hand_derived():
    # group a: rewards 1, 3 -> mean 2, std 1 -> -1, +1 (/(1 + eps)); group b: 4, 4, 10 -> mean 6, std sqrt(8)
    prompts = ["a", "b", "a", "b", "b"]
    rewards = np.array([1.0, 4.0, 3.0, 4.0, 10.0])
    got = group_advantages(prompts, rewards, std="group", eps=0.0)
    s = np.sqrt(8.0)
    np.testing.assert_allclose(got, [-1.0, -2 / s, 1.0, -2 / s, 4 / s])


def test_global_std_hand_derived():
    # all rewards 1, 3, 5, 7: std sqrt(5); groups (1, 3) and (5, 7) both centre to -1, +1
    got = group_advantages(["a", "a", "b", "b"], np.array([1.0, 3.0, 5.0, 7.0]), std="global", eps=1e-4)
    np.testing.assert_allclose(got, np.array([-1.0, 1.0, -1.0, 1.0]) / (np.sqrt(5.0) + 1e-4))


def test_equal_rewards_give_zero_advantage_and_each_group_sums_to_zero():
    got = group_advantages(["a"] * 3 + ["b"] * 3, np.array([2.0, 2.0, 2.0, 0.0, 1.0, 5.0]), std="group")
    np.testing.assert_array_equal(got[:3], 0.0)
    assert got[3:].sum() == pytest.approx(0.0, abs=1e-12)


def test_refusals():
    with pytest.raises(ValueError, match="group of >= 2"):
        group_advantages(["a", "a", "b"], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one reward per prompt"):
        group_advantages(["a", "a"], np.array([1.0]))
    with pytest.raises(ValueError, match="std="):
        group_advantages(["a", "a"], np.array([1.0, 2.0]), std="batch")


def test_group_prompts_order():
    assert group_prompts(["x", "y"], 3) == ["x", "x", "x", "y", "y", "y"]
    with pytest.raises(ValueError, match=">= 2"):
        group_prompts(["x"], 1)
