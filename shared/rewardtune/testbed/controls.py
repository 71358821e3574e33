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
from typing import Any

import numpy as np

from rewardtune.testbed import stats
from rewardtune.testbed.protocol import Protocol


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


# ------------------------------------------------------------------ the gates and δ's of a final_gold protocol
def _readings(runs: dict[int, dict[str, Any]], budget: float) -> dict[int, RunReading]:
    return {s: read_run(r["curves"]["samples"], r["curves"]["proxy"], r["curves"]["gold"], budget) for s, r in runs.items()}


def budget_of(p: Protocol, by_arm: dict[str, dict[int, dict[str, Any]]]) -> float:
    """The protocol's reward-query budget, or the smallest final count any run reached (matched samples)."""
    return float(p.primary.budget) if p.primary.budget is not None else float(
        min(r["curves"]["samples"][-1] for runs in by_arm.values() for r in runs.values()))


def instrument_gates(p: Protocol, by_arm: dict[str, dict[int, dict[str, Any]]], oracle: str, shuffled: str,
                     reset_every: dict[str, int]) -> dict[str, dict[str, Any]]:
    """G0-G4 of issue 31 from the runs' curves and train summaries (pure). `reset_every[arm]` is each arm's
    reset period in epochs (for G3's plateau check)."""
    g, pr = p.gates.instrument, p.primary
    assert g is not None and pr.sesoi is not None
    budget = budget_of(p, by_arm)
    base = _readings(by_arm.get(p.baseline, {}), budget)
    out: dict[str, dict[str, Any]] = {}
    verdict, why, d = rule_on_pair(_readings(by_arm.get(oracle, {}), budget), base, pr.sesoi, pr.level,
                                   pr.bootstrap_resamples, pr.bootstrap_seed)
    power = t_power(d, len(p.seeds), pr.level)
    out["G0_oracle"] = {"holds": verdict == stats.PASS and power is not None and power >= g.power, "verdict": verdict,
                        "reason": why, "differences": d, "power_at_planned_seeds": power,
                        "rule": f"the rule gives {oracle} − {p.baseline} PASS with ≥ {g.power:.0%} power at {len(p.seeds)} seeds"}
    shuf = [x.final_proxy for x in _readings(by_arm.get(shuffled, {}), budget).values() if x.final_proxy is not None]
    out["G0_shuffled"] = {"holds": bool(shuf) and float(np.mean(shuf)) < pr.proxy_gain, "final_proxy_gains": shuf,
                          "rule": f"DDPO on the shuffled proxy gains < +{pr.proxy_gain} held-out proxy"}
    runs = by_arm.get(p.baseline, {})
    falls = [peaks_then_falls([g_ for s_, g_ in zip(r["curves"]["samples"], r["curves"]["gold"], strict=True) if s_ <= budget],
                              [q for s_, q in zip(r["curves"]["samples"], r["curves"]["proxy"], strict=True) if s_ <= budget],
                              g.drop) for r in runs.values()]
    share = sum(falls) / len(falls) if falls else 0.0
    out["G1_overoptimization"] = {"holds": share >= g.overoptimized_fraction, "seeds": f"{sum(falls)}/{len(falls)}",
                                  "drawdowns": [x.drawdown for x in base.values()],
                                  "rule": f"{p.baseline}'s gold peaks then falls ≥ {g.drop} while its proxy rises in "
                                          f"≥ {g.overoptimized_fraction:.0%} of seeds (the Gao fit's β is reported beside)"}
    critic_arms = [a.name for a in p.arms if a.algorithm == "tdpo"]
    ev = [later_half_median((r["train"].get("explained_variance") or [])[:_horizon(r, reset_every.get(a))])
          for a in critic_arms for r in by_arm.get(a, {}).values()]
    ev_last = [later_half_median((r["train"].get("explained_variance_last_third") or [])[:_horizon(r, reset_every.get(a))])
               for a in critic_arms for r in by_arm.get(a, {}).values()]
    ev_m, ev_l = _median(ev), _median(ev_last)
    out["G2_critic_learns"] = {"holds": ev_m is not None and ev_l is not None and ev_m >= g.critic_ev and ev_l >= g.critic_ev_last_third,
                               "ev_median": ev_m, "ev_last_third_median": ev_l, "arms": critic_arms,
                               "rule": f"TDPO's critic EV ≥ {g.critic_ev} (all steps) and ≥ {g.critic_ev_last_third} "
                                       "(last third), later half before the first reset, medians over seeds"}
    reset_arms = [a.name for a in p.arms if a.algorithm in ("tdpo_r", "cdpo")]
    dormant = [f for a in reset_arms for r in by_arm.get(a, {}).values() for f in r["train"].get("dormant_fraction_at_reset") or []]
    plateaus = [plateau_epoch((r["train"].get("explained_variance") or [])[:_horizon(r, reset_every.get(a))])
                for a in critic_arms for r in by_arm.get(a, {}).values()]
    period = min((reset_every[a] for a in reset_arms if a in reset_every), default=None)
    plateau = _median([float(x) for x in plateaus if x is not None])
    in_range = bool(dormant) and g.dormant_low <= float(np.median(dormant)) <= g.dormant_high
    out["G3_reset_hits_learned_neurons"] = {
        "holds": in_range and period is not None and plateau is not None and period >= 2 * (plateau + 1),
        "dormant_median": _median(dormant), "plateau_epoch_median": plateau, "reset_every": period,
        "rule": f"median dormant share at a reset in [{g.dormant_low}, {g.dormant_high}] and the reset period ≥ 2× the "
                "epochs the critic needs to reach 90% of its explained variance"}
    fid = [r["curves"]["fidelity"][-1] - r["curves"]["fidelity"][0] for r in runs.values()]
    limit = -(p.cdpo_fidelity_margin + p.secondary.fidelity_tolerance)
    broken = [f < limit for f in fid]
    out["G4_constraint_has_work"] = {"holds": bool(broken) and sum(broken) / len(broken) >= g.violated_fraction,
                                     "seeds": f"{sum(broken)}/{len(broken)}", "fidelity_changes": fid,
                                     "rule": f"{p.baseline}'s held-out fidelity ends below base − {-limit:.2f} in "
                                             f"≥ {g.violated_fraction:.0%} of seeds"}
    return out


