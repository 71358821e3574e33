"""The run's lifecycle: checkpoints (write, load, trainer state), resume, SIGTERM's safe points and the
votes that make every process stop together, and the run directory's lock.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
from filelock import FileLock
from filelock import Timeout as FileLockTimeout
from safetensors.torch import load_file, save_file

from rewardtune.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from rewardtune.errors import CheckpointError, RewardtuneError, Terminated
from rewardtune.lagrangian import DualState
from rewardtune.models import load_policy_weights, save_policy
from rewardtune.resume_policy import (
    apply_optimizer_settings,
    check_epochs,
    check_resume,
    fresh_start_warning,
    loading_checkpoint,
    record_resume,
)

log = logging.getLogger(__name__)


# Written by a run that stopped cleanly on SIGTERM: a launcher reports only "a worker exited non-zero"
# (torchrun and accelerate launch exit 1 even when every rank exited 143), so the stage reads this instead.
TERMINATED_FILE = "terminated.json"


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



class Lifecycle:
    """Checkpoints, termination and locking around the epoch loop (`run` wraps `Trainer._run`)."""

    def checkpoint_meta(self) -> dict:
        m = self.cfg.model
        return {"model_source": m.source, "finetune": m.finetune, "lora_rank": m.lora_rank if m.finetune == "lora" else None,
                "algorithm": self.cfg.algorithm.name, "model_family": m.family}

    def trainer_state(self) -> dict:
        return {"epochs_done": self.epochs_done, "samples_seen": self.samples_seen, "global_step": self.global_step,
                "stat_trackers": [t.state_dict() for t in self.stat_trackers], "dual": self.dual.state_dict(),
                "thresholds": self.thresholds, "kl_controller": self.kl_controller.state_dict(),
                "previous_dormant": {k: v.tolist() for k, v in self.previous_dormant.items()}}

    def load_trainer_state(self, state: dict) -> None:
        self.epochs_done, self.samples_seen = state["epochs_done"], state["samples_seen"]
        self.global_step = state["global_step"]
        for tracker, tracker_state in zip(self.stat_trackers, state["stat_trackers"], strict=True):
            tracker.load_state_dict(tracker_state)
        self.dual = DualState(**state["dual"])
        self.thresholds = state["thresholds"]
        if "kl_controller" in state:  # checkpoints written before the KL controller existed hold none
            self.kl_controller.load_state_dict(state["kl_controller"])
        self.previous_dormant = {k: torch.tensor(v, dtype=torch.bool) for k, v in state["previous_dormant"].items()}

    def _write_checkpoint(self, directory: Path) -> None:
        self._save_policy(directory)
        if self.critics is not None:
            save_file(self.accelerator.unwrap_model(self.critics).state_dict(), directory / "critic.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "trainer_state.json").write_text(json.dumps(self.trainer_state(), indent=1))
        (directory / "config.yaml").write_text(self.cfg.to_yaml())

    def _save_policy(self, directory: Path) -> None:
        """sd: as before (`models.save_policy`); flow: the family's diffusers LoRA file or the full transformer."""
        model = self.accelerator.unwrap_model(self.unet)
        if not self.is_flow:
            save_policy(model, self.cfg.model, directory)
        elif self.cfg.model.finetune == "lora":
            self.family.save_lora(directory)
        else:
            model.save_pretrained(directory / "transformer", safe_serialization=True)

    def _load_policy_weights(self, path: Path) -> None:
        model = self.accelerator.unwrap_model(self.unet)
        if not self.is_flow:
            load_policy_weights(model, self.cfg.model, path)
        elif self.cfg.model.finetune == "lora":
            self.family.load_lora(path)
        else:
            model.load_state_dict(type(model).from_pretrained(path / "transformer").state_dict())

    def save(self, kind: str = "regular") -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            path = save_checkpoint(self.checkpoint_dir, self.epochs_done, kind, self._write_checkpoint, self.checkpoint_meta())
            prune_checkpoints(self.checkpoint_dir, self.cfg.checkpointing.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path, manifest: dict) -> None:
        expected = self.checkpoint_meta()
        found = manifest.get("meta", {})
        found = {"model_family": "sd", **found}  # checkpoints from before the flow families are sd's
        for key in ("model_source", "model_family", "finetune", "lora_rank", "algorithm"):
            if found.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {path} was trained with {key}={found.get(key)!r}, this config has {expected[key]!r}; "
                    "resume with the original config or use a new --out directory"
                )
        changes = check_resume(path, self.cfg)
        with loading_checkpoint(path):
            self._load_policy_weights(path)
            if self.critics is not None:
                self.accelerator.unwrap_model(self.critics).load_state_dict(load_file(path / "critic.safetensors"))
            try:
                self.optimizer.load_state_dict(load_optimizer_state(path / "optimizer.pt"))
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"checkpoint {path}: optimizer.pt does not fit this run's parameters "
                                      f"({_first_line(err)}); resume with the original config or start a new --out") from None
            self.load_trainer_state(json.loads((path / "trainer_state.json").read_text()))
        apply_optimizer_settings(self.optimizer, self.cfg)
        check_epochs(path, self.epochs_done, self.cfg.training.epochs)
        if changes and self.is_main:
            record_resume(self.out_dir, path, self.epochs_done, changes)

    # ------------------------------------------------------------------ termination (SIGTERM)
    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.term_requested_at is None:
            self.term_requested_at = time.monotonic()
            log.warning("SIGTERM received: stopping at the next safe point (grace %.0f s)",
                        self.cfg.checkpointing.termination_grace_s)

    def safe_point(self, epoch: int) -> None:
        """Inside an epoch: after SIGTERM, stop now unless the rest of the epoch and its checkpoint fit the grace.

        Only epoch boundaries are checkpointed (mid-epoch state would need the sampled trajectories), so
        stopping here loses this epoch's work but nothing else: resume redoes it bit-identically.
        """
        if self.term_requested_at is None and self.accelerator.num_processes == 1:
            return
        now = time.monotonic()
        # the epoch (checkpoint included) is predicted to end as the last one did, or now if it is already later
        fits = self.term_requested_at is None or (
            self.last_epoch_s is not None
            and max(self.epoch_started_at + self.last_epoch_s, now)
            < self.term_requested_at + self.cfg.checkpointing.termination_grace_s
        )
        requested, fits = self._termination_votes(fits)
        if not requested or fits:
            return
        found = latest_checkpoint(self.checkpoint_dir)
        newest = found[0].name if found else "none (starts over)"
        raise Terminated(f"SIGTERM: epoch {epoch} cannot finish within the {self.cfg.checkpointing.termination_grace_s:g} s "
                         f"grace ({now - self.epoch_started_at:.1f} s in); stopped without a new checkpoint, newest is "
                         f"{newest}; run again with --resume")

    def _termination_votes(self, fits: bool) -> tuple[bool, bool]:
        """(some process got SIGTERM, every process has time to finish the epoch), agreed by all processes,
        so that none stops alone and leaves the others waiting in a collective."""
        requested = self.term_requested_at is not None
        if self.accelerator.num_processes == 1:
            return requested, fits
        vote = torch.tensor([[float(requested), float(fits)]], device=self.device)
        votes = self.accelerator.gather(vote)
        return bool(votes[:, 0].max() > 0), bool(votes[:, 1].min() > 0)

    def _lock_out_dir(self) -> FileLock:
        """An exclusive lock on the run directory, held for the whole run (filelock: flock on POSIX).

        A retried pod can start while the old one is still inside its termination grace, writing its last
        checkpoint; the new one waits up to `checkpointing.lock_wait_s` for it instead of writing alongside.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / ".rewardtune.lock"
        lock = FileLock(path, mode=0o644)
        wait = self.cfg.checkpointing.lock_wait_s
        try:
            lock.acquire(timeout=0)
        except FileLockTimeout:
            if wait > 0:
                log.warning("%s is locked by another run; waiting up to %g s", self.out_dir, wait)
            try:
                if wait <= 0:
                    raise
                lock.acquire(timeout=wait, poll_interval=0.2)
            except FileLockTimeout:
                raise RewardtuneError(
                    f"{self.out_dir} is in use by another `rewardtune train` (lock {path.name} held for "
                    f"{wait:g} s); wait for it to end or choose another --out"
                ) from None
        return lock

    # ------------------------------------------------------------------ the job
    def run(self, resume: bool = False) -> Path:
        """The whole job; on SIGTERM it checkpoints at the next safe point and raises `Terminated`."""
        handler_installed = threading.current_thread() is threading.main_thread()
        lock = self._lock_out_dir() if self.is_main else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if handler_installed else None
        stopped = False
        try:
            return self._run(resume)
        except Terminated as err:
            stopped = True
            if self.is_main:
                write_json_atomic(self.out_dir / TERMINATED_FILE, {"message": str(err), "epochs_done": self.epochs_done})
            raise
        finally:
            # Under a launcher, the first rank to exit makes it SIGTERM the others, which may still be on their
            # way out of a clean stop: they keep this (recording, not killing) handler until they exit.
            if handler_installed and not (stopped and self.accelerator.num_processes > 1):
                signal.signal(signal.SIGTERM, previous)
            self.tracker.finish()
            if lock is not None:
                lock.release()


    def _start(self, resume: bool) -> None:
        """Before the first epoch: clear a stale stop marker and half-written checkpoints, resume or refuse to overwrite."""
        cfg = self.cfg
        if self.is_main:
            (self.out_dir / TERMINATED_FILE).unlink(missing_ok=True)
            for path in remove_stale(self.checkpoint_dir):
                log.warning("removed %s: an incomplete checkpoint write from a killed run", path.name)
        if resume:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is not None:
                self.load(*found)
                log.info("resumed from %s at epoch %d", found[0], self.epochs_done)
            else:
                log.warning(fresh_start_warning(self.checkpoint_dir))
        elif list_checkpoints(self.checkpoint_dir):
            raise RewardtuneError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue that run or choose a new --out"
            )
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.truncate_to(self.epochs_done)
            write_text_atomic(self.out_dir / "config.yaml", cfg.to_yaml())
        self.tracker.start(self.epochs_done)
