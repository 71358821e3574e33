"""Do two kfp.local runs of the DAG agree? `make demo` (subprocess) against `make demo-containers` (containers).

    python pipelines/compare_local_runs.py runs/kfp-local runs/kfp-containers

Per arm: metrics.jsonl without the timing fields, and the sha256 of every checkpoint file (config.yaml apart:
it holds paths, which differ between the roots and between the host and the image); every evaluation's
rewards, diversity, drift and training reward; the report's KFP Metrics without the *_per_s speeds.
Exit code 0 when all agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

TIMING = ("images_per_s", "time_sampling_s", "time_reward_s", "time_reward_wait_s", "time_training_s")
PATH_FILES = ("config.yaml",)  # the resolved config: model and prompt paths differ by root and image


def arm_runs(root: Path) -> dict[str, Path]:
    """{algorithm: train run dir} from the checkpoint_dir kfp.local runs use (`<root>/checkpoints/<job>-<arm>`)."""
    return {p.name.split("-", 1)[1]: p for p in root.glob("checkpoints/*") if (p / "metrics.jsonl").is_file()}


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def digests(run: Path) -> dict[str, dict[str, str]]:
    out = {}
    for manifest in sorted(run.glob("checkpoints/epoch-*/manifest.json")):
        files = json.loads(manifest.read_text())["files"]
        out[manifest.parent.name] = {k: v["sha256"] for k, v in files.items() if k not in PATH_FILES}
    return out


def evaluations(root: Path) -> dict[str, dict]:
    out = {}
    for path in root.glob("*/for-loop-*/for-loop-*/evaluate/results/*/metrics.json"):
        data = json.loads(path.read_text())
        key = f"{path.relative_to(root).parts[1]}/{path.parent.name}"  # arm loop iteration/checkpoint
        out[key] = {k: data.get(k) for k in ("rewards", "diversity", "drift", "train_reward")}
    return out


def report_metrics(root: Path) -> dict[str, float]:
    (path,) = root.glob("*/report/executor_output.json")
    metadata = json.loads(path.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    return {k: v for k, v in metadata.items() if not k.endswith("_per_s")}


def short(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def compare(a: Path, b: Path) -> bool:
    ok = True
    runs_a, runs_b = arm_runs(a), arm_runs(b)
    if sorted(runs_a) != sorted(runs_b) or not runs_a:
        print(f"arms differ: {sorted(runs_a)} vs {sorted(runs_b)}")
        return False
    for arm in sorted(runs_a):
        ra, rb = records(runs_a[arm]), records(runs_b[arm])
        da, db = digests(runs_a[arm]), digests(runs_b[arm])
        ok &= ra == rb and da == db
        print(f"{arm}: {len(ra)} epochs; metrics.jsonl without timings equal: {ra == rb} ({short(ra)} vs {short(rb)}); "
              f"checkpoints {sorted(da)}: every file's sha256 equal (config.yaml apart): {da == db}")
    ea, eb = evaluations(a), evaluations(b)
    ma, mb = report_metrics(a), report_metrics(b)
    ok &= ea == eb and ma == mb
    print(f"evaluations ({len(ea)} checkpoint results) equal: {ea == eb} ({short(ea)} vs {short(eb)})")
    print(f"report metrics ({len(ma)} keys, speeds apart) equal: {ma == mb} ({short(ma)} vs {short(mb)})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    return 0 if compare(args.a, args.b) else 1


if __name__ == "__main__":
    sys.exit(main())
