"""The Bonferroni reading of a benchmark's three comparisons (PROTOCOL.md, "Decision rule", says a reader
may apply one): each δ's paired-t and bootstrap intervals at 1 − 0.05/3, and the rule's verdict on them.
A reading, not the pre-registered verdict (that is results.json's, at 95% each).

    PYTHONPATH=shared python benchmarks/overopt/multiplicity.py RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rewardtune.testbed.stats import bootstrap_ci, paired_t_ci


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: multiplicity.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    methods = [a for a in results["arms"] if results["arms"][a].get("delta")]
    level = 1 - 0.05 / len(methods)
    print(f"| method | paired t at {level:.4f} | bootstrap (10,000) at {level:.4f} | both upper bounds < SESOI |")
    print("|---|---|---|---|")
    for arm in methods:
        delta = results["arms"][arm]["delta"]
        diffs = [d for d in delta["differences"] if d is not None]
        t, b = paired_t_ci(diffs, level), bootstrap_ci(diffs, 10_000, level, 0)
        print(f"| {arm} | [{t.low:+.4f}, {t.high:+.4f}] | [{b.low:+.4f}, {b.high:+.4f}] | "
              f"{t.high < delta['sesoi'] and b.high < delta['sesoi']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
