"""`rewardtune testbed benchmark`: the pre-registered overoptimization benchmark (benchmarks/overopt/PROTOCOL.md).

Every arm × seed (plus the control runs of the validity gates) is one directory under `DIR/runs/`; a run
is finished when its `result.json` exists, so a killed benchmark continues with the runs it has not
finished, and a killed run resumes from its newest checkpoint (the trainer's resume) and skips the
checkpoints already evaluated. `analyze` turns the per-run records into the δ's, intervals, gates and
verdicts (pure: no model), and `write_results` writes results.json, results.md and results.html.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from rewardtune.checkpoint import write_json_atomic, write_text_atomic
from rewardtune.testbed import stats
from rewardtune.testbed.controls import cross_reward_table, final_gold_delta, instrument_gates
from rewardtune.testbed.protocol import Protocol, load_protocol, smoke

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
GOLD_CONTROL, SHUFFLED_CONTROL = "ddpo_gold", "ddpo_shuffled"


@dataclass(frozen=True)
class RunSpec:
    arm: str
    algorithm: str
    seed: int
    reward: str = "testbed_proxy"
    overrides: list[str] = field(default_factory=list)
    control: bool = False

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def plan(p: Protocol) -> list[RunSpec]:
    """Every run of the protocol: arms × seeds, seed-major (a partial benchmark has whole pairs first), then controls."""
    runs = [RunSpec(a.name, a.algorithm, seed, overrides=list(a.overrides)) for seed in p.seeds for a in p.arms]
    base = next(a for a in p.arms if a.name == p.baseline)
    for arm, control in ((GOLD_CONTROL, p.gates.gold_trained), (SHUFFLED_CONTROL, p.gates.shuffled_proxy)):
        runs += [RunSpec(arm, base.algorithm, seed, control.reward, list(base.overrides), True) for seed in control.seeds]
    return runs


def run_config(p: Protocol, spec: RunSpec, prompts_dir: Path):
    """The protocol's shared config with this run's algorithm, seed, reward, overrides, budget and evaluation."""
    from rewardtune.config import ConstraintConfig, RewardSpec, RunConfig, apply_overrides, load_config
    from rewardtune.testbed.compare import FIDELITY, GOLD, PROXY

    config = Path(p.config) if Path(p.config).is_absolute() else REPO / p.config
    data = load_config(config).model_dump(mode="json")
    data["algorithm"]["name"] = spec.algorithm  # before the arm's overrides, so an arm's own section (grpo's group) is valid
    data["algorithm"]["constraints"] = []
    if spec.algorithm == "cdpo":
        bound = ({"relative_margin": p.cdpo_fidelity_margin} if p.cdpo_fidelity_threshold is None
                 else {"threshold": p.cdpo_fidelity_threshold})
        constraint = ConstraintConfig(reward=RewardSpec(name=FIDELITY), **bound)
        data["algorithm"]["constraints"] = [constraint.model_dump(mode="json")]
    data = apply_overrides(data, spec.overrides)
    data["reward"] = {"name": spec.reward}
    # every run is judged on the same three rewards; the one it trains on is scored as its training reward
    data["eval_rewards"] = [{"name": n} for n in (PROXY, GOLD, FIDELITY, *p.unseen_rewards) if n != spec.reward]
    data["training"] |= {"seed": spec.seed, "epochs": p.epochs}
    data["prompts"]["source"] = str(prompts_dir / "train.txt")
    data["checkpointing"] |= {"keep_last": 10_000, "every_epochs": p.checkpoint_every}
    data["evaluation"] |= {"num_heldout_prompts": p.heldout_prompts, "num_train_prompts": 0,
                           "images_per_prompt": p.images_per_prompt}
    data["logging"]["progress_bars"] = False
    return RunConfig.model_validate(data)


# ------------------------------------------------------------------------------------------- one run
EV_WINDOW = 4  # epochs averaged for the critic's explained variance before its first reset
THIRDS = ("first", "middle", "last")  # of the denoising steps, as the trainer logs them


def _mean_of_last(values: list[float | None], n: int) -> float | None:
    kept = [v for v in values if v is not None][-n:]
    return float(np.mean(kept)) if kept else None


def train_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The calibration indicators of one run from its metrics.jsonl records. One epoch's explained variance
    rests on 16 trajectories (sd ~0.2 between epochs), so the mean over the last EV_WINDOW epochs before
    the first reset is reported next to the last epoch's, and that mean per third of the denoising steps
    (the critic can explain the last third, where x_t shows the image, but hardly the first)."""
    first_reset = next((r["epoch"] for r in records if r.get("reset")), None)
    before = [r for r in records if first_reset is None or r["epoch"] <= first_reset]
    ev = [r["value_explained_variance"] for r in before if r.get("value_explained_variance") is not None]
    kl = [r["approx_kl"] for r in records]
    return {
        "epoch0_approx_kl": records[0]["approx_kl"] if records else None,
        "epoch0_clipfrac": records[0]["clipfrac"] if records else None,
        "approx_kl": kl, "clipfrac": [r["clipfrac"] for r in records],
        "median_approx_kl": float(np.median(kl)) if kl else None,
        "explained_variance_before_reset": ev[-1] if ev else None,
        "explained_variance_before_reset_mean": _mean_of_last(ev, EV_WINDOW),
        "explained_variance": [r.get("value_explained_variance") for r in records],
        "explained_variance_last_third": [r.get("value_explained_variance_last_third") for r in records],
        "first_reset_epoch": first_reset,
        "dormant_fraction_at_reset": [r.get("dormant_fraction") for r in records if r.get("reset")],
        "explained_variance_thirds_before_reset_mean": [
            _mean_of_last([r.get(f"value_explained_variance_{t}_third") for r in before], EV_WINDOW) for t in THIRDS],
        "optimizer_steps_per_epoch": records[0]["global_step"] if records else None,
        "train_constraint": [r.get("constraint_testbed_fidelity") for r in records],
        "threshold": next((r["threshold_testbed_fidelity"] for r in records if r.get("threshold_testbed_fidelity") is not None), None),
    }


