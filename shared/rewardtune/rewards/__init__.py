"""Reward registry: every reward is `score(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]`.

Rewards register a builder under their config name; `build_reward` turns a `RewardSpec` into a
callable on the requested device. Model-based rewards load only through the model cache.

Which names exist comes from the entry points of group `rewardtune.rewards` (see `rewardtune.plugins`):
the built-ins, the testbed and any installed package declare `name = "module"` (the module registers
itself with `register`) or `name = "module:builder"` (a `builder(spec, device) -> reward`; its optional
`options` attribute lists the option keys it reads). A plugin is imported the first time its name is used.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rewardtune.errors import ConfigError, RewardError, RewardtuneError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rewardtune.cache import ModelRef


class RewardSpec(Protocol):
    """What the registry reads of a reward's config (`config.RewardSpec`). A protocol, so the registry imports
    no config while config's validators ask it about names and options."""

    name: str
    source: str | None
    options: dict[str, Any]


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
TowerLoader = Callable[[Path, torch.device, torch.dtype], Any]
_TOWER_LOADERS: list[tuple[Callable[[Path], bool], TowerLoader]] = []


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
    _ensure(name)
    if name in _CHECKS:
        _CHECKS[name](options)


def register_sources(name: str) -> Callable[[SourcesFn], SourcesFn]:
    """Register which models a reward needs, so `rewardtune cache-models` can fetch them ahead of time."""

    def wrap(fn: SourcesFn) -> SourcesFn:
        _SOURCES[name] = fn
        return fn

    return wrap


def register_tower_loader(probe: Callable[[Path], bool]) -> Callable[[TowerLoader], TowerLoader]:
    """Register an image-tower loader for directories `probe(dir)` recognizes (e.g. the testbed proxy's features)."""

    def wrap(fn: TowerLoader) -> TowerLoader:
        _TOWER_LOADERS.append((probe, fn))
        return fn

    return wrap


def tower_loader(directory: Path) -> TowerLoader | None:
    """The plugin loader for a tower directory, importing every reward plugin that may declare one."""
    for name in reward_names():
        try:
            _ensure(name)
        except RewardtuneError as err:  # a broken third-party plugin must not break every other tower
            log.debug("tower lookup skipped %s: %s", name, err)
    return next((fn for probe, fn in _TOWER_LOADERS if probe(directory)), None)


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
    _ensure(spec.name)
    fn = _SOURCES.get(spec.name)
    return fn(spec) if fn else []


def critic_tower_source(spec: RewardSpec) -> str | None:
    """The image-tower source TDPO's critic should use for a reward, loadable by `load_clip_image_tower`.

    aesthetic / imagereward -> their CLIP ViT-L/14 (options.clip_source, a bundled `clip/`, or
    openai/clip-vit-large-patch14); pickscore / clipscore -> the reward's own transformers CLIP;
    hpsv2 -> its own open_clip ViT-H-14 checkpoint. None for model-free rewards (JPEG, brightness):
    set algorithm.critic.image_encoder for those.
    """
    _ensure(spec.name)
    fn = _TOWERS.get(spec.name)
    return fn(spec) if fn else None


def critic_image_tower(cfg: Any) -> str:
    """The source of the tower TDPO's critic embeds decoded x_t with: `algorithm.critic.image_encoder`, else the
    training reward's own. A model-free reward (brightness, JPEG) has none: a ConfigError naming the field, raised
    by plan-arms before a DAG starts and by the trainer alike."""
    source = cfg.algorithm.critic.image_encoder or critic_tower_source(cfg.reward)
    if source is None:
        raise ConfigError(f"algorithm.critic.image_encoder: reward '{cfg.reward.name}' has no image tower for the "
                          f"{cfg.algorithm.name} critic to share; give a CLIP vision model source (hub id, directory or cache URI)")
    return source


def critic_tower_checkpoint(spec: RewardSpec) -> str | None:
    """The checkpoint file within `critic_tower_source(spec)` the critic's tower must load; None: the source's default."""
    _ensure(spec.name)
    fn = _TOWER_CHECKPOINTS.get(spec.name)
    return fn(spec) if fn else None


def unknown_options(name: str, options: dict) -> list[str]:
    """Option keys a reward does not read: a misspelled option must not silently fall back to a default."""
    _ensure(name)
    return sorted(set(options) - _OPTIONS.get(name, frozenset()))


