"""Experiment tracking through accelerate's trackers: `logging.trackers: [tensorboard, mlflow, wandb]`.

What goes to every chosen tracker (rank 0 only; accelerate's trackers and this module both check):
every numeric field of each metrics.jsonl record at step = epoch (booleans as 0/1, so the neuron-reset
event `reset`, `neurons_reset` and CDPO's `lambda_*`/`constraint_*`/`threshold_*` are curves like the rest),
the flattened config as parameters, a per-epoch grid of sampled images captioned with their rewards
(`logging.sample_grid_images` of them), and, from `rewardtune evaluate`, each checkpoint's held-out results
(`eval/<split>/<reward>/{mean,ci95_low,ci95_high}`, diversity, drift) at step = the checkpoint's epoch.

Where: TensorBoard event files under `<run>/tracking/<project>/` (evaluation: `<eval>/tracking/<project>/`).
MLflow: the tracking server of MLFLOW_TRACKING_URI, experiment MLFLOW_EXPERIMENT_NAME or `logging.project`,
run MLFLOW_RUN_ID when set (KFP's MLflow integration, a ConfigMap: manifests/examples/mlflow-configmap.yaml)
or the run id recorded in `<run>/tracking.json` (so `--resume` and the evaluation continue the same run);
grids as artifacts `samples/epoch-NNNNNN.png`. W&B: project `logging.project`, WANDB_MODE/WANDB_DIR honoured
(offline works), the run id kept in tracking.json too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from rewardtune.checkpoint import write_json_atomic
from rewardtune.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
TRACKING_DIR = "tracking"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_available(trackers: Sequence[str]) -> None:
    """A tracker whose package is missing is a one-line error (accelerate would silently drop it)."""
    for name in trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"logging.trackers names '{name}' but the {PACKAGES[name]} package is not installed; "
                              "pip install 'rewardtune[tracking]' or remove it from logging.trackers")


def flatten(data: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as dotted keys with scalar values (lists as JSON, None as 'null'): tracker parameters."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    key = prefix.rstrip(".")
    if data is None:
        return {key: "null"}
    if isinstance(data, bool | int | float | str):
        return {key: data}
    return {key: json.dumps(data, sort_keys=True)}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (bool -> 0/1; None, strings and non-finite values left out)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def sample_grid(images: torch.Tensor, scores: Sequence[float], columns: int = 4, caption_px: int = 12) -> Image.Image:
    """Images [N,3,H,W] in [0,1] in a grid, each with its reward printed beneath (what a reviewer scans first)."""
    tiles = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w = len(tiles), tiles.shape[1], tiles.shape[2]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    scale = max(1, 64 // max(h, w))  # tiny images are upscaled so the caption fits under them
    th, tw = h * scale, w * scale
    grid = Image.new("RGB", (columns * tw, rows * (th + caption_px)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, score) in enumerate(zip(tiles, scores, strict=True)):
        x, y = (i % columns) * tw, (i // columns) * (th + caption_px)
        grid.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x, y))
        draw.text((x + 2, y + th), f"{score:.3g}", fill="black")
    return grid


def evaluation_scalars(record: dict[str, Any]) -> dict[str, float]:
    """One evaluated checkpoint's metrics.json as flat `eval/...` scalars."""
    out: dict[str, float] = {}

    def put(prefix: str, stats: dict[str, Any] | None) -> None:
        if stats:
            out[f"{prefix}/mean"] = float(stats["mean"])
            out[f"{prefix}/ci95_low"], out[f"{prefix}/ci95_high"] = (float(v) for v in stats["ci95"])

    for reward, entry in record.get("rewards", {}).items():
        for split in ("heldout", "train"):
            put(f"eval/{split}/{reward}", entry.get(split))
    for kind in ("diversity", "drift"):
        for split, stats in (record.get(kind) or {}).items():
            put(f"eval/{split}/{kind}", stats)
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ------------------------------------------------------------------------------------------- the run's id
def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def init_kwargs(trackers: Sequence[str], state: dict[str, Any], logging_root: Path, purge_step: int | None) -> dict:
    """Per-tracker constructor arguments: continue the recorded MLflow / W&B run (MLFLOW_RUN_ID wins)."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in trackers and purge_step:
        kwargs["tensorboard"] = {"purge_step": purge_step}  # a resumed run rewrites the epochs it redoes
    if "mlflow" in trackers and state.get("mlflow_run_id"):
        kwargs["mlflow"] = {"run_id": state["mlflow_run_id"]}  # accelerate lets MLFLOW_RUN_ID override this
    if "wandb" in trackers:
        wandb_dir = Path(os.environ.get("WANDB_DIR") or logging_root)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {"dir": str(wandb_dir)}
        if state.get("wandb_run_id"):
            kwargs["wandb"] |= {"id": state["wandb_run_id"], "resume": "allow"}
    return kwargs


def _record_ids(accelerator: Any, run_dir: Path) -> None:
    """Remember the MLflow / W&B run ids, so a resumed run and its evaluation log into the same run."""
    state = _read_state(run_dir)
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            state["mlflow_run_id"] = tracker.tracker.info.run_id
            state["mlflow_experiment_id"] = tracker.tracker.info.experiment_id
        elif tracker.name == "wandb":
            state["wandb_run_id"] = tracker.tracker.id
    write_json_atomic(run_dir / STATE_FILE, state)


def _log_image(tracker: Any, key: str, image: Image.Image, step: int, caption: str) -> None:
    if tracker.name == "tensorboard":
        import numpy as np

        tracker.writer.add_image(key, np.asarray(image), global_step=step, dataformats="HWC")
        tracker.writer.add_text(f"{key}/scores", caption, global_step=step)
        tracker.writer.flush()
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(image, artifact_file=f"{key}/epoch-{step:06d}.png")
    elif tracker.name == "wandb":
        import wandb

        tracker.run.log({key: wandb.Image(image, caption=caption)}, step=step)


# ------------------------------------------------------------------------------------------- training
class TrainingTracker:
    """The trainer's handle: `start` once, `log_epoch` after each metrics record, `finish` at the end."""

    def __init__(self, accelerator: Any, cfg: Any, run_dir: Path) -> None:
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.trackers = list(cfg.logging.trackers)
        self.active = bool(self.trackers) and accelerator.is_main_process
        self.started = False

    @staticmethod
    def accelerator_kwargs(cfg: Any, run_dir: Path) -> dict[str, Any]:
        """`log_with` and the logging directory for `Accelerator(...)` (nothing when no tracker is chosen)."""
        if not cfg.logging.trackers:
            return {}
        from accelerate.utils import ProjectConfiguration

        check_available(cfg.logging.trackers)
        root = Path(run_dir) / TRACKING_DIR
        return {"log_with": list(cfg.logging.trackers),
                "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(root))}

    def start(self, epochs_done: int) -> None:
        if not self.active:
            return
        root = self.run_dir / TRACKING_DIR
        root.mkdir(parents=True, exist_ok=True)
        kwargs = init_kwargs(self.trackers, _read_state(self.run_dir), root, epochs_done)
        self.accelerator.init_trackers(self.cfg.logging.project, config=flatten(self.cfg.model_dump(mode="json")),
                                       init_kwargs=kwargs)
        _record_ids(self.accelerator, self.run_dir)
        self.started = True

    def log_epoch(self, record: dict[str, Any], images: torch.Tensor, prompts: Sequence[str], rewards: torch.Tensor) -> None:
        if not self.started:
            return
        epoch = int(record["epoch"])
        self.accelerator.log(scalars(record), step=epoch)
        n = min(self.cfg.logging.sample_grid_images, len(images))
        if n:
            scores = rewards[:n].detach().float().cpu().tolist()
            caption = "\n".join(f"{s:.4g}  {p}" for s, p in zip(scores, prompts[:n], strict=True))
            grid = sample_grid(images[:n], scores)
            for tracker in self.accelerator.trackers:
                _log_image(tracker, "samples", grid, epoch, caption)

    def finish(self) -> None:
        if self.started:
            self.accelerator.end_training()
            self.started = False


# ------------------------------------------------------------------------------------------- evaluation
def log_evaluation(cfg: Any, run_dir: Path, eval_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    """Each evaluated checkpoint's held-out results, into the training run's trackers (step = epoch).

    Runs outside any Accelerator, so the trackers are accelerate's classes started directly (one process).
    """
    trackers = list(cfg.logging.trackers)
    if not trackers or int(os.environ.get("RANK", "0")) != 0:
        return
    check_available(trackers)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    root = Path(eval_dir) / TRACKING_DIR
    root.mkdir(parents=True, exist_ok=True)
    kwargs = init_kwargs(trackers, _read_state(Path(run_dir)), root, None)
    started = []
    for name in trackers:
        cls = LOGGER_TYPE_TO_CLASS[name]
        tracker = (cls(cfg.logging.project, str(root), **kwargs.get(name, {})) if cls.requires_logging_directory
                   else cls(cfg.logging.project, **kwargs.get(name, {})))
        tracker.start()
        started.append(tracker)
    try:
        for record in records:
            values = evaluation_scalars(record)
            for tracker in started:
                tracker.log(values, step=int(record["epoch"]))
            grid = Path(eval_dir) / record["checkpoint"] / "grid.png"
            if grid.is_file():
                with Image.open(grid) as image:
                    for tracker in started:
                        _log_image(tracker, f"eval_grid/{record['checkpoint']}", image.convert("RGB"),
                                   int(record["epoch"]), f"held-out grid of {record['checkpoint']}")
    finally:
        for tracker in started:
            tracker.finish()