def execute(p_json: str, spec_json: str, out: str, threads: int) -> dict[str, Any]:
    """Train (resuming), evaluate every checkpoint, measure path KL; writes and returns the run's result.json."""
    import torch

    from rewardtune.evaluate import evaluate_run
    from rewardtune.metrics import MetricsLog
    from rewardtune.testbed.compare import run_curves
    from rewardtune.testbed.probes import checkpoint_path_kl
    from rewardtune.trainer import Trainer

    torch.set_num_threads(threads)
    p, spec = Protocol.model_validate_json(p_json), RunSpec(**json.loads(spec_json))
    root = Path(out)
    run_dir, eval_dir, prompts_dir = root / "runs" / spec.name, root / "evals" / spec.name, root / "prompts"
    cfg = run_config(p, spec, prompts_dir)
    t0 = time.perf_counter()
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.is_file() and len(MetricsLog(metrics).read()) >= cfg.training.epochs):
        Trainer(cfg, run_dir).run(resume=run_dir.exists())
    t1 = time.perf_counter()
    evaluate_run(cfg, run_dir, prompts_dir, eval_dir)
    t2 = time.perf_counter()
    curves = run_curves(run_dir, eval_dir, p.unseen_rewards)
    kl_file = run_dir / "path_kl.json"
    kl = json.loads(kl_file.read_text()) if kl_file.is_file() else {}
    missing = [c for c in curves["checkpoint"] if c not in kl]
    if missing:
        kl |= checkpoint_path_kl(cfg, run_dir, prompts_dir, missing, p.secondary.path_kl_prompts, p.secondary.path_kl_images)
        write_json_atomic(kl_file, kl)
    curves["path_kl"] = [kl[c] for c in curves["checkpoint"]]
    result = {"spec": asdict(spec), "name": spec.name, "curves": curves, "train": train_summary(MetricsLog(metrics).read()),
              "timing": {"train_s": t1 - t0, "eval_s": t2 - t1, "path_kl_s": time.perf_counter() - t2}}
    write_json_atomic(run_dir / "result.json", result)
    return result


