"""Advantage estimation for DDPO: per-prompt reward normalization (Black et al. 2023)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

EPS = 1e-6


class PerPromptStatTracker:
    """Keeps the last `buffer_size` rewards of each prompt; normalizes a reward by its prompt's stats.

    Until a prompt has `min_count` rewards, the batch mean/std stands in (docs/algorithms.md §2).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        prompts_arr = np.asarray(prompts, dtype=object)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            source = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - source.mean()) / (source.std() + EPS)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {p: list(v) for p, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def batch_normalized(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + EPS)
