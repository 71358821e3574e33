"""Checkpoints of a run: writing and loading the policy (family-aware), the critics, the optimizer and
the trainer state, and resuming from the newest one (or refusing to overwrite a run that has some).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewardtune.advantages import PerPromptStatTracker
from rewardtune.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
    write_text_atomic,
)
from rewardtune.errors import CheckpointError, RewardtuneError
from rewardtune.kl import KLController
from rewardtune.models import load_policy_weights, save_policy
from rewardtune.provenance import ensure_run_id
from rewardtune.resume_policy import (
    apply_optimizer_settings,
    check_epochs,
    check_resume,
    fresh_start_warning,
    loading_checkpoint,
    record_resume,
)
from rewardtune.training.duals import DualAscent
from rewardtune.training.lifecycle import TERMINATED_FILE
from rewardtune.training.resets import NeuronResets
from rewardtune.training.setup import Progress, Run

log = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def load_optimizer_state(path: Path) -> dict:
    """An optimizer state file, loaded as data only (a crafted pickle is refused, never run).

    Loaded to the CPU: `Optimizer.load_state_dict` moves each state to its parameter's device, and a map
    to accelerate's per-process device (`cpu:0` under a multi-process CPU run) cannot be restored.
    """
    import pickle

    fix = "resume from another checkpoint or start a new --out"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for anything but tensors and data
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not a weights-only torch file "
                              f"({_first_line(err)}); {fix}") from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, an I/O error: one line, not a traceback
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} could not be read ({_first_line(err)}); {fix}") from None



class Checkpoints:
    """Writes and loads checkpoints: the policy (family-aware), critics, optimizer and the trainer state.

    The trainer state is the `progress` counters, the per-prompt `stat_trackers`, the `dual` multipliers
    and thresholds, the `kl_controller` and the resets' previous dormant masks; they are restored in place.
    """

    def __init__(self, run: Run, progress: Progress, stat_trackers: list[PerPromptStatTracker],
                 kl_controller: KLController, dual: DualAscent, resets: NeuronResets) -> None:
        self.run = run
        self.progress = progress
        self.stat_trackers = stat_trackers
        self.kl_controller = kl_controller
        self.dual = dual
        self.resets = resets

    def checkpoint_meta(self) -> dict:
        m = self.run.cfg.model
        return {"model_source": m.source, "finetune": m.finetune, "lora_rank": m.lora_rank if m.finetune == "lora" else None,
                "algorithm": self.run.cfg.algorithm.name, "model_family": m.family}

    def trainer_state(self) -> dict:
        progress = self.progress
        return {"epochs_done": progress.epochs_done, "samples_seen": progress.samples_seen, "global_step": progress.global_step,
                "stat_trackers": [t.state_dict() for t in self.stat_trackers], "dual": self.dual.state.state_dict(),
                "thresholds": self.dual.thresholds, "kl_controller": self.kl_controller.state_dict(),
                "previous_dormant": self.resets.dormant_state()}

    def load_trainer_state(self, state: dict) -> None:
        self.progress.epochs_done, self.progress.samples_seen = state["epochs_done"], state["samples_seen"]
        self.progress.global_step = state["global_step"]
        for tracker, tracker_state in zip(self.stat_trackers, state["stat_trackers"], strict=True):
            tracker.load_state_dict(tracker_state)
        self.dual.load_state(state["dual"], state["thresholds"])
        if "kl_controller" in state:  # checkpoints written before the KL controller existed hold none
            self.kl_controller.load_state_dict(state["kl_controller"])
        self.resets.load_dormant_state(state["previous_dormant"])

    def _write_checkpoint(self, directory: Path) -> None:
        run = self.run
        self._save_policy(directory)
        if run.critics is not None:
            save_file(run.accelerator.unwrap_model(run.critics).state_dict(), directory / "critic.safetensors")
        torch.save(run.optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "trainer_state.json").write_text(json.dumps(self.trainer_state(), indent=1))
        (directory / "config.yaml").write_text(run.cfg.to_yaml())

    def _save_policy(self, directory: Path) -> None:
        """sd: as before (`models.save_policy`); flow: the family's diffusers LoRA file or the full transformer."""
        run = self.run
        model = run.policy
        if not run.is_flow:
            save_policy(model, run.cfg.model, directory)
        elif run.cfg.model.finetune == "lora":
            run.family.save_lora(directory)
        else:
            model.save_pretrained(directory / "transformer", safe_serialization=True)

    def _load_policy_weights(self, path: Path) -> None:
        run = self.run
        model = run.policy
        if run.is_flow:
            from rewardtune.families.flow import load_flow_policy_weights

            load_flow_policy_weights(run.family, run.cfg.model.finetune, path)
        else:
            load_policy_weights(model, run.cfg.model, path)

    def save(self, kind: str = "regular") -> Path | None:
        run = self.run
        run.accelerator.wait_for_everyone()
        path = None
        if run.is_main:
            path = save_checkpoint(run.checkpoint_dir, self.progress.epochs_done, kind, self._write_checkpoint,
                                   self.checkpoint_meta())
            prune_checkpoints(run.checkpoint_dir, run.cfg.checkpointing.keep_last)
        run.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path, manifest: dict) -> None:
        run = self.run
        expected = self.checkpoint_meta()
        found = manifest.get("meta", {})
        found = {"model_family": "sd", **found}  # checkpoints from before the flow families are sd's
        for key in ("model_source", "model_family", "finetune", "lora_rank", "algorithm"):
            if found.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {path} was trained with {key}={found.get(key)!r}, this config has {expected[key]!r}; "
                    "resume with the original config or use a new --out directory"
                )
        changes = check_resume(path, run.cfg)
        with loading_checkpoint(path):
            self._load_policy_weights(path)
            if run.critics is not None:
                run.accelerator.unwrap_model(run.critics).load_state_dict(load_file(path / "critic.safetensors"))
            try:
                run.optimizer.load_state_dict(load_optimizer_state(path / "optimizer.pt"))
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"checkpoint {path}: optimizer.pt does not fit this run's parameters "
                                      f"({_first_line(err)}); resume with the original config or start a new --out") from None
            self.load_trainer_state(json.loads((path / "trainer_state.json").read_text()))
        apply_optimizer_settings(run.optimizer, run.cfg)
        check_epochs(path, self.progress.epochs_done, run.cfg.training.epochs)
        if changes and run.is_main:
            record_resume(run.out_dir, path, self.progress.epochs_done, changes)

    def start(self, resume: bool) -> None:
        """Before the first epoch: clear a stale stop marker and half-written checkpoints, resume or refuse to overwrite."""
        run = self.run
        if run.is_main:
            (run.out_dir / TERMINATED_FILE).unlink(missing_ok=True)
            for path in remove_stale(run.checkpoint_dir):
                log.warning("removed %s: an incomplete checkpoint write from a killed run", path.name)
        if resume:
            found = latest_checkpoint(run.checkpoint_dir)
            if found is not None:
                self.load(*found)
                log.info("resumed from %s at epoch %d", found[0], self.progress.epochs_done)
            else:
                log.warning(fresh_start_warning(run.checkpoint_dir))
        elif list_checkpoints(run.checkpoint_dir):
            raise RewardtuneError(
                f"{run.out_dir} already holds checkpoints; pass --resume to continue that run or choose a new --out"
            )
        if run.is_main:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            run.metrics.truncate_to(self.progress.epochs_done)
            write_text_atomic(run.out_dir / "config.yaml", run.cfg.to_yaml())
            ensure_run_id(run.out_dir, run.cfg.model.source)
        run.tracker.start(self.progress.epochs_done)
