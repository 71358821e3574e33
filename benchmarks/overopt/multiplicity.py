"""The Bonferroni reading of a benchmark's comparisons (PROTOCOL.md, "Decision rule", says a reader may
apply one): each δ's paired-t and bootstrap intervals at 1 − 0.05/m for m methods, and the pre-registered
rule (`stats.verdict`, with the run's own secondary signs, gates, resamples and seed) applied to them.
A reading, not the pre-registered verdict (that is results.json's, at 95% each).

    PYTHONPATH=shared python benchmarks/overopt/multiplicity.py RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rewardtune.testbed.stats import bootstrap_ci, paired_t_ci, verdict


def bonferroni_rows(results: dict[str, Any]) -> list[str]:
    """The Markdown table: one row per method compared with DDPO, intervals at 1 − (1 − level)/m."""
    primary = results["protocol"]["primary"]
    methods = [a for a in results["arms"] if results["arms"][a].get("delta")]
    level = 1 - (1 - primary["level"]) / len(methods)
    rows = [f"| method | paired t at {level:.4f} | bootstrap ({primary['bootstrap_resamples']:,}) at {level:.4f} "
            f"| rule's verdict at {level:.4f} |", "|---|---|---|---|"]
    for arm in methods:
        delta = results["arms"][arm]["delta"]
        diffs = [d for d in delta["differences"] if d is not None]
        t = paired_t_ci(diffs, level)
        b = bootstrap_ci(diffs, primary["bootstrap_resamples"], level, primary["bootstrap_seed"])
        # as the benchmark does: a secondary δ without a value counts as disagreeing in sign
        signs = [delta["secondary"][key] if delta["secondary"][key] is not None else -1.0
                 for key in ("final_gold_gain", "gold_at_gain_interpolated")]
        label, _ = verdict(t, b, signs, delta["sesoi"], results["gates_hold"])
        rows.append(f"| {arm} | [{t.low:+.4f}, {t.high:+.4f}] | [{b.low:+.4f}, {b.high:+.4f}] | {label} |")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: multiplicity.py RESULTS_JSON", file=sys.stderr)
        return 2
    print("\n".join(bonferroni_rows(json.loads(Path(argv[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
