"""GRPO's advantages (Flow-GRPO's baseline): each prompt's G images are normalized within their group.

A_i = (r_i - mean of r over i's group) / (std + eps), where std is the group's own (`std="group"`) or that of
all rewards of the epoch (`std="global"`, Flow-GRPO's SD3.5 presets). No history across epochs: the groups
are sampled together, so the group mean is the baseline. The same advantage applies to every trained step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

EPS = 1e-4  # Flow-GRPO's


def group_advantages(
    prompts: Sequence[str], rewards: np.ndarray, std: Literal["group", "global"] = "global", eps: float = EPS
) -> np.ndarray:
    """Advantages of one epoch's rewards; groups are the images sharing a prompt (any order, any sizes >= 2)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or len(prompts) != len(rewards):
        raise ValueError(f"need one reward per prompt: {len(prompts)} prompts, rewards of shape {rewards.shape}")
    if std not in ("group", "global"):
        raise ValueError(f"std={std!r}; use 'group' or 'global'")
    keys = np.asarray(prompts, dtype=object)
    advantages = np.empty_like(rewards)
    for prompt in dict.fromkeys(prompts):
        mask = keys == prompt
        if mask.sum() < 2:
            raise ValueError(f"prompt {prompt!r} has 1 image; GRPO needs a group of >= 2 images per prompt")
        group = rewards[mask]
        scale = group.std() if std == "group" else rewards.std()
        advantages[mask] = (group - group.mean()) / (scale + eps)
    return advantages


def group_prompts(prompts: Sequence[str], group_size: int) -> list[str]:
    """Each prompt repeated `group_size` times, consecutively: the sampling order of one GRPO batch."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs >= 2 images per prompt")
    return [p for p in prompts for _ in range(group_size)]
