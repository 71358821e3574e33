"""Reward registry: every reward is `score(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]`.

Rewards register a builder under their config name; `build_reward` turns a `RewardSpec` into a
callable on the requested device. Model-based rewards load only through the model cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from rewardtune.errors import RewardError

if TYPE_CHECKING:
    from rewardtune.config import RewardSpec


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


RewardBuilder = Callable[["RewardSpec", torch.device], Reward]
_REGISTRY: dict[str, RewardBuilder] = {}


def register(name: str) -> Callable[[RewardBuilder], RewardBuilder]:
    def wrap(builder: RewardBuilder) -> RewardBuilder:
        _REGISTRY[name] = builder
        return builder

    return wrap


def reward_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_reward(spec: RewardSpec, device: torch.device | str = "cpu") -> Reward:
    _load_builtin()
    return _REGISTRY[spec.name](spec, torch.device(device))


def check_finite(name: str, scores: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Refuse NaN/inf rewards, naming the prompts: training on garbage must never continue silently."""
    bad = ~torch.isfinite(scores)
    if bad.any():
        offending = sorted({prompts[i] for i in torch.nonzero(bad).flatten().tolist()})
        raise RewardError(
            f"reward '{name}' returned {int(bad.sum())} non-finite value(s) for prompts {offending}; "
            "check the reward model's weights and inputs (the step was refused)"
        )
    return scores


def _load_builtin() -> None:
    from rewardtune.rewards import simple  # noqa: F401  (registers on import)
