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

from rewardtune.testbed.stats import bootstrap_ci, paired_t_ci, verdict


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: multiplicity.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    primary = results["protocol"]["primary"]
    methods = [a for a in results["arms"] if results["arms"][a].get("delta")]
    level = 1 - (1 - primary["level"]) / len(methods)
    print(f"| method | paired t at {level:.4f} | bootstrap ({primary['bootstrap_resamples']:,}) at {level:.4f} | rule's verdict at {level:.4f} |")
    print("|---|---|---|---|")
    for arm in methods:
        delta = results["arms"][arm]["delta"]
        diffs = [d for d in delta["differences"] if d is not None]
        t = paired_t_ci(diffs, level)
        b = bootstrap_ci(diffs, primary["bootstrap_resamples"], level, primary["bootstrap_seed"])
        # as the benchmark does: a secondary δ without a value counts as disagreeing in sign
        signs = [delta["secondary"][key] if delta["secondary"][key] is not None else -1.0
                 for key in ("final_gold_gain", "gold_at_gain_interpolated")]
        label, _ = verdict(t, b, signs, delta["sesoi"], results["gates_hold"])
        print(f"| {arm} | [{t.low:+.4f}, {t.high:+.4f}] | [{b.low:+.4f}, {b.high:+.4f}] | {label} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
