"""The instrument's controls, recomputed from a benchmark's results.json (issue 31's gates G0-G4).

    PYTHONPATH=shared python benchmarks/overopt/controls.py benchmarks/overopt/results/overopt-v6/results.json

Reads only the per-run curves and train summaries the benchmark wrote, so anyone can recompute them. G0
applies the rule to the oracle (DDPO trained on gold) against DDPO on the proxy, twice: with the metric the
protocol registered (GMP) and with held-out gold at DDPO's final reward-query budget. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rewardtune.testbed import controls, stats

ORACLE, SHUFFLED = "ddpo_gold", "ddpo_shuffled"


def _by_seed(runs: dict, arm: str) -> dict[int, dict]:
    return {r["spec"]["seed"]: r for r in runs.values() if r["spec"]["arm"] == arm}


def _final_gold_at(runs: dict, budget: float) -> dict[str, float]:
    """Each arm's mean held-out gold gain at one budget every arm reached (matched samples)."""
    arms = sorted({r["spec"]["arm"] for r in runs.values()})
    return {a: float(np.mean([controls.read_run(r["curves"]["samples"], r["curves"]["proxy"], r["curves"]["gold"],
                                                budget).final_gold for r in _by_seed(runs, a).values()])) for a in arms}


def _rule_on(metric: dict[int, float | None], base: dict[int, float | None], sesoi: float, p: dict) -> dict:
    d = [metric[s] - base[s] for s in sorted(metric) if s in base and metric[s] is not None and base[s] is not None]
    t_ci = stats.paired_t_ci(d, p["level"])
    b_ci = stats.bootstrap_ci(d, p["bootstrap_resamples"], p["level"], p["bootstrap_seed"])
    verdict, _ = stats.verdict(t_ci, b_ci, [1.0], sesoi, gates_hold=True)
    return {"n": len(d), "mean": float(np.mean(d)) if d else None, "t_ci": t_ci and [t_ci.low, t_ci.high],
            "verdict": verdict, "power_at_n": controls.t_power(d, len(d), p["level"]), "differences": d}


def analyze(res: dict, critic_neurons: int | None, drop: float) -> dict:
    runs, proto = res["runs"], res["protocol"]
    p = proto["primary"]
    sesoi = p["sesoi_fraction"] * p["proxy_gain"]
    base, oracle = _by_seed(runs, proto["baseline"]), _by_seed(runs, ORACLE)
    out: dict = {"sesoi": sesoi}
    gmp = {s: r["metrics"]["gmp"] for s, r in base.items()}
    out["G0_gmp"] = _rule_on({s: r["metrics"]["gmp"] for s, r in oracle.items()}, gmp, sesoi, p)
    budget = min(r["curves"]["samples"][-1] for r in base.values())
    common = min(r["curves"]["samples"][-1] for r in runs.values())
    readings = {arm: {s: controls.read_run(r["curves"]["samples"], r["curves"]["proxy"], r["curves"]["gold"], budget)
                      for s, r in _by_seed(runs, arm).items()} for arm in {r["spec"]["arm"] for r in runs.values()}}
    verdict, why, d = controls.rule_on_pair(readings[ORACLE], readings[proto["baseline"]], sesoi, p["level"],
                                            p["bootstrap_resamples"], p["bootstrap_seed"])
    out["G0_final_gold"] = {"budget": budget, "verdict": verdict, "reason": why, "mean": float(np.mean(d)),
                            "t_ci": (ci := stats.paired_t_ci(d, p["level"])) and [ci.low, ci.high],
                            "power_at_n": controls.t_power(d, len(d), p["level"])}
    shuffled = _by_seed(runs, SHUFFLED)
    out["shuffled"] = {"gmp_mean": float(np.mean([r["metrics"]["gmp"] for r in shuffled.values()])),
                       "baseline_gmp_mean": float(np.mean(list(gmp.values()))),
                       "final_proxy_gain_mean": float(np.mean([r["metrics"]["final_proxy_gain"] for r in shuffled.values()]))}
    falls = [controls.peaks_then_falls(r["curves"]["gold"], r["curves"]["proxy"], drop) for r in base.values()]
    fit = res["arms"][proto["baseline"]].get("sqrt_kl_fit") or {}
    out["G1"] = {"peak_then_fall": f"{sum(falls)}/{len(falls)}", "fraction": sum(falls) / len(falls),
                 "drawdown_mean": float(np.mean([readings[proto["baseline"]][s].drawdown for s in base])),
                 "final_gold_gain": _final_gold_at(runs, common),
                 "gao_beta": fit.get("beta"), "gao_beta_ci": (fit.get("ci") or {}).get("beta")}
    tdpo = _by_seed(runs, "tdpo")
    if tdpo:
        first = [next(iter(r["curves"]["reset_epochs"] or []), None) for r in _by_seed(runs, "tdpo_r").values()]
        horizon = min((e for e in first if e is not None), default=len(next(iter(tdpo.values()))["train"]["explained_variance"]))
        per_epoch = np.array([[v if v is not None else np.nan for v in r["train"]["explained_variance"][:horizon]]
                              for r in tdpo.values()])
        out["G2"] = {"epochs_before_first_reset": horizon,
                     "ev_mean_by_epoch": [float(x) for x in np.nanmean(per_epoch, axis=0)],
                     "ev_later_half_median": float(np.median([controls.later_half_median(list(row)) for row in per_epoch])),
                     "ev_last_third_median": (res["arms"]["tdpo"].get("explained_variance_thirds_before_reset_mean") or [None] * 3)[2]}
    # run_config gives CDPO one fidelity constraint, so CDPO trains two critics (the main reward's and its own)
    critics = {"tdpo_r": 1, "cdpo": 2}
    fractions = [1 - n / (critics[arm] * critic_neurons) for arm in critics for r in _by_seed(runs, arm).values()
                 for n in r["curves"]["neurons_reset"]] if critic_neurons else []
    if fractions:
        out["G3"] = {"critic_neurons": critic_neurons, "dormant_fraction_range": [min(fractions), max(fractions)],
                     "dormant_fraction_median": float(np.median(fractions))}
    margin = proto["cdpo_fidelity_margin"] + proto["secondary"]["fidelity_tolerance"]
    violated = [r["metrics"]["final_fidelity_change"] < -margin for r in base.values()]
    out["G4"] = {"violations": f"{sum(violated)}/{len(violated)}", "fraction": sum(violated) / len(violated),
                 "fidelity_change_mean": float(np.mean([r["metrics"]["final_fidelity_change"] for r in base.values()]))}
    out["common_budget"] = common
    out["samples_at_final"] = {a: sorted({r["curves"]["samples"][-1] for r in _by_seed(runs, a).values()}) for a in readings}
    return out


