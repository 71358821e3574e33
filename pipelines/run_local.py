"""Run the pipeline with kfp.local on the embedded default (2 CPU cores, no cluster, no Docker).

    python pipelines/run_local.py [--config configs/testbed.yaml] [--epochs N] [--root runs/kfp-local]

The embedded default is the overoptimization testbed (configs/testbed.yaml: the committed tiny model,
trained on the learned proxy reward, judged on the gold rewards it never sees); `--config configs/tiny.yaml
--model DIR` runs the random tiny model instead.

Runs the whole alignment DAG — prepare-prompts -> cache-models -> train -> evaluate (per checkpoint,
ParallelFor + Collected) -> report, inside the exit handler — with the kfp-kubernetes settings ignored
(kfp.local has no cluster), the model cache in a local directory, and prints where the report is.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "testbed.yaml"
sys.path[:0] = [str(REPO), str(REPO / "shared")]
# Component subprocesses import rewardtune from the same checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "shared"), str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kfp import local  # noqa: E402

from pipelines.alignment import alignment_pipeline  # noqa: E402


def local_config_text(config: Path, model_dir: Path | None = None) -> str:
    """The config as YAML text with `model.source` replaced by `model_dir` when given; a relative source that
    exists from the repository root is made absolute (component subprocesses run in their own cwd)."""
    import yaml

    data = yaml.safe_load(config.read_text())
    source = data["model"]["source"]
    if model_dir is not None:
        data["model"]["source"] = str(model_dir.resolve())
    elif not Path(source).is_absolute() and (REPO / source).exists():
        data["model"]["source"] = str((REPO / source).resolve())
    data.setdefault("logging", {})["progress_bars"] = False
    return yaml.safe_dump(data, sort_keys=False)


def run_local(root: Path, model_dir: Path | None = None, epochs: int = 0, config: Path = DEFAULT_CONFIG) -> tuple[Path, Path]:
    """Run the alignment DAG under kfp.local; returns (the report's HTML file, the training run directory).

    `model_dir`: a tiny model directory (built with `init-tiny` if missing) that replaces the config's model.
    """
    if model_dir is not None and not (model_dir / "model_index.json").is_file():
        from rewardtune.tiny import init_tiny

        init_tiny(model_dir)
    root = root.resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    alignment_pipeline(config=local_config_text(config, model_dir), epochs=epochs, model_cache_uri=str(root / "model-cache"))
    reports = sorted(root.rglob("html"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise RuntimeError(f"the pipeline finished but wrote no report under {root}")
    run_dir = max((p.parent for p in root.rglob("metrics.jsonl")), key=lambda p: p.stat().st_mtime)
    # KFP names the artifact file "html"; a copy with a suffix opens in a browser by double-click.
    report = root / "report.html"
    tmp = report.with_suffix(".html.tmp")
    shutil.copyfile(reports[-1], tmp)
    tmp.replace(report)
    return report, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "kfp-local", help="kfp.local pipeline root")
    parser.add_argument("--model", type=Path, default=None,
                        help="replace the config's model with this tiny model dir (built with init-tiny if missing)")
    parser.add_argument("--epochs", type=int, default=0, help="override training.epochs (0: the config's)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report, run_dir = run_local(args.root, args.model, args.epochs, args.config)
    # kfp.local may leave its indenting stdout wrapper installed; the summary goes to the real stdout.
    out = sys.__stdout__
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s", file=out)
    print(f"report: {report}", file=out)
    print(f"run: {run_dir} (metrics.jsonl, checkpoints/)", file=out)
    print(f"all artifacts: {args.root}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
