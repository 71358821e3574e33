"""Every model a run config names, for `rewardtune cache-models`: the base model, the rewards' models and the
critic's image tower. Here, not in cache.py, so the cache (a storage layer) never imports the reward registry.
"""

from __future__ import annotations

from typing import Any

from rewardtune.cache import ModelRef, cache_key
from rewardtune.rewards import critic_tower_checkpoint, critic_tower_source, reward_model_refs
from rewardtune.rewards.towers import tower_ref


def config_model_refs(cfg: Any) -> list[ModelRef]:
    """Every model a run config names: the base model, the training/eval/constraint rewards, the critic tower."""
    refs = [ModelRef(cfg.model.source, cfg.model.revision)]
    specs = [cfg.reward, *cfg.eval_rewards, *(c.reward for c in cfg.algorithm.constraints)]
    for spec in specs:
        refs.extend(reward_model_refs(spec))
    if cfg.algorithm.uses_critic:
        encoder = cfg.algorithm.critic.image_encoder
        tower = encoder or critic_tower_source(cfg.reward)
        if tower:
            refs.append(tower_ref(tower, None if encoder else critic_tower_checkpoint(cfg.reward)))
    unique: dict[str, ModelRef] = {}
    for ref in refs:  # one entry per cache key; the first (most specific) file filter wins
        unique.setdefault(cache_key(ref) if ref.kind != "cache" else ref.source, ref)
    return list(unique.values())