def allowed_options(name: str) -> list[str]:
    _ensure(name)
    return sorted(_OPTIONS.get(name, frozenset()))


def reward_names() -> list[str]:
    """Every reward a config may name: the registered ones and every entry point (not imported here)."""
    from rewardtune.plugins import REWARDS, entry_points

    return sorted(set(_REGISTRY) | set(entry_points(REWARDS)))


def default_unseen_names() -> list[str]:
    """Rewards evaluation scores by default: this package's own, minus those that need a config to mean
    anything (python, http) and the testbed's (only meaningful on its own world); plugins are named explicitly."""
    from rewardtune.plugins import REWARDS, is_builtin

    return [n for n in reward_names() if is_builtin(REWARDS, n) and n not in ("python", "http") and not n.startswith("testbed_")]


def build_reward(spec: RewardSpec, device: torch.device | str = "cpu") -> Reward:
    """The reward's callable; a source that cannot be loaded (damaged, unreadable, wrong kind) is one line."""
    from rewardtune.errors import RewardtuneError
    from rewardtune.plugins import REWARDS, is_builtin

    _ensure(spec.name)
    try:
        reward = _REGISTRY[spec.name](spec, torch.device(device))
    except RewardtuneError:
        raise
    except Exception as err:  # noqa: BLE001 - model files fail in many types; the user needs the source named
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RewardError(f"reward '{spec.name}' could not be loaded from {spec.source or 'its default source'} "
                          f"({type(err).__name__}: {first}); check reward.source and its files") from None
    if not is_builtin(REWARDS, spec.name):
        return CheckedReward(reward, spec.name)  # third-party output is checked before training sees it
    return reward


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


def _first_text(scores: Any) -> str | bytes | None:
    """The first str/bytes in a reward's list/tuple/array output (torch says only "too many dimensions 'str'")."""
    import numpy as np

    if isinstance(scores, str | bytes):
        return scores
    if isinstance(scores, np.ndarray):
        if scores.dtype.kind in "USO":
            return next((v for v in scores.ravel().tolist() if isinstance(v, str | bytes)), None)
        return None
    if isinstance(scores, list | tuple):
        for value in scores:
            found = _first_text(value)
            if found is not None:
                return found
    return None


def check_scores(name: str, scores: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A reward's output as float32 [B] on the images' device; wrong type, shape, device or NaN is one line."""
    batch = images.shape[0]
    if isinstance(scores, torch.Tensor):
        if scores.device != images.device:
            raise RewardError(f"reward '{name}' returned scores on {scores.device} for images on {images.device}; "
                              "return them on the images' device (scores.to(images.device))")
    else:
        text = _first_text(scores)
        if text is not None:
            raise RewardError(f"reward '{name}' returned text ({text!r}) where a score belongs; return one number per "
                              f"image (float(score)), {batch} in all")
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32, device=images.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RewardError(f"reward '{name}' returned {type(scores).__name__}, not a tensor/array/list of "
                              f"{batch} numbers ({str(err)[:100]})") from None
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch,):
        raise RewardError(f"reward '{name}' returned scores of shape {tuple(scores.shape)} for {batch} images; "
                          f"return one number per image, shape [{batch}]")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise RewardError(f"reward '{name}' returned {scores.dtype} scores; return real numbers")
    return check_finite(name, scores.float(), prompts)


class CheckedReward:
    """Wraps a reward from outside the package: every call's output goes through `check_scores`."""

    def __init__(self, inner: Reward, name: str) -> None:
        self.inner, self.name = inner, name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return check_scores(self.name, self.inner(images, prompts), images, prompts)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def _ensure(name: str) -> None:
    """Import the plugin that provides `name` (once); an unknown name is left for the caller to report."""
    if name in _REGISTRY:
        return
    from rewardtune.plugins import REWARDS, entry_points, load

    if name not in entry_points(REWARDS):
        return
    obj = load(REWARDS, name)
    if name in _REGISTRY:  # a module that registered itself on import
        return
    if isinstance(obj, types.ModuleType) or not callable(obj):
        raise RewardError(f"plugin {REWARDS}:{name} = {entry_points(REWARDS)[name].value!r} neither registered "
                          f"'{name}' on import nor is a builder(spec, device) -> reward")
    register(name, tuple(getattr(obj, "options", ())))(obj)
