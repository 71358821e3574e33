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


def _run_local(tmp_path, model_dir, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "kfp"), "--model", str(model_dir), *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _line(stdout: str, prefix: str) -> Path:
    return Path(next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(prefix)).split(" (")[0])


def _check(proc, epochs):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = _line(proc.stdout, "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == epochs
    assert (run_dir / "checkpoints" / f"epoch-{epochs:06d}" / "manifest.json").is_file()
    prompts = next(run_dir.parents[1].glob("prepare-prompts/prompts"))
    assert len((prompts / "train.txt").read_text().splitlines()) == 36
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert used["prompts"] == {**used["prompts"], "source": str(prompts / "train.txt"), "template": "{}"}
    report = _line(proc.stdout, "report")
    html = report.read_text()
    assert "Overoptimization indicators" in html and "http://" not in html and "https://" not in html
    # the Collected evaluations: the base model and the final checkpoint were both scored
    assert f"epoch-{epochs:06d}" in html and "base" in html


def test_local_dag_one_epoch(tmp_path, tiny_model_dir):
    """Fast path (about 30 s on 2 cores): the whole sub-DAG with one training epoch."""
    _check(_run_local(tmp_path, tiny_model_dir, "--epochs", "1"), 1)


@pytest.mark.slow
def test_local_dag_tiny_default(tmp_path, tiny_model_dir):
    """`make demo`: the embedded tiny default as configured (8 epochs)."""
    _check(_run_local(tmp_path, tiny_model_dir), 8)
