"""Held-out evaluation on the tiny model: shapes and finiteness, identical images for the same seed, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewardtune.config import parse_config
from rewardtune.errors import CheckpointError
from rewardtune.evaluate import (
    evaluate_run,
    noise_seed,
    pairwise_cosine_distance,
    read_evaluations,
    summary_stats,
)
from tests.conftest import tiny_config_dict

EVAL = {"num_heldout_prompts": 3, "num_train_prompts": 2, "images_per_prompt": 2, "seed": 7, "batch_size": 10,
        "grid_prompts": 2}


def tiny_eval_config(model_dir: Path, epochs: int = 2, **sections):
    """The tiny config cut to 4 trajectories per epoch, `epochs` epochs, a checkpoint per epoch, a small evaluation."""
    overrides = [f"training.epochs={epochs}", "sampling.batches_per_epoch=1", "training.gradient_accumulation_steps=1",
                 "checkpointing.every_epochs=1", "checkpointing.keep_last=2"]
    return parse_config(tiny_config_dict(model_dir, evaluation=dict(EVAL), **sections), overrides)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch tiny DDPO run (two checkpoints) and a prompts dir with a held-out file; shared by the module."""
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("evalrun")
    Trainer(tiny_eval_config(tiny_model_dir), root / "run").run()
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "heldout.txt").write_text("zebra\nkoala\nllama\nwalrus\n")
    return root / "run", prompts


@pytest.fixture(scope="module")
def evaluated(trained_run, tiny_model_dir, tmp_path_factory) -> Path:
    run, prompts = trained_run
    out = tmp_path_factory.mktemp("eval") / "eval"
    evaluate_run(tiny_eval_config(tiny_model_dir), run, prompts, out)
    return out


def test_summary_stats_hand_numbers():
    stats = summary_stats([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["std"] == 1.0 and stats["n"] == 3
    half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} (scipy.stats.t, printed tables: 4.303)
    assert stats["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-6)
    wide = summary_stats([0.0, 1.0] * 20)  # beyond the old 30-row table: t_{0.975, 39} = 2.0227, not 1.96
    assert wide["ci95"][1] - wide["mean"] == pytest.approx(2.022691 * wide["std"] / math.sqrt(40), rel=1e-6)
    assert summary_stats([5.0]) == {"mean": 5.0, "std": 0.0, "ci95": [5.0, 5.0], "n": 1}


def test_pairwise_cosine_distance_hand_numbers():
    import torch

    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # pairs: (0,1) 1, (0,2) 2, (1,2) 1 -> mean 4/3
    assert pairwise_cosine_distance(e) == pytest.approx(4 / 3)
    assert pairwise_cosine_distance(e[:1]) is None


def test_noise_seed_is_stable():
    assert noise_seed(7, "a cat", 0) == noise_seed(7, "a cat", 0)
    assert len({noise_seed(7, "a cat", 0), noise_seed(7, "a cat", 1), noise_seed(8, "a cat", 0)}) == 3


def test_metrics_are_finite_and_shaped(evaluated, trained_run):
    run, _ = trained_run
    records = read_evaluations(evaluated)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert [r["checkpoint"] for r in records] == ["base", *kept]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["samples"] for r in records] == [0, 4, 8]
    for record in records:
        assert record["heldout_disjoint"] is True
        assert record["num_prompts"] == {"heldout": 3, "train": 2}
        assert record["embedding"].startswith("pixel-16x16 (fallback")
        assert record["rewards"]["brightness"]["role"] == "train"
        assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(record["rewards"])
        stats = [v[s] for v in record["rewards"].values() for s in ("heldout", "train")]
        stats += [record[k][s] for k in ("diversity", "drift") for s in ("heldout", "train")]
        for entry in stats:
            assert set(entry) == {"mean", "std", "ci95", "n"}
            values = [entry["mean"], entry["std"], *entry["ci95"]]
            assert all(math.isfinite(v) for v in values)
            assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        assert record["timing"]["images"] == 10 and record["timing"]["images_per_s"] > 0
        directory = evaluated / record["checkpoint"]
        assert len(list((directory / "images").glob("*.png"))) == 10
        assert np.load(directory / "embeddings.npy").shape[0] == 10
        Image.open(directory / "grid.png").verify()
    assert records[0]["drift"]["heldout"]["mean"] == pytest.approx(0.0, abs=1e-6)


def test_same_seed_gives_identical_images(evaluated, trained_run, tiny_model_dir, tmp_path):
    run, prompts = trained_run
    evaluate_run(tiny_eval_config(tiny_model_dir), run, prompts, tmp_path / "again", checkpoint="epoch-000002")
    for name in ("base", "epoch-000002"):
        first = sorted((evaluated / name / "images").glob("*.png"))
        assert first
        for path in first:
            again = tmp_path / "again" / name / "images" / path.name
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again))), path.name
        a = json.loads((evaluated / name / "metrics.json").read_text())["rewards"]
        b = json.loads((tmp_path / "again" / name / "metrics.json").read_text())["rewards"]
        assert a == b


def test_evaluated_checkpoint_is_skipped(evaluated, trained_run, tiny_model_dir, monkeypatch):
    run, prompts = trained_run
    before = {p: p.stat().st_mtime_ns for p in evaluated.glob("*/metrics.json")}
    import rewardtune.evaluate as module

    def refuse(*args, **kwargs):
        raise AssertionError("no model should be loaded when everything is evaluated")

    monkeypatch.setattr(module, "Evaluator", refuse)
    paths = evaluate_run(tiny_eval_config(tiny_model_dir), run, prompts, evaluated)
    assert set(paths) == set(before)
    assert {p: p.stat().st_mtime_ns for p in evaluated.glob("*/metrics.json")} == before


def test_unknown_checkpoint_is_named(trained_run, tiny_model_dir, tmp_path):
    run, prompts = trained_run
    with pytest.raises(CheckpointError, match="epoch-000009"):
        evaluate_run(tiny_eval_config(tiny_model_dir), run, prompts, tmp_path / "x", checkpoint="epoch-000009")
