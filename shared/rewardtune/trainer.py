"""The reward fine-tuning loop, one readable loop as in ddpo-pytorch: sample → score → advantages →
train → reset/dual → checkpoint. Each stage lives in its own module of `rewardtune.training`.

Every epoch draws its randomness from (seed, epoch, process): a run resumed from a checkpoint at an
epoch boundary continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from accelerate.utils import set_seed

from rewardtune.checkpoint import checkpoint_name
from rewardtune.config import RunConfig
from rewardtune.errors import Terminated
from rewardtune.faults import fault_point
from rewardtune.temporal import explained_variance
from rewardtune.training.estimators import AdvantageEstimation
from rewardtune.training.lifecycle import TERMINATED_FILE, Lifecycle, load_optimizer_state
from rewardtune.training.optimize import Optimization
from rewardtune.training.resets import ResetsAndDuals
from rewardtune.training.rollout import EpochSamples, EpochTimes, Rollout
from rewardtune.training.setup import RunSetup, epoch_seed, resolve_device

__all__ = ["TERMINATED_FILE", "EpochSamples", "EpochTimes", "Trainer", "epoch_seed", "load_optimizer_state",
           "resolve_device"]

log = logging.getLogger(__name__)


class Trainer(RunSetup, Rollout, AdvantageEstimation, Optimization, ResetsAndDuals, Lifecycle):
    """Holds the models and optimizer of one run; `run()` is the whole job."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path) -> None:
        self._build(cfg, out_dir)

    def _run(self, resume: bool) -> Path:
        cfg = self.cfg
        self._start(resume)
        for epoch in range(self.epochs_done, cfg.training.epochs):
            set_seed(epoch_seed(cfg.training.seed, epoch, self.accelerator.process_index))
            self.epoch_started_at = time.monotonic()
            self.safe_point(epoch)
            start = time.perf_counter()
            times = EpochTimes()
            samples = self.sample_epoch(epoch, times)  # sample and score
            advantage_stats = self.compute_advantages(samples)
            t0 = time.perf_counter()
            stats = {**advantage_stats, **self.train_epoch(samples, epoch)}
            self.step_health.check(epoch, stats, self.trained_parameters())
            times.training = time.perf_counter() - t0
            self.epochs_done = epoch + 1
            if self.critics is not None:  # over all processes' (sample, step) pairs
                stats["value_explained_variance"] = explained_variance(
                    self.accelerator.gather(samples.extras["old_values"][..., 0]),
                    self.accelerator.gather(samples.extras["returns"][..., 0]),
                )
            if self.constraints:
                stats |= self.update_multipliers(samples, epoch)
            reset_now = self.reset_due(epoch)
            if reset_now:
                self.save("pre_reset")
                fault_point("pre_reset_saved")
            if self.measures_neurons:
                stats |= self.measure_and_reset(epoch, reset_now, cfg.training.inner_epochs - 1)
            self._log_epoch(epoch, samples, stats, times, start)
            fault_point("metrics")
            stopping, _ = self._termination_votes(True)
            saved = None
            if reset_now:
                saved = self.save("post_reset")
            elif stopping or self.epochs_done % cfg.checkpointing.every_epochs == 0 or self.epochs_done == cfg.training.epochs:
                saved = self.save()
            self._record_digests("epoch", epoch)
            fault_point("epoch_end")
            self.last_epoch_s = time.monotonic() - self.epoch_started_at
            if stopping and self.epochs_done < cfg.training.epochs:
                name = saved.name if saved else checkpoint_name(self.epochs_done, "post_reset" if reset_now else "regular")
                raise Terminated(f"SIGTERM: stopped after epoch {epoch} with checkpoint {name}; run again with --resume")
        return self.out_dir

    def _log_epoch(self, epoch: int, samples: EpochSamples, stats: dict, times: EpochTimes, start: float) -> None:
        """The epoch's metrics line (global over processes), written by the main process."""
        epoch_images = len(samples) * self.accelerator.num_processes
        self.samples_seen += epoch_images
        rewards = self.accelerator.gather(samples.rewards)
        record = {
            "epoch": epoch,
            "samples": self.samples_seen,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            **stats,
            "lr": self.optimizer.param_groups[0]["lr"],
            "global_step": self.global_step,
            "images_per_s": epoch_images / (time.perf_counter() - start),
            "time_sampling_s": times.sampling,
            "time_reward_s": times.reward,
            "time_reward_wait_s": times.reward_wait,
            "time_training_s": times.training,
        }
        if self.is_main:
            self.metrics.append(record)
            self.tracker.log_epoch(record, samples.images, samples.prompts, samples.rewards)
            log.info("epoch %d: reward %.4f ± %.4f, kl %.2e, clipfrac %.3f", epoch, record["reward_mean"],
                     record["reward_std"], record["approx_kl"], record["clipfrac"])
