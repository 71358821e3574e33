"""Print how a CDPO run held its fidelity constraint on the training prompts, one row per run directory.

    python benchmarks/overopt/constraint_table.py RUN_DIR [RUN_DIR ...]

Columns: the threshold (epoch-0 mean − margin), mean training-time fidelity over the first and the last
WINDOW epochs, epochs below the threshold, the largest λ, training proxy over the last WINDOW epochs and
epoch-0 approx_kl — the numbers benchmarks/RESULTS.md quotes for the constraint pilot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rewardtune.metrics import MetricsLog

WINDOW = 8
REWARD = "testbed_fidelity"


def row(run_dir: Path) -> str:
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    fidelity = [r[f"constraint_{REWARD}"] for r in records]
    if not fidelity:
        return f"| {run_dir.name} | (no epochs) |"
    threshold = records[0][f"threshold_{REWARD}"]
    return (f"| {run_dir.name} | {len(records)} | {threshold:.4f} | {np.mean(fidelity[:WINDOW]):.3f} | "
            f"{np.mean(fidelity[-WINDOW:]):.3f} | {sum(f < threshold for f in fidelity)} | "
            f"{max(r[f'lambda_{REWARD}'] for r in records):.3g} | "
            f"{np.mean([r['reward_mean'] for r in records[-WINDOW:]]):.3f} | {records[0]['approx_kl']:.4f} |")


def main(argv: list[str]) -> None:
    print(f"| run | epochs | threshold | fidelity, first {WINDOW} | fidelity, last {WINDOW} | epochs below | max λ | "
          f"train proxy, last {WINDOW} | epoch-0 approx_kl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
