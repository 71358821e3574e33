"""Python entry points: how rewards (group `rewardtune.rewards`) and named model sources
(`rewardtune.model_sources`) reach the core without the core importing them.

The built-in rewards and the testbed register themselves exactly as a third-party package would, in
pyproject.toml. Entry points are listed by name without importing anything; a plugin module is imported
only when its name is used, so a run on `brightness` never imports the testbed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import logging

from rewardtune.errors import RewardtuneError

log = logging.getLogger(__name__)

REWARDS = "rewardtune.rewards"
MODEL_SOURCES = "rewardtune.model_sources"
DISTRIBUTION = "rewardtune"

# What pyproject.toml declares for this distribution (a test keeps the two equal). Used only when the
# installed metadata predates them (an editable install made before they were added; `pip install -e .`
# refreshes it), so an old install keeps working instead of losing every reward.
DECLARED: dict[str, dict[str, str]] = {
    REWARDS: {
        "brightness": "rewardtune.rewards.simple",
        "jpeg_compressibility": "rewardtune.rewards.simple",
        "jpeg_incompressibility": "rewardtune.rewards.simple",
        "aesthetic": "rewardtune.rewards.aesthetic",
        "clipscore": "rewardtune.rewards.clipscore",
        "hpsv2": "rewardtune.rewards.hpsv2",
        "imagereward": "rewardtune.rewards.imagereward",
        "pickscore": "rewardtune.rewards.pickscore",
        "python": "rewardtune.rewards.external",
        "http": "rewardtune.rewards.served",
        "testbed_gold": "rewardtune.testbed.gold",
        "testbed_fidelity": "rewardtune.testbed.gold",
        "testbed_proxy": "rewardtune.testbed.proxy",
        "testbed_proxy_b": "rewardtune.testbed.proxy",
        "testbed_proxy_c": "rewardtune.testbed.proxy",
    },
    MODEL_SOURCES: {"testbed": "rewardtune.testbed.assets:resolve_model_source"},
}


@functools.cache
def entry_points(group: str) -> dict[str, md.EntryPoint]:
    """name -> entry point of a group, over every installed distribution (first one wins on a clash)."""
    found: dict[str, md.EntryPoint] = {}
    own = False
    for ep in md.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        if dist is not None and dist.metadata["Name"] == DISTRIBUTION:
            own = True
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning("entry point %s:%s is declared twice (%s and %s); using the first", group, ep.name,
                        found[ep.name].value, ep.value)
            continue
        found.setdefault(ep.name, ep)
    if not own and DECLARED.get(group):
        log.debug("installed rewardtune metadata has no %s entry points (stale install); using the declared ones", group)
        for name, value in DECLARED[group].items():
            found.setdefault(name, md.EntryPoint(name=name, value=value, group=group))
    return found


def is_builtin(group: str, name: str) -> bool:
    """Whether a name is one this distribution declares (its plugins are trusted to check their own outputs)."""
    return DECLARED.get(group, {}).get(name) == getattr(entry_points(group).get(name), "value", None)


def load(group: str, name: str) -> object:
    """Import an entry point; a plugin that cannot be imported is one line naming it and the cause."""
    ep = entry_points(group)[name]
    try:
        return ep.load() if ":" in ep.value else importlib.import_module(ep.value)
    except Exception as err:  # noqa: BLE001 - any import-time failure of third-party code is the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RewardtuneError(f"plugin {group}:{name} = {ep.value!r} could not be imported: "
                              f"{type(err).__name__}: {first[:200]}") from None


def resolve_model_source(source: str) -> str:
    """A named model source (e.g. `testbed`) -> what its plugin returns; any other source unchanged."""
    if source not in entry_points(MODEL_SOURCES):
        return source
    resolver = load(MODEL_SOURCES, source)
    if not callable(resolver):
        raise RewardtuneError(f"plugin {MODEL_SOURCES}:{source} is not callable; point it at a function(source) -> str")
    return str(resolver(source))
