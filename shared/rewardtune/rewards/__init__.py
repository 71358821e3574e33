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
    from rewardtune.cache import ModelRef
    from rewardtune.config import RewardSpec


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


RewardBuilder = Callable[["RewardSpec", torch.device], Reward]
SourcesFn = Callable[["RewardSpec"], list["ModelRef"]]
TowerFn = Callable[["RewardSpec"], "str | None"]
_REGISTRY: dict[str, RewardBuilder] = {}
_SOURCES: dict[str, SourcesFn] = {}
_TOWERS: dict[str, TowerFn] = {}
_TOWER_CHECKPOINTS: dict[str, TowerFn] = {}
_OPTIONS: dict[str, frozenset[str]] = {}
_CHECKS: dict[str, Callable[[dict], object]] = {}


def register(
    name: str, options: tuple[str, ...] = (), check: Callable[[dict], object] | None = None
) -> Callable[[RewardBuilder], RewardBuilder]:
    """Register a builder and the `options` keys it reads (anything else in a config is an error);
    `check(options)` raises ValueError for a bad option value, so the config is refused when it is loaded."""

    def wrap(builder: RewardBuilder) -> RewardBuilder:
        _REGISTRY[name] = builder
        _OPTIONS[name] = frozenset(options)
        if check is not None:
            _CHECKS[name] = check
        return builder

    return wrap


def check_options(name: str, options: dict) -> None:
    """Raise ValueError naming the option when a value is not allowed (unknown keys: `unknown_options`)."""
    _load_builtin()
    if name in _CHECKS:
        _CHECKS[name](options)


def register_sources(name: str) -> Callable[[SourcesFn], SourcesFn]:
    """Register which models a reward needs, so `rewardtune cache-models` can fetch them ahead of time."""

    def wrap(fn: SourcesFn) -> SourcesFn:
        _SOURCES[name] = fn
        return fn

    return wrap


def register_tower(name: str) -> Callable[[TowerFn], TowerFn]:
    def wrap(fn: TowerFn) -> TowerFn:
        _TOWERS[name] = fn
        return fn

    return wrap


def register_tower_checkpoint(name: str) -> Callable[[TowerFn], TowerFn]:
    """For rewards whose source holds several checkpoints (HPS v2.0 / v2.1): which one the critic's tower loads."""

    def wrap(fn: TowerFn) -> TowerFn:
        _TOWER_CHECKPOINTS[name] = fn
        return fn

    return wrap


def reward_model_refs(spec: RewardSpec) -> list[ModelRef]:
    """The models (sources) a reward loads; empty for model-free rewards (JPEG, brightness)."""
    _load_builtin()
    fn = _SOURCES.get(spec.name)
    return fn(spec) if fn else []


def critic_tower_source(spec: RewardSpec) -> str | None:
    """The image-tower source TDPO's critic should use for a reward, loadable by `load_clip_image_tower`.

    aesthetic / imagereward -> their CLIP ViT-L/14 (options.clip_source, a bundled `clip/`, or
    openai/clip-vit-large-patch14); pickscore / clipscore -> the reward's own transformers CLIP;
    hpsv2 -> its own open_clip ViT-H-14 checkpoint. None for model-free rewards (JPEG, brightness):
    set algorithm.critic.image_encoder for those.
    """
    _load_builtin()
    fn = _TOWERS.get(spec.name)
    return fn(spec) if fn else None


def critic_tower_checkpoint(spec: RewardSpec) -> str | None:
    """The checkpoint file within `critic_tower_source(spec)` the critic's tower must load; None: the source's default."""
    _load_builtin()
    fn = _TOWER_CHECKPOINTS.get(spec.name)
    return fn(spec) if fn else None


def unknown_options(name: str, options: dict) -> list[str]:
    """Option keys a reward does not read: a misspelled option must not silently fall back to a default."""
    _load_builtin()
    return sorted(set(options) - _OPTIONS.get(name, frozenset()))


def allowed_options(name: str) -> list[str]:
    _load_builtin()
    return sorted(_OPTIONS.get(name, frozenset()))


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
    from rewardtune.rewards import (  # noqa: F401  (register on import)
        aesthetic,
        clipscore,
        hpsv2,
        imagereward,
        pickscore,
        simple,
    )
    from rewardtune.testbed import gold, proxy  # noqa: F401  (the testbed world's rewards)
