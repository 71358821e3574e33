"""The instrument's own checks (issue 31): pure functions that say whether the overoptimization benchmark
can see the effect it measures, before it judges any method.

An instrument proves itself on controls first: its rule must give PASS to the oracle (DDPO trained on gold
itself) against DDPO on the proxy (G0), DDPO on the proxy must actually overoptimize (G1), TDPO's critic
must learn (G2), a reset must hit learned neurons (G3), and CDPO's constraint must have something to
prevent (G4). The primary metric these gates validate is held-out gold at a fixed reward-query budget
(final value, drawdown, area under the curve), matched in samples across arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rewardtune.testbed import stats


def drawdown(gold: Sequence[float]) -> float:
    """Peak minus final held-out gold: how much of its best gold a run gave back (0 for a monotone rise)."""
    return float(max(gold) - gold[-1])


def peaks_then_falls(gold: Sequence[float], proxy: Sequence[float], drop: float) -> bool:
    """Overoptimization in one run: gold peaks, then falls by at least `drop` while the proxy ends above
    its value at gold's peak (the proxy keeps rising past the point where gold turns down)."""
    peak = int(np.argmax(gold))
    return bool(gold[peak] - gold[-1] >= drop and proxy[-1] > proxy[peak])


def value_at_budget(samples: Sequence[float], values: Sequence[float], budget: float) -> float | None:
    """`values` linearly interpolated at `budget` reward queries; None if the run stopped short of it."""
    if budget > samples[-1] or budget < samples[0]:
        return None
    return float(np.interp(budget, samples, values))


def gold_area(samples: Sequence[float], gold_gain: Sequence[float], budget: float) -> float | None:
    """Mean gold gain over [0, budget] queries (trapezoidal area / budget): rewards a method for gold held
    along the way, not only at the end, so a late collapse and an early one score differently."""
    if budget <= 0 or budget > samples[-1]:
        return None
    xs = [s for s in samples if s < budget] + [budget]
    ys = [float(np.interp(x, samples, gold_gain)) for x in xs]
    return float(np.trapezoid(ys, xs) / budget)


@dataclass(frozen=True)
class RunReading:
    """One run's readings of the primary metric at the protocol's budget (gains over the run's base)."""

    final_gold: float | None
    drawdown: float
    gold_area: float | None
    final_proxy: float | None


def read_run(samples: Sequence[float], proxy: Sequence[float], gold: Sequence[float], budget: float) -> RunReading:
    gold_gain = [g - gold[0] for g in gold]
    final = value_at_budget(samples, gold_gain, budget)
    proxy_gain = value_at_budget(samples, [p - proxy[0] for p in proxy], budget)
    cut = [g for s, g in zip(samples, gold, strict=True) if s <= budget]
    return RunReading(final, drawdown(cut), gold_area(samples, gold_gain, budget), proxy_gain)


def rule_on_pair(method: dict[int, RunReading], baseline: dict[int, RunReading], sesoi: float, level: float,
                 resamples: int, seed: int) -> tuple[str, str, list[float]]:
    """The pre-registered rule (stats.verdict) on final gold at the budget, method − baseline paired by seed;
    the secondary signs are the drawdown (lower is better, so baseline − method) and the gold area."""
    seeds = sorted(s for s in method if s in baseline and method[s].final_gold is not None
                   and baseline[s].final_gold is not None)
    d = [method[s].final_gold - baseline[s].final_gold for s in seeds]  # type: ignore[operator]
    t_ci = stats.paired_t_ci(d, level)
    b_ci = stats.bootstrap_ci(d, resamples, level, seed)
    dd = [baseline[s].drawdown - method[s].drawdown for s in seeds]
    da = [method[s].gold_area - baseline[s].gold_area for s in seeds  # type: ignore[operator]
          if method[s].gold_area is not None and baseline[s].gold_area is not None]
    signs = [float(np.mean(dd)) if dd else -1.0, float(np.mean(da)) if da else -1.0]
    verdict, why = stats.verdict(t_ci, b_ci, signs, sesoi, gates_hold=True)
    return verdict, why, d


def t_power(differences: Sequence[float], n: int, level: float = 0.95, sims: int = 4000, seed: int = 0) -> float | None:
    """Power of the paired-t half of the PASS rule (lower bound > 0) at n seeds, by simulation from a normal
    with the pilot's mean and sd. The bootstrap half is not simulated (it is the looser of the two at these
    n), and a pilot's mean is itself noisy, so this is an estimate to plan with, not a guarantee."""
    if len(differences) < 2 or n < 2:
        return None
    mu, sd = float(np.mean(differences)), float(np.std(differences, ddof=1))
    rng = np.random.default_rng(seed)
    draws = rng.normal(mu, sd, size=(sims, n))
    half = stats.t_quantile(0.5 + level / 2, n - 1) * draws.std(axis=1, ddof=1) / np.sqrt(n)
    return float(np.mean(draws.mean(axis=1) - half > 0))


def plateau_epoch(values: Sequence[float | None], fraction: float = 0.9) -> int | None:
    """First epoch at which a learning curve reaches `fraction` of its maximum (None if it never rises
    above 0): the steps a critic needs to plateau, to compare with the reset period (G3)."""
    clean = [v if v is not None else -np.inf for v in values]
    top = max(clean, default=-np.inf)
    if not np.isfinite(top) or top <= 0:
        return None
    return next(i for i, v in enumerate(clean) if v >= fraction * top)


def later_half_median(values: Sequence[float | None]) -> float | None:
    """Median of the later half of a per-epoch series (the critic's explained variance before a reset)."""
    kept = [v for v in values if v is not None]
    kept = kept[len(kept) // 2:]
    return float(np.median(kept)) if kept else None
