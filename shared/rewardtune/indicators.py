"""Overoptimization indicators: pure functions of per-checkpoint reward means.

Every function takes a series ordered by training progress whose entry 0 is the base model
(checkpoint "base"), so the definitions below are the only place the indicators are defined; the
report quotes these docstrings verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def change_from_base(series: Sequence[float]) -> list[float]:
    """Change from base: Δr(c) = r(c) − r(base), for every checkpoint c (Δr(base) = 0)."""
    if not series:
        raise ValueError("series is empty; entry 0 must be the base model")
    return [value - series[0] for value in series]


def change_per_gain(unseen: Sequence[float], train: Sequence[float]) -> list[float | None]:
    """Unseen change per training gain: Δr_unseen(c) / Δr_train(c); None where the training reward has not moved.

    Positive: the unseen reward moves with the training reward; negative: it pays for the gain.
    """
    if len(unseen) != len(train):
        raise ValueError(f"unseen has {len(unseen)} checkpoints but train has {len(train)}")
    return [None if gain == 0 else delta / gain for delta, gain in zip(change_from_base(unseen), change_from_base(train), strict=True)]


def first_below_base(series: Sequence[float], tolerance: float = 0.0) -> int | None:
    """First drop below base: the smallest index c ≥ 1 with r(c) < r(base) − tolerance; None if it never happens."""
    for index in range(1, len(series)):
        if series[index] < series[0] - tolerance:
            return index
    return None


def first_unseen_below_base(unseen: Mapping[str, Sequence[float]], tolerance: float = 0.0) -> tuple[int, str] | None:
    """First unseen reward below base: the earliest first_below_base over all unseen rewards, with that reward's name.

    Ties go to the alphabetically first reward name, so the answer does not depend on dict order.
    """
    hits = [(index, name) for name, series in unseen.items() if (index := first_below_base(series, tolerance)) is not None]
    return min(hits) if hits else None


def best_proxy_index(train: Sequence[float]) -> int:
    """Best-proxy checkpoint: argmax_c r_train(c), base included; ties go to the earliest checkpoint."""
    if not train:
        raise ValueError("train is empty; entry 0 must be the base model")
    return max(range(len(train)), key=lambda c: (train[c], -c))


def gold_at_best_proxy(train: Sequence[float], unseen: Sequence[float]) -> tuple[int, float, float]:
    """Gold-at-best-proxy: r_unseen at the best-proxy checkpoint c* = argmax_c r_train(c).

    Returns (c*, r_unseen(c*), r_unseen(c*) − r_unseen(base)).
    """
    if len(unseen) != len(train):
        raise ValueError(f"unseen has {len(unseen)} checkpoints but train has {len(train)}")
    best = best_proxy_index(train)
    return best, unseen[best], unseen[best] - unseen[0]


def best_heldout_index(train: Sequence[float], unseen: Mapping[str, Sequence[float]],
                       base_ci_low: Mapping[str, float]) -> int:
    """Best-held-out checkpoint: argmax_c r_train(c) over the checkpoints c whose every unseen reward keeps
    r_u(c) ≥ the lower end of the base model's 95% CI of r_u (held-out prompts); base always qualifies, so
    there is always an answer. Ties go to the earliest checkpoint.

    The training reward picks among the checkpoints the unseen rewards have not measurably turned against,
    instead of taking the last (most optimized, most likely overoptimized) one.
    """
    if not train:
        raise ValueError("train is empty; entry 0 must be the base model")
    for name, series in unseen.items():
        if len(series) != len(train):
            raise ValueError(f"unseen reward {name} has {len(series)} checkpoints but train has {len(train)}")
    if set(unseen) != set(base_ci_low):
        raise ValueError(f"base_ci_low covers {sorted(base_ci_low)} but the unseen rewards are {sorted(unseen)}")
    admissible = [c for c in range(len(train)) if c == 0 or all(unseen[u][c] >= base_ci_low[u] for u in unseen)]
    return max(admissible, key=lambda c: (train[c], -c))


DEFINITIONS: dict[str, str] = {
    "change_from_base": change_from_base.__doc__ or "",
    "change_per_gain": change_per_gain.__doc__ or "",
    "first_below_base": first_below_base.__doc__ or "",
    "first_unseen_below_base": first_unseen_below_base.__doc__ or "",
    "gold_at_best_proxy": gold_at_best_proxy.__doc__ or "",
    "best_heldout_index": best_heldout_index.__doc__ or "",
}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summarize(
    names: Sequence[str], train_name: str, means: Mapping[str, Sequence[float]], unseen: Sequence[str]
) -> dict[str, Any]:
    """All indicators of one run: `means[reward][c]` is the mean at checkpoint `names[c]` (names[0] = base)."""
    train = list(means[train_name])
    gain = change_from_base(train)
    per_reward = {}
    for reward in unseen:
        series = list(means[reward])
        delta = change_from_base(series)
        ratio = change_per_gain(series, train)
        best, gold, gold_delta = gold_at_best_proxy(train, series)
        drop = first_below_base(series)
        per_reward[reward] = {
            "base": series[0],
            "final": series[-1],
            "change_final": delta[-1],
            "change_per_gain_final": _finite(ratio[-1]),
            "first_below_base": names[drop] if drop is not None else None,
            "gold_at_best_proxy": gold,
            "gold_at_best_proxy_change": gold_delta,
            "best_proxy_checkpoint": names[best],
        }
    first = first_unseen_below_base({r: list(means[r]) for r in unseen})
    return {
        "train_reward": train_name,
        "train_base": train[0],
        "train_final": train[-1],
        "train_gain_final": gain[-1],
        "best_proxy_checkpoint": names[best_proxy_index(train)],
        "first_unseen_below_base": None if first is None else {"checkpoint": names[first[0]], "reward": first[1]},
        "unseen": per_reward,
    }
