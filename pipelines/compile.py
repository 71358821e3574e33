"""Compile the alignment DAG to pipelines/alignment.yaml (committed; tests fail when it drifts from a fresh compile).

    python pipelines/compile.py [--out FILE]
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "shared")]

from kfp import compiler  # noqa: E402

from pipelines.alignment import alignment_pipeline  # noqa: E402

DEFAULT_OUT = REPO / "pipelines" / "alignment.yaml"


def compile_pipeline(out: Path = DEFAULT_OUT) -> Path:
    """Deterministic output: same source, same bytes (no timestamps are embedded by kfp 2.17)."""
    compiler.Compiler().compile(alignment_pipeline, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
