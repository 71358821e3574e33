"""Per-prompt reward normalization (DDPO's stat tracker) on hand-built numbers."""

import numpy as np

from rewardtune.advantages import EPS, PerPromptStatTracker, batch_normalized


def test_uses_batch_stats_until_min_count_then_prompt_stats():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "b"], np.array([1.0, 3.0]))
    # one reward per prompt < min_count: batch mean 2, std 1
    np.testing.assert_allclose(adv, [(1 - 2) / (1 + EPS), (3 - 2) / (1 + EPS)])
    adv = tracker.update(["a", "a"], np.array([2.0, 3.0]))
    # 'a' buffer now [1, 2, 3]: mean 2, std sqrt(2/3)
    std = np.sqrt(2 / 3)
    np.testing.assert_allclose(adv, [0.0, 1 / (std + EPS)])


def test_buffer_keeps_only_the_last_rewards_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["a"] * 3, np.array([0.0, 10.0, 20.0]))
    assert list(tracker.stats["a"]) == [10.0, 20.0]
    clone = PerPromptStatTracker(1, 1)
    clone.load_state_dict(tracker.state_dict())
    assert clone.buffer_size == 2 and list(clone.stats["a"]) == [10.0, 20.0]
    np.testing.assert_allclose(clone.update(["a"], np.array([20.0])), tracker.update(["a"], np.array([20.0])))


def test_batch_normalized():
    np.testing.assert_allclose(batch_normalized(np.array([1.0, 3.0])), [-1 / (1 + EPS), 1 / (1 + EPS)])