def _f(v: float | None, d: int = 4) -> str:
    return "—" if v is None else f"{v:+.{d}f}"


def markdown(o: dict, name: str) -> str:
    g0, g0f, sh, g1 = o["G0_gmp"], o["G0_final_gold"], o["shuffled"], o["G1"]
    ci = lambda c: "—" if not c else f"[{c[0]:+.4f}, {c[1]:+.4f}]"  # noqa: E731
    lines = [f"### Controls of {name} (benchmarks/overopt/controls.py)", "", "| check | measured | holds |", "|---|---|---|",
             f"| G0 oracle − DDPO, registered metric GMP(0.02), n={g0['n']} | δ {_f(g0['mean'])}, t {ci(g0['t_ci'])}, rule: **{g0['verdict']}**, t-power {g0['power_at_n']:.2f} | {'yes' if g0['verdict'] == 'PASS' else 'no'} |",
             f"| G0 oracle − DDPO, final held-out gold at {g0f['budget']} queries | δ {_f(g0f['mean'])}, t {ci(g0f['t_ci'])}, rule: **{g0f['verdict']}**, t-power {g0f['power_at_n']:.2f} | {'yes' if g0f['verdict'] == 'PASS' else 'no'} |",
             f"| shuffled proxy: GMP mean vs DDPO's | {sh['gmp_mean']:.4f} vs {sh['baseline_gmp_mean']:.4f} (final proxy gain {_f(sh['final_proxy_gain_mean'])}) | — |",
             f"| G1 DDPO gold peaks then falls ≥ 0.02 while proxy rises | {g1['peak_then_fall']} seeds (mean drawdown {g1['drawdown_mean']:.4f}) | {'yes' if g1['fraction'] >= 0.7 else 'no'} |",
             f"| G1 Gao fit β (gold vs √KL), 95% CI | {_f(g1['gao_beta'], 5)} {ci(g1['gao_beta_ci'])} | {'yes' if g1['gao_beta_ci'] and g1['gao_beta_ci'][0] > 0 else 'no'} |"]
    if "G2" in o:
        g2 = o["G2"]
        lines.append(f"| G2 TDPO critic EV, later half of the {g2['epochs_before_first_reset']} epochs before the first reset (median over seeds); last third of steps | {g2['ev_later_half_median']:.3f}; {_f(g2['ev_last_third_median'], 3)} | {'yes' if g2['ev_later_half_median'] >= 0.3 and (g2['ev_last_third_median'] or 0) >= 0.6 else 'no'} |")
    if "G3" in o:
        g3 = o["G3"]
        lo, hi = g3["dormant_fraction_range"]
        lines.append(f"| G3 dormant fraction at a reset ({g3['critic_neurons']} neurons per critic) | median {g3['dormant_fraction_median']:.1%}, range {lo:.1%}–{hi:.1%} | {'yes' if lo >= 0.1 and hi <= 0.9 else 'no'} |")
    g4 = o["G4"]
    lines.append(f"| G4 DDPO breaks the fidelity margin at the end | {g4['violations']} seeds (mean change {_f(g4['fidelity_change_mean'])}) | {'yes' if g4['fraction'] >= 0.7 else 'no'} |")
    lines += ["", f"Final held-out gold gain at {o['common_budget']} queries (every arm reached it), mean over seeds: "
              + ", ".join(f"{a} {_f(v)}" for a, v in sorted(g1["final_gold_gain"].items())),
              "Reward queries at the last checkpoint: " + ", ".join(f"{a} {v}" for a, v in sorted(o["samples_at_final"].items()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--critic-neurons", type=int, default=None,
                        help="critic hidden units (default: the sum of the protocol config's critic.hidden_sizes)")
    parser.add_argument("--drop", type=float, default=0.02, help="gold fall after its peak that counts as overoptimization")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        res = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        print(f"error: results: cannot read {args.results} as JSON ({e}); pass a benchmark's results.json", file=sys.stderr)
        return 2
    neurons = args.critic_neurons
    if neurons is None:
        from rewardtune.config import load_config
        from rewardtune.testbed.benchmark import REPO
        neurons = sum(load_config(REPO / res["protocol"]["config"]).algorithm.critic.hidden_sizes)
    out = analyze(res, neurons, args.drop)
    print(json.dumps(out, indent=1) if args.json else markdown(out, res["protocol"]["name"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
