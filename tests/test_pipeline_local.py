"""The whole DAG under kfp.local (SubprocessRunner, use_venv=False) on the tiny default, report included."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("kfp")
SCRIPT = REPO / "pipelines" / "run_local.py"


def _run_local(tmp_path, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "kfp"), *extra],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)


def _line(stdout: str, prefix: str) -> Path:
    return Path(next(line.split(": ", 1)[1] for line in map(str.strip, stdout.splitlines()) if line.startswith(prefix)).split(" (")[0])


def _check(proc, epochs, train_prompts):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = _line(proc.stdout, "run: ")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == epochs
    assert (run_dir / "checkpoints" / f"epoch-{epochs:06d}" / "manifest.json").is_file()
    prompts = next(run_dir.parents[1].glob("prepare-prompts/prompts"))
    assert len((prompts / "train.txt").read_text().splitlines()) == train_prompts
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert used["prompts"] == {**used["prompts"], "source": str(prompts / "train.txt"), "template": "{}"}
    report = _line(proc.stdout, "report: ")
    html = report.read_text()
    assert "Overoptimization indicators" in html and "http://" not in html and "https://" not in html
    # the Collected evaluations: the base model and the final checkpoint were both scored
    assert f"epoch-{epochs:06d}" in html and "base" in html


def test_local_dag_one_epoch(tmp_path, tiny_model_dir):
    """Fast path: the whole DAG on the random tiny model with one training epoch."""
    _check(_run_local(tmp_path, "--config", str(REPO / "configs" / "tiny.yaml"), "--model", str(tiny_model_dir),
                      "--epochs", "1"), 1, train_prompts=36)
    [exported] = [p.parent for p in (tmp_path / "kfp").rglob("rewardtune_export.json")]  # the export step's Model
    assert (exported / "model_index.json").is_file() and (exported / "README.md").is_file()


@pytest.mark.slow
def test_local_dag_embedded_default(tmp_path):
    """`make demo`: the testbed default as configured; the proxy rises on held-out prompts."""
    proc = _run_local(tmp_path)
    _check(proc, 16, train_prompts=306)
    summary = next((tmp_path / "kfp").rglob("markdown")).read_text()
    row = next(line for line in summary.splitlines() if "| testbed_proxy |" in line).split("|")
    assert float(row[5]) > 0, summary  # the training reward's gain on held-out prompts
