"""The report: self-contained HTML whose images all decode, a non-blank Chromium render, comparison overlays,
and the `evaluate` / `report` CLI."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewardtune.cli import main
from rewardtune.evaluate import evaluate_run
from rewardtune.report import build_report
from tests.test_evaluate import tiny_eval_config


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two tiny DDPO runs (2 epochs, seed 0; 1 epoch, seed 1: cheaper, unequal lengths), evaluated on the
    same held-out prompts and seeds.

    The first run's metrics.jsonl gets a reset event and lambda_/constraint_ values added by hand, so the
    reset markers and the CDPO curves are drawn without a slower CDPO run."""
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("report")
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "heldout.txt").write_text("zebra\nkoala\nllama\n")
    runs = {}
    for label, seed, epochs in (("ddpo-a", 0, 2), ("ddpo-b", 1, 1)):
        cfg = tiny_eval_config(tiny_model_dir, epochs, training={"seed": seed})
        Trainer(cfg, root / label).run()
        evaluate_run(cfg, root / label, prompts, root / f"{label}-eval")
        runs[label] = (root / label, root / f"{label}-eval")
    metrics = runs["ddpo-a"][0] / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1] |= {"reset": True, "lambda_jpeg_compressibility": 0.1, "constraint_jpeg_compressibility": -2.0}
    records[0] |= {"reset": False, "lambda_jpeg_compressibility": 0.0, "constraint_jpeg_compressibility": -1.0}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return runs


@pytest.fixture(scope="module")
def report(two_runs, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("html")
    run, ev = two_runs["ddpo-a"]
    headline = build_report([run], [ev], out / "report.html", out / "report.md")
    return out / "report.html", headline


def _data_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_is_self_contained_and_images_decode(report):
    path, _ = report
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    assert len(re.findall(r"<img\b", page)) == len(_data_images(page)) > 2
    for data in _data_images(page):
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size[0] > 0 and image.size[1] > 0
    for text in ("Overoptimization indicators", "gold_at_best_proxy", "Training curves", "Timing and hardware",
                 "pixel-16x16 (fallback", "Run configuration", "epoch-000002"):
        assert text in page


def test_headline_numbers_are_finite(report):
    _, headline = report
    assert {"train_reward_gain", "jpeg_compressibility_change_final", "jpeg_compressibility_gold_at_best_proxy",
            "eval_images_per_s", "drift_final"} <= set(headline)
    assert all(isinstance(v, float) and math.isfinite(v) for v in headline.values())
    md = report[0].with_name("report.md").read_text()
    assert "jpeg_compressibility" in md and "best-proxy" in md


def test_comparison_mode_overlays_two_runs(two_runs, tmp_path):
    runs = [two_runs["ddpo-a"], two_runs["ddpo-b"]]
    headline = build_report([r for r, _ in runs], [e for _, e in runs], tmp_path / "c.html", tmp_path / "c.md",
                            labels=["A", "B"])
    page = (tmp_path / "c.html").read_text()
    overlays = re.findall(r'<figure class="plot" data-series="([^"]*)"', page)
    assert overlays and all(series == "A|B" for series in overlays)
    assert "<h3>A</h3>" in page and "<h3>B</h3>" in page
    assert {k.split(".", 1)[0] for k in headline} == {"A", "B"}
    assert headline["A.train_reward_base"] == headline["B.train_reward_base"]  # same base, prompts and seeds
    table = page.split("<h3>All runs</h3>", 1)[1].split("</table>", 1)[0]  # the DAG's arms side by side: one table
    assert [m for m in re.findall(r"<tr><td class=l>([^<]*)</td>", table)] == ["A", "B"]
    assert f"<td>{headline['A.train_reward_gain']:.4g}</td>" in table


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing; skip (with the reason) if that cannot be done."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    try:
        result = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"could not install chromium with apt-get: {err}")
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        pytest.skip(f"apt-get install -y chromium failed (rc {result.returncode}): {result.stderr.strip()[-300:]}")
    return found


def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    path, _ = report
    shot = tmp_path / "shot.png"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,1600", f"--screenshot={shot}", path.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (rc {result.returncode}): {result.stderr[-500:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    non_white = (pixels < 240).any(axis=2).mean()
    assert pixels.std() > 5 and non_white > 0.01, f"screenshot looks blank (non-white fraction {non_white:.4f})"


def test_cli_evaluate_and_report(two_runs, tiny_model_dir, tmp_path, capsys):
    import yaml

    run, ev = two_runs["ddpo-b"]
    config = tmp_path / "config.yaml"
    cfg = tiny_eval_config(tiny_model_dir, 1, training={"seed": 1})
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # everything is already evaluated: the CLI must skip it all and report the same directory
    assert main(["evaluate", "--config", str(config), "--run", str(run), "--out", str(ev),
                 "--prompts", str(ev.parent / "prompts")]) == 0
    assert main(["report", "--run", str(run), "--eval", str(ev), "--label", "b", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert "train_reward_gain" in json.loads((tmp_path / "r" / "headline.json").read_text())
    assert main(["report", "--run", str(run), "--eval", str(ev), "--run", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "one --eval per --run" in capsys.readouterr().err