# ------------------------------------------------------------------------------------------- analysis
def run_metrics(c: dict[str, Any], at: float) -> dict[str, Any]:
    """Per run: GMP and the secondary metrics, all as gains over the run's base checkpoint."""
    from rewardtune.testbed.compare import gold_at_proxy_gain

    proxy_gain = [v - c["proxy"][0] for v in c["proxy"]]
    gold_gain = [v - c["gold"][0] for v in c["gold"]]

    def at_gain(values: list[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        fit = stats.gmp(proxy_gain, values, at)
        return None if fit is None else fit - values[0]

    interpolated = gold_at_proxy_gain(c, at)
    return {
        "gmp": at_gain(c["gold"]),
        "reached": max(proxy_gain) >= at,
        "max_proxy_gain": max(proxy_gain),
        "gold_at_gain_interpolated": None if interpolated is None else interpolated - c["gold"][0],
        "final_gold_gain": gold_gain[-1],
        "final_proxy_gain": proxy_gain[-1],
        "fidelity_at_gain": at_gain(c["fidelity"]),
        "diversity_at_gain": at_gain(c["diversity"]),
        "final_fidelity_change": c["fidelity"][-1] - c["fidelity"][0],
        "sqrt_kl": [math.sqrt(max(v, 0.0)) for v in c.get("path_kl") or []],
        "gold_gain": gold_gain,
        "proxy_gain": proxy_gain,
    }


def _paired(a: dict[int, float | None], b: dict[int, float | None]) -> list[float]:
    return [a[s] - b[s] for s in sorted(a) if s in b and a[s] is not None and b[s] is not None]


def _interval(ci: stats.Interval | None) -> dict[str, Any] | None:
    return None if ci is None else ci.as_dict()


def _one_sample_lower(values: list[float], level: float) -> float | None:
    ci = stats.paired_t_ci(values, level)
    if ci is None:
        return values[0] if values else None
    return ci.low


def analyze(p: Protocol, records: list[dict[str, Any]], best_of_n: list[dict[str, Any]] | None,
            probes: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Per-run metrics, gates, per-arm δ's with intervals, verdicts and the secondary analyses (pure)."""
    at, pr = p.primary.proxy_gain, p.primary
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        m = run_metrics(r["curves"], at)
        r["metrics"] = m
        by_arm.setdefault(r["spec"]["arm"], {})[r["spec"]["seed"]] = r
    arms = [a.name for a in p.arms]

    gates: dict[str, dict[str, Any]] = {}
    gold_runs = [r["metrics"]["final_gold_gain"] for r in by_arm.get(GOLD_CONTROL, {}).values()]
    low = _one_sample_lower(gold_runs, pr.level)
    gates["gold_trained"] = {"holds": low is not None and low > 0, "final_gold_gains": gold_runs, "lower_bound": low,
                             "rule": "DDPO trained on gold raises held-out gold (95% lower bound of the gain > 0)"}
    reach = {a: [bool(r["metrics"]["reached"]) for r in by_arm.get(a, {}).values()] for a in arms}
    gates["reach"] = {"holds": all(sum(reach[a]) >= p.gates.reach_fraction * len(p.seeds) for a in arms),
                      "reached": {a: f"{sum(v)}/{len(v)}" for a, v in reach.items()},
                      "rule": f"≥ {p.gates.reach_fraction:.0%} of each arm's {len(p.seeds)} runs reach proxy gain +{at}"}
    shuffled = [r["metrics"]["final_proxy_gain"] for r in by_arm.get(SHUFFLED_CONTROL, {}).values()]
    shuffled_gold = [r["metrics"]["final_gold_gain"] for r in by_arm.get(SHUFFLED_CONTROL, {}).values()]
    gates["shuffled_proxy"] = {"holds": bool(shuffled) and float(np.mean(shuffled)) < at,
                               "final_proxy_gains": shuffled, "final_gold_gains": shuffled_gold,
                               "rule": f"DDPO on the shuffled proxy gains < +{at} held-out proxy (the arms' proxy gain is not generic drift)"}
    bon_ok = bool(best_of_n) and best_of_n[-1]["gold_gain"] > 0 and best_of_n[-1]["proxy_gain"] > 0
    gates["best_of_n"] = {"holds": bon_ok, "table": best_of_n or [],
                          "rule": "best-of-n by the proxy on base samples raises proxy and gold at the largest n (the proxy is informative in distribution)"}
    gates["probes"] = {"holds": True, "table": probes or [], "rule": "documented, not a pass/fail gate"}
    final_gold = p.primary.metric == "final_gold"
    if final_gold:  # issue 31: the instrument's own gates replace reach and the old gold gate
        for key in ("reach", "gold_trained", "shuffled_proxy"):
            gates[key]["holds"], gates[key]["rule"] = True, "reported only: " + gates[key]["rule"]
        every = {a.name: run_config(p, RunSpec(a.name, a.algorithm, p.seeds[0], overrides=list(a.overrides)),
                                    Path(".")).algorithm.reset.every for a in p.arms}
        gates |= instrument_gates(p, by_arm, GOLD_CONTROL, SHUFFLED_CONTROL, every)
    gates_hold = all(g["holds"] for g in gates.values()) and not p.smoke

    baseline = by_arm.get(p.baseline, {})
    base_m = {s: r["metrics"] for s, r in baseline.items()}
    arms_out: dict[str, Any] = {}
    for a in arms + [GOLD_CONTROL, SHUFFLED_CONTROL]:
        runs = by_arm.get(a, {})
        ms = {s: r["metrics"] for s, r in runs.items()}
        entry: dict[str, Any] = {"runs": len(runs)}
        for key in ("gmp", "final_gold_gain", "gold_at_gain_interpolated", "fidelity_at_gain", "diversity_at_gain",
                    "final_fidelity_change", "max_proxy_gain"):
            vals = [m[key] for m in ms.values() if m[key] is not None]
            entry[key] = {"mean": float(np.mean(vals)) if vals else None,
                          "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals)}
        train = [r["train"] for r in runs.values()]
        for key in ("epoch0_approx_kl", "epoch0_clipfrac", "median_approx_kl", "explained_variance_before_reset",
                    "explained_variance_before_reset_mean"):
            vals = [t[key] for t in train if t.get(key) is not None]
            entry[key] = float(np.median(vals)) if vals else None
        thirds = [t.get("explained_variance_thirds_before_reset_mean") or [None] * 3 for t in train]
        entry["explained_variance_thirds_before_reset_mean"] = [
            float(np.median(col)) if (col := [v[i] for v in thirds if v[i] is not None]) else None for i in range(3)]
        thresholds = [(t["threshold"], t["train_constraint"][-1]) for t in train if t.get("threshold") is not None]
        tol = p.secondary.fidelity_tolerance
        margin = p.cdpo_fidelity_margin
        entry["constraint_met"] = {  # held-out fidelity at the end vs base - margin - tolerance (every arm, same rule)
            "heldout": sum(m["final_fidelity_change"] >= -margin - tol for m in ms.values()), "of": len(ms),
            "train": sum(j >= c - tol for c, j in thresholds) if thresholds else None,
        }
        points = [(m["sqrt_kl"], m["gold_gain"]) for m in ms.values() if m["sqrt_kl"]]
        fit = stats.fit_gold_vs_sqrt_kl([v for d, _ in points for v in d], [v for _, g in points for v in g]) if points else None
        entry["sqrt_kl_fit"] = None if fit is None else {
            "alpha": fit[0], "beta": fit[1],
            "ci": stats.bootstrap_fit(points, p.secondary.fit_resamples, pr.bootstrap_seed, pr.level)}
        if a != p.baseline and a in arms and final_gold:
            entry["delta"] = final_gold_delta(p, by_arm, a, gates_hold)
            if p.smoke:
                entry["delta"] |= {"verdict": stats.NO_VERDICT, "reason": "smoke protocol: machinery check only, never a verdict"}
        elif a != p.baseline and a in arms:
            gm = {s: m["gmp"] for s, m in ms.items()}
            d = _paired(gm, {s: m["gmp"] for s, m in base_m.items()})
            t_ci = stats.paired_t_ci(d, pr.level)
            b_ci = stats.bootstrap_ci(d, pr.bootstrap_resamples, pr.level, pr.bootstrap_seed)
            secondary = {}
            for key in ("final_gold_gain", "gold_at_gain_interpolated"):
                dd = _paired({s: m[key] for s, m in ms.items()}, {s: m[key] for s, m in base_m.items()})
                secondary[key] = float(np.mean(dd)) if dd else None
            for key in ("fidelity_at_gain", "diversity_at_gain"):
                dd = _paired({s: m[key] for s, m in ms.items()}, {s: m[key] for s, m in base_m.items()})
                secondary[key] = {"mean": float(np.mean(dd)) if dd else None, "t_ci": _interval(stats.paired_t_ci(dd, pr.level))}
            signs = [v if v is not None else -1.0 for v in (secondary["final_gold_gain"], secondary["gold_at_gain_interpolated"])]
            sesoi = pr.sesoi_fraction * at
            v, why = stats.verdict(t_ci, b_ci, signs, sesoi, gates_hold)
            if p.smoke:
                v, why = stats.NO_VERDICT, "smoke protocol: machinery check only, never a verdict"
            entry["delta"] = {"differences": d, "t_ci": _interval(t_ci), "bootstrap_ci": _interval(b_ci),
                              "secondary": secondary, "sesoi": sesoi, "verdict": v, "reason": why}
        arms_out[a] = entry
    return {"protocol": p.model_dump(), "gates": gates, "gates_hold": gates_hold, "arms": arms_out,
            "cross_reward": cross_reward_table(p, by_arm),
            "runs": {r["name"]: {"spec": r["spec"], "metrics": r["metrics"], "train": r["train"], "curves": r["curves"],
                                 "timing": r["timing"]} for r in records}}


# ------------------------------------------------------------------------------------------- report
def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "—"
        return f"{v['mean']:.{digits}f}" + (f" ± {v['sd']:.{digits}f}" if v.get("sd") is not None else "")
    return f"{v:.{digits}f}"


def _ci(ci: dict[str, Any] | None) -> str:
    return "—" if ci is None else f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"


def markdown(res: dict[str, Any], meta: dict[str, Any]) -> str:
    p = res["protocol"]
    at = p["primary"]["proxy_gain"]
    arms = [a["name"] for a in p["arms"]]
    lines = [f"# Overoptimization benchmark: {p['name']}" + (" (SMOKE — machinery check, no verdict)" if p["smoke"] else ""), "",
             f"{len(arms)} arms × {len(p['seeds'])} paired seeds, {p['epochs']} epochs, checkpoints every "
             f"{p['checkpoint_every']}, held-out evaluation {p['heldout_prompts']} prompts × {p['images_per_prompt']} "
             f"images (fixed noise). Primary: GMP({at}) = gold gain at +{at} held-out proxy gain (per-run least-squares line), "
             f"δ = arm − {p['baseline']} paired by seed, paired t and {p['primary']['bootstrap_resamples']}-resample bootstrap "
             f"{p['primary']['level']:.0%} intervals.", "", "## Validity gates", "", "| gate | holds | detail |", "|---|---|---|"]
    g = res["gates"]
    lines.append(f"| DDPO on gold raises gold | {g['gold_trained']['holds']} | gains {[round(x, 4) for x in g['gold_trained']['final_gold_gains']]}, lower bound {_f(g['gold_trained']['lower_bound'], 4)} |")
    lines.append(f"| runs reach +{at} proxy | {g['reach']['holds']} | {g['reach']['reached']} |")
    lines.append(f"| shuffled proxy ≠ proxy gain | {g['shuffled_proxy']['holds']} | proxy gains {[round(x, 4) for x in g['shuffled_proxy']['final_proxy_gains']]}, gold gains {[round(x, 4) for x in g['shuffled_proxy']['final_gold_gains']]} |")
    bon = g["best_of_n"]["table"]
    lines.append(f"| best-of-n informative | {g['best_of_n']['holds']} | n = {bon[-1]['n'] if bon else '—'}: proxy {_f(bon[-1]['proxy_gain'] if bon else None, 4)}, gold {_f(bon[-1]['gold_gain'] if bon else None, 4)} |")
    for key, gate in g.items():
        if key.startswith("G"):
            detail = {k: v for k, v in gate.items() if k not in ("holds", "rule", "differences", "drawdowns",
                                                               "fidelity_changes", "final_proxy_gains")}
            lines.append(f"| {key}: {gate['rule']} | {gate['holds']} | {json.dumps(detail, default=str)} |")
    lines += ["", f"All gates hold: **{res['gates_hold']}**" + (" (smoke: never)" if p["smoke"] else ""), "",
              "## Primary: " + ("final held-out gold at the budget" if p["primary"]["metric"] == "final_gold" else "GMP")
              + " and δ vs " + p["baseline"], "",
              "| arm | GMP (mean ± sd) | δ (paired t CI) | δ (bootstrap CI) | verdict |", "|---|---|---|---|---|"]
    for a in arms:
        e = res["arms"].get(a, {})
        d = e.get("delta")
        lines.append(f"| {a} | {_f(e.get('gmp'), 4)} | {_ci(d['t_ci']) if d else '(baseline)'} | "
                     f"{_ci(d['bootstrap_ci']) if d else ''} | {(d['verdict'] + ': ' + d['reason']) if d else ''} |")
    lines += ["", "## Secondary", "",
              "| arm | final gold gain | gold at +gain (interp.) | fidelity at +gain | diversity at +gain | held-out fidelity ≥ base − margin − tol | √KL fit α, β |",
              "|---|---|---|---|---|---|---|"]
    for a in arms + [GOLD_CONTROL, SHUFFLED_CONTROL]:
        e = res["arms"].get(a)
        if not e:
            continue
        fit = e["sqrt_kl_fit"]
        fit_s = "—" if fit is None else f"{fit['alpha']:.3f}, {fit['beta']:.3f}" + (
            f" (α {fit['ci']['alpha'][0]:.3f}…{fit['ci']['alpha'][1]:.3f})" if fit.get("ci") else "")
        cm = e["constraint_met"]
        lines.append(f"| {a} | {_f(e['final_gold_gain'], 4)} | {_f(e['gold_at_gain_interpolated'], 4)} | {_f(e['fidelity_at_gain'], 4)} | "
                     f"{_f(e['diversity_at_gain'], 4)} | {cm['heldout']}/{cm['of']}" + (f" (train {cm['train']}/{cm['of']})" if cm["train"] is not None else "")
                     + f" | {fit_s} |")
    cross = res.get("cross_reward")
    if cross:
        names = cross["rewards"]
        lines += ["", f"## Every reward's change at {cross['budget']:.0f} reward queries (mean ± sd over seeds; "
                  "only the proxy is trained on)", "", "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for a in arms + [GOLD_CONTROL, SHUFFLED_CONTROL]:
            row = cross["arms"].get(a)
            if row:
                lines.append(f"| {a} | " + " | ".join(_f(row[n], 4) for n in names) + " |")
    lines += ["", "## Regime (calibration indicators, medians over runs)", "",
              "| arm | epoch-0 approx_kl | epoch-0 clipfrac | median approx_kl | critic EV before 1st reset "
              f"(last epoch; mean of {EV_WINDOW}) | same mean by thirds of the steps (first / middle / last) |",
              "|---|---|---|---|---|---|"]
    for a in arms + [GOLD_CONTROL, SHUFFLED_CONTROL]:
        e = res["arms"].get(a)
        if e:
            lines.append(f"| {a} | {_f(e['epoch0_approx_kl'], 4)} | {_f(e['epoch0_clipfrac'])} | {_f(e['median_approx_kl'], 5)} | {_f(e['explained_variance_before_reset'])}; "
                         f"{_f(e.get('explained_variance_before_reset_mean'))} | "
                         + " / ".join(_f(v) for v in e["explained_variance_thirds_before_reset_mean"]) + " |")
    if bon:
        lines += ["", "## Best-of-n with the proxy on base samples", "", "| n | KL = log n − (n−1)/n | √KL | proxy gain | gold gain |", "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['kl']:.4f} | {math.sqrt(r['kl']):.4f} | {r['proxy_gain']:+.4f} | {r['gold_gain']:+.4f} |" for r in bon]
    probes = g["probes"]["table"]
    if probes:
        lines += ["", "## Proxy error probes (held-out world renders)", "", "| perturbation | proxy change | gold change | same sign |", "|---|---|---|---|"]
        lines += [f"| {r['perturbation']} | {r['proxy_change']:+.4f} | {r['gold_change']:+.4f} | {r['same_sign']:.2f} |" for r in probes]
    lines += ["", f"Wall time {meta['wall_s']:.0f} s, {meta['jobs']} job(s) × {meta['threads']} thread(s), {meta['runs']} runs "
              f"(median per run: train {meta['median_train_s']:.0f} s, eval {meta['median_eval_s']:.0f} s, path KL "
              f"{meta['median_path_kl_s']:.0f} s; timings of resumed runs cover only their last part).", ""]
    return "\n".join(lines)


def plots_html(res: dict[str, Any]) -> str:
    """Gold vs proxy gain per arm (mean ± sd band over seeds, best-of-n dashed), gold vs √KL with fits,
    CDPO's λ over epochs, training proxy with reset events."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "<p>(matplotlib is not installed: no plots; every number is in results.json)</p>"
    from rewardtune.report import COLORS, _png

    p = res["protocol"]
    arms = [a["name"] for a in p["arms"]] + [GOLD_CONTROL, SHUFFLED_CONTROL]
    runs_by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in res["runs"].values():
        runs_by_arm.setdefault(r["spec"]["arm"], []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = axes[0, 0]
    for i, a in enumerate(arms):
        runs = runs_by_arm.get(a, [])
        if not runs or a == GOLD_CONTROL:
            continue
        n = min(len(r["metrics"]["proxy_gain"]) for r in runs)
        x = np.array([r["metrics"]["proxy_gain"][:n] for r in runs])
        y = np.array([r["metrics"]["gold_gain"][:n] for r in runs])
        color = COLORS[i % len(COLORS)]
        ax.plot(x.mean(0), y.mean(0), "-o", ms=3, color=color, label=a)
        ax.fill_between(x.mean(0), y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=color, alpha=0.15)
    bon = res["gates"]["best_of_n"]["table"]
    if bon:
        ax.plot([r["proxy_gain"] for r in bon], [r["gold_gain"] for r in bon], "k--", lw=1, label="best-of-n (base)")
    ax.axvline(p["primary"]["proxy_gain"], color="gray", ls=":", lw=1)
    ax.set_xlabel("held-out proxy gain")
    ax.set_ylabel("held-out gold gain (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for i, a in enumerate(arms):
        color = COLORS[i % len(COLORS)]
        for j, r in enumerate(runs_by_arm.get(a, [])):
            if r["metrics"]["sqrt_kl"]:
                ax.plot(r["metrics"]["sqrt_kl"], r["metrics"]["gold_gain"], "o", ms=3, alpha=0.6, color=color,
                        label=a if j == 0 else None)
        fit = res["arms"].get(a, {}).get("sqrt_kl_fit")
        xs = [v for r in runs_by_arm.get(a, []) for v in r["metrics"]["sqrt_kl"]]
        if fit and xs and max(xs) > 0:
            d = np.linspace(1e-3, max(xs), 50)
            ax.plot(d, d * (fit["alpha"] - fit["beta"] * np.log(d)), color=color, lw=1)
    if bon:
        ax.plot([math.sqrt(r["kl"]) for r in bon], [r["gold_gain"] for r in bon], "k--", lw=1, label="best-of-n")
    ax.set_xlabel("√KL from base (path KL on the fixed subset)")
    ax.set_ylabel("held-out gold gain")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for r in runs_by_arm.get("cdpo", []):
        lam = r["curves"].get("lambda") or []
        ax.plot(range(len(lam)), [v or 0.0 for v in lam], lw=1, alpha=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("CDPO λ (fidelity), one line per seed")
    ax = axes[1, 1]
    for i, a in enumerate(arms):
        color = COLORS[i % len(COLORS)]
        for j, r in enumerate(runs_by_arm.get(a, [])):
            c = r["curves"]
            ax.plot(range(len(c["train_proxy"])), c["train_proxy"], lw=0.8, alpha=0.6, color=color, label=a if j == 0 else None)
            for epoch in c["reset_epochs"]:
                ax.axvline(epoch, color=color, ls=":", lw=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training proxy (epoch mean); dotted: reset events")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return f'<figure class=plot><img src="data:image/png;base64,{_png(fig)}"></figure>'


def write_results(out: Path, res: dict[str, Any], meta: dict[str, Any]) -> None:
    from rewardtune.report import CSS

    md = markdown(res, meta)
    write_json_atomic(out / "results.json", {"meta": meta, **res})
    write_text_atomic(out / "results.md", md)
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>overoptimization benchmark</title>"
            f"<style>{CSS}</style></head><body><h1>Overoptimization benchmark</h1>{plots_html(res)}"
            f"<pre>{html.escape(md)}</pre></body></html>")
    write_text_atomic(out / "results.html", page)


# ------------------------------------------------------------------------------------------- driver
def _cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value)
    return value


def benchmark(protocol: str | Path, out: str | Path, jobs: int = 1, use_smoke: bool = False,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or continue) every run of the protocol, the gate measurements, the analysis and the reports.

    `threads` per run defaults to the CPU count split between the jobs; a run's numbers depend on it, so
    a benchmark continues only with the thread count it started with (execution.json)."""
    import torch

    from rewardtune.testbed.compare import write_prompts
    from rewardtune.testbed.probes import best_of_n_table, probe_table

    p = load_protocol(protocol)
    p = smoke(p) if use_smoke else p
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "protocol.json"
    if stored.is_file() and json.loads(stored.read_text()) != json.loads(p.model_dump_json()):
        from rewardtune.errors import RewardtuneError

        raise RewardtuneError(f"--out {out} holds a benchmark of a different protocol; use a new --out directory")
    write_text_atomic(stored, p.model_dump_json(indent=1))
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    execution = out / "execution.json"
    if execution.is_file() and (started := json.loads(execution.read_text())["threads"]) != threads:
        from rewardtune.errors import RewardtuneError

        raise RewardtuneError(f"--out {out} was started with {started} torch thread(s) per run; continue it with "
                              f"--threads {started} (a run's numbers depend on the thread count)")
    write_text_atomic(execution, json.dumps({"threads": threads}))
    prompts_dir = write_prompts(out / "prompts")
    runs = plan(p)
    for spec in runs:  # every config is valid before anything runs
        run_config(p, spec, prompts_dir)
    start = time.perf_counter()
    done = {s.name: json.loads((out / "runs" / s.name / "result.json").read_text())
            for s in runs if (out / "runs" / s.name / "result.json").is_file()}
    todo = [s for s in runs if s.name not in done]
    print(f"benchmark {p.name}: {len(runs)} runs, {len(done)} already finished, {len(todo)} to run ({jobs} job(s))", flush=True)
    p_json = p.model_dump_json()
    finished_times: list[float] = []
    failed: list[str] = []

    def report(spec: RunSpec, result: dict[str, Any]) -> None:
        done[spec.name] = result
        t = result["timing"]
        finished_times.append(t["train_s"] + t["eval_s"] + t["path_kl_s"])
        left = len(runs) - len(done)
        eta = float(np.median(finished_times)) * left / max(jobs, 1)
        print(f"[{len(done)}/{len(runs)}] {spec.name}: train {t['train_s']:.0f} s, eval {t['eval_s']:.0f} s, "
              f"path KL {t['path_kl_s']:.0f} s; about {eta / 60:.0f} min left", flush=True)

    if jobs <= 1:
        for spec in todo:
            report(spec, execute(p_json, json.dumps(asdict(spec)), str(out), threads))
    elif todo:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(execute, p_json, json.dumps(asdict(s)), str(out), threads): s for s in todo}
            for fut in as_completed(futures):
                try:
                    report(futures[fut], fut.result())
                except Exception as err:  # the other runs go on; this one resumes on the next call
                    failed.append(f"{futures[fut].name}: {type(err).__name__}: {err}")
                    print(f"run {futures[fut].name} failed: {type(err).__name__}: {err}", flush=True)
    if failed:
        from rewardtune.errors import RewardtuneError

        raise RewardtuneError(f"{len(failed)} run(s) failed ({'; '.join(failed)}); fix and rerun the same command "
                              "to resume")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base_cfg = run_config(p, runs[0], prompts_dir)
    gates_dir = out / "gates"
    print("gates: best-of-n and proxy probes", flush=True)
    bon = _cached(gates_dir / "best_of_n.json", lambda: best_of_n_table(
        base_cfg, out / "runs" / runs[0].name, prompts_dir, p.gates.best_of_n_prompts, p.gates.best_of_n_max))
    probes = _cached(gates_dir / "probes.json", lambda: probe_table(base_cfg.reward.source, p.gates.probe_renders))
    res = analyze(p, [done[s.name] for s in runs], bon, probes)
    timings = [done[s.name]["timing"] for s in runs]
    meta = {"wall_s": time.perf_counter() - start, "jobs": jobs, "threads": threads, "runs": len(runs),
            "median_train_s": float(np.median([t["train_s"] for t in timings])),
            "median_eval_s": float(np.median([t["eval_s"] for t in timings])),
            "median_path_kl_s": float(np.median([t["path_kl_s"] for t in timings])),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}
    write_results(out, res, meta)
    for a, e in res["arms"].items():
        if e.get("delta"):
            print(f"{a}: δ GMP {_ci(e['delta']['t_ci'])} -> {e['delta']['verdict']}", flush=True)
    print(f"results: {out / 'results.md'}, {out / 'results.html'}, {out / 'results.json'}", flush=True)
    return res
