"""What `train --resume` may change, and making every allowed change real.

A checkpoint holds the optimizer state, and `load_state_dict` restores each param group's hyperparameters
with it: without a policy, `--resume --set training.learning_rate=1e-5` would record 1e-5 in config.yaml and
keep training at the old rate. So each config field is one of:

- applied: epochs, the optimizer's hyperparameters (set on the param groups after loading), step-time
  clipping, performance knobs, where the prompts come from, checkpointing/logging/evaluation settings and
  the device. They take effect from the resumed epoch on; the change is logged and appended to
  `resume_history.jsonl` in the run directory.
- refused (one line, nothing written): everything that defines what was trained or the shape of the saved
  state — model, reward, seed, algorithm (critic shape, constraints, reset), sampling, batch geometry.
  Resuming with those changed would mix two experiments under one name; start a new --out instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rewardtune.config import YAML_BUILD_ERRORS
from rewardtune.errors import CheckpointError, RewardtuneError

log = logging.getLogger(__name__)

HISTORY_FILE = "resume_history.jsonl"
CONFIG_FILE = "config.yaml"

# Fields (or whole sections, by prefix) a resume may change; each is really applied (see module docstring).
APPLIED = (
    "training.epochs",
    "training.learning_rate",
    "training.lr_warmup_steps",
    "training.adam_beta1",
    "training.adam_beta2",
    "training.adam_weight_decay",
    "training.adam_epsilon",
    "algorithm.critic.learning_rate",
    "training.max_grad_norm",
    "training.clip_range",
    "training.adv_clip_max",
    "training.mixed_precision",
    "training.gradient_checkpointing",
    "training.allow_tf32",
    "training.fused_steps",
    "prompts",
    "checkpointing",
    "logging",
    "evaluation",
    "eval_rewards",
    "device",
)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a config mapping; lists are leaves (a changed list is one change)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def is_applied(key: str) -> bool:
    return any(key == field or key.startswith(field + ".") for field in APPLIED)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, this config's value)} for every field both know and that differs."""
    old, new = flatten(saved), flatten(current)
    return {key: (old[key], new[key]) for key in sorted(new) if key in old and old[key] != new[key]}


def read_saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config a checkpoint was written with (None for checkpoints from before it was stored)."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, *YAML_BUILD_ERRORS):
        data = None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {checkpoint}: {CONFIG_FILE} is not a config mapping (damaged); resume from "
                              "another checkpoint or start a new --out")
    return data


def check_resume(checkpoint: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """The applied changes of resuming `checkpoint` with `cfg`; a refused change raises one line naming it."""
    saved = read_saved_config(checkpoint)
    if saved is None:
        return {}
    changes = config_changes(saved, cfg.model_dump(mode="json"))
    refused = [key for key in changes if not is_applied(key)]
    if refused:
        key = refused[0]
        old, new = changes[key]
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])})" if len(refused) > 1 else ""
        raise CheckpointError(
            f"--resume cannot change {key} ({old!r} -> {new!r}){more}: checkpoint {checkpoint.name} was trained with "
            "it; resume with the original value, or train a new run in a new --out"
        )
    return changes


def check_epochs(checkpoint: Path, epochs_done: int, epochs: int) -> None:
    """Fewer epochs than already done would leave a config.yaml that says less than the checkpoints hold."""
    if epochs < epochs_done:
        raise CheckpointError(
            f"training.epochs={epochs} is below the {epochs_done} epochs checkpoint {checkpoint.name} has done; "
            f"nothing to train: give training.epochs >= {epochs_done}, or use a new --out"
        )


@contextlib.contextmanager
def loading_checkpoint(checkpoint: Path) -> Iterator[None]:
    """Turn any failure to read a checkpoint's state into one line naming it.

    The files passed their sha256 check, so a failure here means they were written by another config
    (a critic of other sizes, another constraint count) or crafted: never a traceback.
    """
    try:
        yield
    except RewardtuneError:
        raise
    except Exception as err:  # noqa: BLE001 - torch/safetensors/json raise many types for a bad state
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(
            f"checkpoint {checkpoint} cannot be loaded into this run ({type(err).__name__}: {first}); resume with the "
            "config it was written with, delete that checkpoint to resume from an older one, or use a new --out"
        ) from None


def apply_optimizer_settings(optimizer: Any, cfg: Any) -> None:
    """Set each param group's hyperparameters from the config (loading the optimizer restored the old ones)."""
    t = cfg.training
    for group in optimizer.param_groups:
        critic = group.get("name") == "critic"
        group["lr"] = cfg.algorithm.critic.learning_rate if critic else t.learning_rate
        group["betas"] = (t.adam_beta1, t.adam_beta2)
        group["weight_decay"] = t.adam_weight_decay
        group["eps"] = t.adam_epsilon


def record_resume(out_dir: Path, checkpoint: Path, epochs_done: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Log the applied changes and append them to the run's resume history (fsynced)."""
    import os

    for key, (old, new) in changes.items():
        log.warning("resume: %s changed %r -> %r, applied from epoch %d on", key, old, new, epochs_done)
    record = {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checkpoint": checkpoint.name,
              "epochs_done": epochs_done, "changed": {k: {"from": o, "to": n} for k, (o, n) in changes.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / HISTORY_FILE).open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def missing_out_warning(out_dir: Path) -> str:
    return f"--resume: {out_dir} does not exist (misspelt?); starting a new run there from epoch 0"


def fresh_start_warning(checkpoint_dir: Path) -> str:
    """What `--resume` found when it found nothing to resume: said, not silently started over."""
    if not checkpoint_dir.is_dir() or not any(p.name.startswith("epoch-") for p in checkpoint_dir.iterdir()):
        return f"--resume: {checkpoint_dir.parent} holds no checkpoint; starting from epoch 0"
    return f"--resume: no valid checkpoint in {checkpoint_dir} (see the warnings above); starting from epoch 0"
