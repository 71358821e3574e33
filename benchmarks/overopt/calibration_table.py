"""Print the calibration indicators of training runs (their metrics.jsonl), one row per run directory.

    python benchmarks/overopt/calibration_table.py RUN_DIR [RUN_DIR ...]

Columns: epoch-0 approx_kl and clipfrac, median per-epoch approx_kl, optimizer steps per epoch, critic
explained variance at the last epoch before the first reset and its mean over the 4 epochs before it (TDPO
family; the maximum in brackets), that mean by thirds of the denoising steps, and training proxy at epoch 0 and at the last epoch — the numbers benchmarks/overopt/CALIBRATION.md quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rewardtune.metrics import MetricsLog
from rewardtune.testbed.benchmark import train_summary


def row(run_dir: Path) -> str:
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    if not records:
        return f"| {run_dir.name} | (no epochs) |"
    s = train_summary(records)
    ev = [v for v in s["explained_variance"] if v is not None]
    ev_s = "—" if not ev else (f"{s['explained_variance_before_reset']:.3f}; "
                                f"{s['explained_variance_before_reset_mean']:.3f} (max {max(ev):.3f})")
    thirds = " / ".join("—" if v is None else f"{v:.3f}" for v in s["explained_variance_thirds_before_reset_mean"])
    return (f"| {run_dir.name} | {len(records)} | {s['epoch0_approx_kl']:.4f} | {s['epoch0_clipfrac']:.3f} | "
            f"{s['median_approx_kl']:.5f} | {s['optimizer_steps_per_epoch']} | {ev_s} | {thirds} | "
            f"{records[0]['reward_mean']:.3f} → {records[-1]['reward_mean']:.3f} |")


def main(argv: list[str]) -> None:
    print("| run | epochs | epoch-0 approx_kl | epoch-0 clipfrac | median approx_kl | opt. steps/epoch | critic EV before 1st reset (last; mean of 4) | mean of 4 by thirds | train proxy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