def _horizon(run: dict[str, Any], reset_every: int | None) -> int:
    """Epochs before the first reset: the run's own, else its arm's period, else all."""
    first = run["train"].get("first_reset_epoch")
    if first is not None:
        return int(first)
    return int(reset_every) if reset_every else len(run["train"].get("explained_variance") or [])


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def final_gold_delta(p: Protocol, by_arm: dict[str, dict[int, dict[str, Any]]], arm: str, gates_hold: bool) -> dict[str, Any]:
    """δ of one method arm on final gold at the budget, with the proxy non-inferiority condition (pure)."""
    pr = p.primary
    assert pr.sesoi is not None
    budget = budget_of(p, by_arm)
    method, base = _readings(by_arm.get(arm, {}), budget), _readings(by_arm.get(p.baseline, {}), budget)
    verdict, why, d = rule_on_pair(method, base, pr.sesoi, pr.level, pr.bootstrap_resamples, pr.bootstrap_seed)
    seeds = [s for s in sorted(method) if s in base and method[s].final_proxy is not None and base[s].final_proxy is not None]
    dp = [method[s].final_proxy - base[s].final_proxy for s in seeds]  # type: ignore[operator]
    proxy_ci = stats.paired_t_ci(dp, pr.level)
    comparable = proxy_ci is not None and proxy_ci.low > -pr.proxy_margin
    if not gates_hold:
        verdict, why = stats.NO_VERDICT, "a validity gate failed"
    elif verdict == stats.PASS and not comparable:
        verdict, why = stats.INCONCLUSIVE, f"gold up, but its proxy gain may be below {p.baseline}'s by more than {pr.proxy_margin}"
    t_ci = stats.paired_t_ci(d, pr.level)
    b_ci = stats.bootstrap_ci(d, pr.bootstrap_resamples, pr.level, pr.bootstrap_seed)
    return {"budget": budget, "differences": d, "t_ci": None if t_ci is None else t_ci.as_dict(),
            "bootstrap_ci": None if b_ci is None else b_ci.as_dict(),
            "proxy_differences": dp, "proxy_t_ci": None if proxy_ci is None else proxy_ci.as_dict(),
            "proxy_comparable": comparable, "sesoi": pr.sesoi, "verdict": verdict, "reason": why,
            "drawdown_delta": float(np.mean([base[s].drawdown - method[s].drawdown for s in seeds])) if seeds else None,
            "gold_area_delta": float(np.mean([method[s].gold_area - base[s].gold_area for s in seeds  # type: ignore[operator]
                                              if method[s].gold_area is not None and base[s].gold_area is not None])) if seeds else None}


def cross_reward_table(p: Protocol, by_arm: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The papers' cross-reward table in small: each arm's change over its base model, at the budget, in the
    training proxy, gold, fidelity and every unseen reward (mean, sd, n over seeds)."""
    budget = budget_of(p, by_arm)
    table: dict[str, dict[str, Any]] = {}
    for arm, runs in by_arm.items():
        row: dict[str, Any] = {}
        for reward in ("proxy", "gold", "fidelity", *p.unseen_rewards):
            gains = []
            for r in runs.values():
                c = r["curves"]
                series = c.get(reward) if reward in ("proxy", "gold", "fidelity") else (c.get("unseen") or {}).get(reward)
                if series and None not in series:
                    v = value_at_budget(c["samples"], [x - series[0] for x in series], budget)
                    if v is not None:
                        gains.append(v)
            row[reward] = {"mean": float(np.mean(gains)) if gains else None,
                           "sd": float(np.std(gains, ddof=1)) if len(gains) > 1 else None, "n": len(gains)}
        table[arm] = row
    return {"budget": budget, "rewards": ["proxy", "gold", "fidelity", *p.unseen_rewards], "arms": table}
