"""Run the pipeline with kfp.local on the embedded tiny default (2 CPU cores, no cluster, no Docker).

    python pipelines/run_local.py [--epochs N] [--root runs/kfp-local]

Runs the sub-DAG whose stages are built today (prepare-prompts -> train, with the exit handler); the full
alignment DAG also needs cache-models / evaluate / report (see docs/pipeline.md, "Status").
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "shared")]
# Component subprocesses import rewardtune from the same checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "shared"), str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kfp import local  # noqa: E402

from pipelines.alignment import train_only_pipeline  # noqa: E402


def tiny_config_text(model_dir: Path, config: Path = REPO / "configs" / "tiny.yaml") -> str:
    """configs/tiny.yaml with model.source made absolute (component subprocesses run in their own cwd)."""
    import yaml

    data = yaml.safe_load(config.read_text())
    data["model"]["source"] = str(model_dir.resolve())
    data.setdefault("logging", {})["progress_bars"] = False
    return yaml.safe_dump(data, sort_keys=False)


def run_local(root: Path, model_dir: Path, epochs: int = 0) -> Path:
    """Run prepare-prompts -> train under kfp.local; returns the trained run directory (checkpoints artifact)."""
    from rewardtune.tiny import init_tiny

    if not (model_dir / "model_index.json").is_file():
        init_tiny(model_dir)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root.resolve()), raise_on_error=True)
    task = train_only_pipeline(config=tiny_config_text(model_dir), epochs=epochs)
    return Path(task.output.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "kfp-local", help="kfp.local pipeline root")
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "tiny-sd", help="tiny model dir (built if missing)")
    parser.add_argument("--epochs", type=int, default=0, help="override training.epochs (0: the config's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_dir = run_local(args.root, args.model, args.epochs)
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s")
    print(f"run (checkpoints artifact): {run_dir}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    print(f"checkpoints: {run_dir / 'checkpoints'}")
    print("report: not produced yet - the evaluate/report stages are not wired into this checkout (docs/pipeline.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
