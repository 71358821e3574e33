"""Experiment tracking: one tiny run + evaluation logged to TensorBoard, a real `mlflow server` on loopback
(sqlite backend) and W&B in offline mode, then read back with each tool's own reader."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from rewardtune.config import parse_config
from rewardtune.errors import ConfigError
from rewardtune.tracking import TrainingTracker, evaluation_scalars, flatten, sample_grid, scalars
from tests.conftest import tiny_config_dict
from tests.test_evaluate import tiny_eval_config

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

EPOCHS = 2


def test_scalars_keep_numbers_and_turn_events_into_0_1():
    record = {"epoch": 3, "reward_mean": 0.5, "reset": True, "dormant_overlap": None, "note": "x", "bad": float("nan"),
              "lambda_fidelity": 0.25}
    assert scalars(record) == {"epoch": 3.0, "reward_mean": 0.5, "reset": 1.0, "lambda_fidelity": 0.25}


def test_flatten_makes_dotted_scalar_params():
    assert flatten({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": "x"}) == {"a.b": 1, "a.c": "null", "a.d": "[1, 2]", "e": "x"}


def test_evaluation_scalars_name_split_reward_and_ci():
    record = {"rewards": {"gold": {"role": "unseen", "heldout": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 3, "std": 0.1},
                                   "train": None}},
              "diversity": {"heldout": {"mean": 0.2, "ci95": [0.1, 0.3], "n": 3, "std": 0.1}, "train": None}, "drift": {}}
    assert evaluation_scalars(record) == {
        "eval/heldout/gold/mean": 0.5, "eval/heldout/gold/ci95_low": 0.4, "eval/heldout/gold/ci95_high": 0.6,
        "eval/heldout/diversity/mean": 0.2, "eval/heldout/diversity/ci95_low": 0.1, "eval/heldout/diversity/ci95_high": 0.3}


def test_sample_grid_lays_out_tiles_with_captions():
    grid = sample_grid(torch.zeros(5, 3, 8, 8), [0.1, 0.2, 0.3, 0.4, 0.5], columns=4)
    assert grid.size == (4 * 64, 2 * (64 + 12))  # 8 px tiles upscaled to 64, a 12 px caption row under each


def test_tracker_config_is_validated(tiny_model_dir):
    with pytest.raises(ConfigError, match="config error at logging.trackers.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"):
        parse_config(tiny_config_dict(tiny_model_dir, logging={"trackers": ["comet"]}))
    with pytest.raises(ConfigError, match="a tracker is named twice"):
        parse_config(tiny_config_dict(tiny_model_dir, logging={"trackers": ["mlflow", "mlflow"]}))


class _NotMain:
    is_main_process = False


def test_only_rank_0_logs(tiny_model_dir, tmp_path):
    cfg = parse_config(tiny_config_dict(tiny_model_dir, logging={"trackers": ["tensorboard"]}))
    tracker = TrainingTracker(_NotMain(), cfg, tmp_path)
    tracker.start(0)
    tracker.log_epoch({"epoch": 0, "reward_mean": 1.0}, torch.zeros(1, 3, 4, 4), ["x"], torch.zeros(1))
    tracker.finish()
    assert not tracker.started and list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with a sqlite backend and a local artifact store, stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: do not let a slow shutdown fail the tests
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory, mlflow_server):
    """A 2-epoch tiny run + its evaluation, logged to all three trackers."""
    from rewardtune.evaluate import evaluate_run
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("tracked")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "rt-test", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb")}
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-scoped monkeypatch is not available
        for key, value in env.items():
            patch.setenv(key, value)
        cfg = tiny_eval_config(tiny_model_dir, epochs=EPOCHS,
                               logging={"trackers": ["tensorboard", "mlflow", "wandb"], "sample_grid_images": 4})
        Trainer(cfg, root / "run").run()
        prompts = root / "prompts"
        prompts.mkdir()
        (prompts / "heldout.txt").write_text("zebra\nkoala\nllama\nwalrus\n")
        evaluate_run(cfg, root / "run", prompts, root / "eval")
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, records


def _accumulator(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run_dir] = {p.parent for p in directory.rglob("events.out.tfevents.*") if "hparams" not in str(p.parent)
                 and not p.parent.name.replace(".", "").isdigit()}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_reads_back_the_curves_and_grids(tracked_run):
    root, records = tracked_run
    acc = _accumulator(root / "run" / "tracking")
    for key in ("reward_mean", "approx_kl", "loss", "time_reward_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["epoch"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
    images = acc.Images("samples")
    assert [e.step for e in images] == list(range(EPOCHS)) and all(e.width > 0 and e.height > 0 for e in images)
    evaluation = _accumulator(root / "eval" / "tracking")
    base_and_last = [e.step for e in evaluation.Scalars("eval/heldout/brightness/mean")]
    assert base_and_last == [0, 1, 2]
    assert {t for t in evaluation.Tags()["images"] if t.startswith("eval_grid/")} == {
        "eval_grid/base", "eval_grid/epoch-000001", "eval_grid/epoch-000002"}


def test_mlflow_server_holds_metrics_params_grids_and_evaluation(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    root, records = tracked_run
    state = json.loads((root / "run" / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(state["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "rt-test"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward_mean"))
    assert [step for step, _ in history] == [r["epoch"] for r in records]
    assert [value for _, value in history] == pytest.approx([r["reward_mean"] for r in records])
    assert run.data.params["algorithm.name"] == "ddpo" and run.data.params["training.epochs"] == str(EPOCHS)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == [f"samples/epoch-{e:06d}.png" for e in range(EPOCHS)]
    evaluated = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/heldout/brightness/mean"))
    metrics = sorted((m["epoch"], m["rewards"]["brightness"]["heldout"]["mean"])
                     for m in (json.loads(p.read_text()) for p in (root / "eval").glob("*/metrics.json")))
    assert [step for step, _ in evaluated] == [step for step, _ in metrics] == [0, 1, 2]
    assert [value for _, value in evaluated] == pytest.approx([value for _, value in metrics])
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "eval_grid")]
    assert grids == ["eval_grid/base", "eval_grid/epoch-000001", "eval_grid/epoch-000002"]


def test_wandb_offline_run_holds_the_metrics(tracked_run):
    """W&B 0.31 ships no reader for offline logs: check the transaction log `wandb sync` would upload names
    every curve and the image grid (protobuf records carry their keys verbatim)."""
    root, records = tracked_run
    state = json.loads((root / "run" / "tracking.json").read_text())
    runs = sorted((root / "wandb" / "wandb").glob(f"offline-run-*-{state['wandb_run_id']}"))
    [log] = list(runs[0].glob("*.wandb"))  # the training's; the evaluation resumes the same id in a later directory
    data = log.read_bytes()
    for key in ("reward_mean", "approx_kl", "time_reward_wait_s", "samples", "algorithm"):
        assert key.encode() in data, key
    assert any(b"eval/heldout/brightness/mean" in p.read_bytes() for r in runs[1:] for p in r.glob("*.wandb"))
