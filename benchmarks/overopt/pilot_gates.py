"""Issue 31's gates G0-G4 on calibration pilot runs (benchmarks/overopt/pilot_runs.py output), per regime.

    PYTHONPATH=shared python benchmarks/overopt/pilot_gates.py OUT [--drop 0.02]

A run is named REGIME_ARM-seedN (pilot_runs.py); ARM `ddpo` is DDPO on the proxy, `gold` the oracle (DDPO
on gold), `shuf` DDPO on the shuffled proxy, anything else a method arm. Per regime it prints, over seeds:
G0 (oracle − DDPO final held-out gold, paired), G1 (DDPO's gold peaks then falls while its proxy rises),
G2 (the critic's explained variance before its first reset: later-half median, last third of the steps),
G3 (dormant fraction at the reset epochs; epochs for the critic's EV to plateau vs the reset period) and G4
(DDPO breaks the fidelity margin). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from rewardtune.testbed import controls, stats

MARGIN = 0.05 + 0.02  # the protocols' cdpo_fidelity_margin + fidelity_tolerance


def _load(out: Path) -> dict[str, dict[str, dict[int, dict]]]:
    regimes: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(out.glob("runs/*/result.json")):
        r = json.loads(path.read_text())
        regime, _, arm = r["spec"]["arm"].rpartition("_")
        records = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        regimes[regime or "-"][arm][r["spec"]["seed"]] = r | {"records": records}
    return regimes


def _fmt(v: float | None, d: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:+.{d}f}"


def critic_readings(records: list[dict], reset_every: int | None) -> dict:
    """G2/G3 of one critic run: EV (all steps, last third) over the epochs before the first reset."""
    first_reset = next((r["epoch"] for r in records if r.get("reset")), None)
    horizon = first_reset if first_reset is not None else (reset_every or len(records))
    before = records[:horizon]
    ev = [r.get("value_explained_variance") for r in before]
    last = [r.get("value_explained_variance_last_third") for r in before]
    dormant = [r["dormant_fraction"] for r in records if r.get("reset")] or \
              [r["dormant_fraction"] for r in records if reset_every and (r["epoch"] + 1) % reset_every == 0]
    return {"ev": controls.later_half_median(ev), "ev_last": controls.later_half_median(last),
            "plateau": controls.plateau_epoch(ev), "horizon": horizon,
            "dormant": float(np.median(dormant)) if dormant else None}


def regime_rows(name: str, arms: dict[str, dict[int, dict]], drop: float) -> list[str]:
    rows = []
    ddpo, gold = arms.get("ddpo", {}), arms.get("gold", {})
    if ddpo:
        budget = min(r["curves"]["samples"][-1] for r in ddpo.values())
        read = {s: controls.read_run(r["curves"]["samples"], r["curves"]["proxy"], r["curves"]["gold"], budget)
                for s, r in ddpo.items()}
        falls = [controls.peaks_then_falls(r["curves"]["gold"], r["curves"]["proxy"], drop) for r in ddpo.values()]
        fid = [r["curves"]["fidelity"][-1] - r["curves"]["fidelity"][0] for r in ddpo.values()]
        g0 = "—"
        if gold:
            oracle = {s: controls.read_run(r["curves"]["samples"], r["curves"]["proxy"], r["curves"]["gold"], budget)
                      for s, r in gold.items()}
            d = [oracle[s].final_gold - read[s].final_gold for s in sorted(oracle) if s in read]
            ci = stats.paired_t_ci(d, 0.95)
            g0 = f"δ {_fmt(float(np.mean(d)))} (" + ", ".join(_fmt(x) for x in d) + ")" + (
                f", t [{ci.low:+.3f}, {ci.high:+.3f}]" if ci else "")
        curve = "; ".join("→".join(f"{g:.3f}" for g in r["curves"]["gold"]) for r in ddpo.values())
        rows.append(f"| {name} | DDPO n={len(ddpo)} | proxy gain {', '.join(_fmt(x.final_proxy) for x in read.values())} | "
                    f"G0 {g0} | G1 {sum(falls)}/{len(falls)} (drawdown {', '.join(f'{x.drawdown:.3f}' for x in read.values())}) | "
                    f"G4 {sum(f < -MARGIN for f in fid)}/{len(fid)} (Δfid {', '.join(_fmt(f) for f in fid)}) | gold {curve} |")
    for arm, runs in sorted(arms.items()):
        if arm in ("ddpo", "gold"):
            continue
        c = [critic_readings(r["records"], None) for r in runs.values()]
        gains = [r["curves"]["gold"][-1] - r["curves"]["gold"][0] for r in runs.values()]
        pg = [r["curves"]["proxy"][-1] - r["curves"]["proxy"][0] for r in runs.values()]
        crit = ""
        if c and c[0]["ev"] is not None:
            crit = (f"G2 EV {', '.join(_fmt(x['ev'], 2) for x in c)}; last third {', '.join(_fmt(x['ev_last'], 2) for x in c)} | "
                    f"G3 dormant {', '.join(_fmt(x['dormant'], 2) for x in c)}, plateau epoch {', '.join(str(x['plateau']) for x in c)} of {c[0]['horizon']} |")
        rows.append(f"| {name} | {arm} n={len(runs)} | proxy gain {', '.join(_fmt(x) for x in pg)} | gold gain {', '.join(_fmt(x) for x in gains)} | {crit}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--drop", type=float, default=0.02)
    args = parser.parse_args(argv)
    regimes = _load(args.out)
    if not regimes:
        print(f"error: out: no runs/*/result.json under {args.out}; pass a pilot_runs.py output directory", file=sys.stderr)
        return 2
    print("| regime | arm | held-out proxy gain (final) | | | | |\n|---|---|---|---|---|---|---|")
    for name, arms in sorted(regimes.items()):
        print("\n".join(regime_rows(name, arms, args.drop)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
