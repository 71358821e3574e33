"""Held-out proxy gain by checkpoint (up to epoch 28, the confirmatory budget), gold and fidelity change at
epoch 28, and the first epoch at +0.02, one row per benchmark run directory (its result.json).

    python benchmarks/overopt/pilot_table.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGET, LEVEL = 28, 0.02


def row(run_dir: Path) -> str:
    c = json.loads((run_dir / "result.json").read_text())["curves"]
    epochs = [0 if name == "base" else int(name.split("-")[1]) for name in c["checkpoint"]]
    points = [i for i, e in enumerate(epochs) if 0 < e <= BUDGET]  # curves hold no post-reset duplicates
    gain = {i: c["proxy"][i] - c["proxy"][0] for i in points}
    last = max(points, key=lambda i: epochs[i])
    first = next((epochs[i] for i in points if gain[i] >= LEVEL), None)
    return (f"| {run_dir.name} | " + " / ".join(f"{gain[i]:+.3f}" for i in points) +
            f" | {c['gold'][last] - c['gold'][0]:+.3f} | {c['fidelity'][last] - c['fidelity'][0]:+.3f} | "
            f"{'—' if first is None else first} |")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pilot_table.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    print(f"| run | held-out proxy gain at epochs 4 / 8 / … / {BUDGET} | gold gain at {BUDGET} | "
          f"fidelity change at {BUDGET} | first ≥ +{LEVEL} |")
    print("|---|---|---|---|---|")
    for run_dir in argv:
        print(row(Path(run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
