"""The reward fine-tuning loop, one readable loop as in ddpo-pytorch: sample → score → advantages →
train → reset/dual → checkpoint. Each stage is one object of `rewardtune.training`, given what it needs.

Every epoch draws its randomness from (seed, epoch, process): a run resumed from a checkpoint at an
epoch boundary continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from rewardtune.advantages import PerPromptStatTracker
from rewardtune.checkpoint import checkpoint_name
from rewardtune.config import RunConfig
from rewardtune.errors import RewardtuneError, Terminated
from rewardtune.faults import fault_point
from rewardtune.kl import KLController
from rewardtune.temporal import explained_variance, explained_variance_by_thirds
from rewardtune.training.checkpoints import Checkpoints, load_optimizer_state
from rewardtune.training.duals import DualAscent
from rewardtune.training.estimators import AdvantageEstimator
from rewardtune.training.lifecycle import (
    TERMINATED_FILE,
    StartRecord,
    Termination,
    guarded,
    is_main_process_env,
)
from rewardtune.training.logprob import PolicyDensity, flat_view
from rewardtune.training.optimize import PPOUpdate
from rewardtune.training.resets import NeuronResets, record_digests
from rewardtune.training.rollout import EpochSamples, EpochTimes, Rollout
from rewardtune.training.setup import Progress, Run, build_run, epoch_seed, resolve_device

__all__ = ["TERMINATED_FILE", "EpochSamples", "EpochTimes", "Trainer", "epoch_seed", "load_optimizer_state",
           "resolve_device"]

log = logging.getLogger(__name__)


def _run_part(name: str) -> property:
    """`trainer.<name>`: the `Run`'s part of that name (tests and benchmarks read, and may replace, them)."""
    return property(lambda self: getattr(self.built, name), lambda self, value: setattr(self.built, name, value),
                    doc=f"`Run.{name}`")


class Trainer:
    """One run: `build_run`'s parts and the stages that share them; `run()` is the whole job."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path) -> None:
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise RewardtuneError(f"--out {out_dir} is a file, not a directory; give the path of a run directory "
                                  "(created if missing)")
        self.start_record = StartRecord(Path(out_dir))
        try:
            self.built: Run = build_run(cfg, out_dir)
        except BaseException:
            if is_main_process_env():
                self.start_record.undo()
            raise
        run = self.built
        self.progress = Progress()
        tracking = cfg.training.stat_tracking
        stat_trackers = [PerPromptStatTracker(tracking.buffer_size, tracking.min_count) for _ in run.reward_names]
        critic = cfg.algorithm.critic
        self.kl_controller = KLController(critic.kl_init_coef, critic.kl_target, critic.kl_horizon)
        self.dual = DualAscent(cfg.algorithm, run.accelerator)
        self.termination = Termination(run.accelerator, run.device, cfg.checkpointing.termination_grace_s, run.checkpoint_dir)
        self.density = PolicyDensity(run)
        self.rollout = Rollout(run, self.density, self.progress, self.termination.safe_point)
        self.advantages = AdvantageEstimator(cfg, run.accelerator, run.device, stat_trackers, self.kl_controller,
                                             self.dual, has_critic=run.critics is not None)
        self.resets = NeuronResets(run, self.density)
        measure = self._measure_between_inner_epochs if self.resets.measures_neurons else None
        self.ppo = PPOUpdate(run, self.density, self.progress, self.termination.safe_point, measure)
        self.checkpoints = Checkpoints(run, self.progress, stat_trackers, self.kl_controller, self.dual, self.resets)

    def run(self, resume: bool = False) -> Path:
        """The whole job; on SIGTERM it checkpoints at the next safe point and raises `Terminated`."""
        with guarded(self.built, self.termination, self.progress, self.start_record):
            return self._run(resume)

    def _run(self, resume: bool) -> Path:
        cfg, run, progress = self.cfg, self.built, self.progress
        self.checkpoints.start(resume)
        for epoch in range(progress.epochs_done, cfg.training.epochs):
            set_seed(epoch_seed(cfg.training.seed, epoch, run.accelerator.process_index))
            self.termination.epoch_started()
            self.termination.safe_point(epoch)
            start = time.perf_counter()
            times = EpochTimes()
            samples = self.rollout.sample_epoch(epoch, times)  # sample and score
            advantage_stats = self.advantages.compute_advantages(samples)
            t0 = time.perf_counter()
            stats = {**advantage_stats, **self.ppo.train_epoch(samples, epoch)}
            self.ppo.step_health.check(epoch, stats, run.trained_parameters())
            times.training = time.perf_counter() - t0
            progress.epochs_done = epoch + 1
            if run.critics is not None:  # over all processes' (sample, step) pairs, and by thirds of the steps
                values = run.accelerator.gather(samples.extras["old_values"][..., 0])
                returns = run.accelerator.gather(samples.extras["returns"][..., 0])
                stats["value_explained_variance"] = explained_variance(values, returns)
                for third, ev in zip(("first", "middle", "last"), explained_variance_by_thirds(values, returns), strict=True):
                    stats[f"value_explained_variance_{third}_third"] = ev
            if run.constraints:
                stats |= self.dual.update_multipliers(samples, epoch)
            reset_now = self.resets.reset_due(epoch)
            if reset_now:
                self.checkpoints.save("pre_reset")
                fault_point("pre_reset_saved")
            if self.resets.measures_neurons:
                stats |= self.measure_and_reset(epoch, reset_now, cfg.training.inner_epochs - 1)
            self._log_epoch(epoch, samples, stats, times, start)
            fault_point("metrics")
            stopping, _ = self.termination.votes(True)
            saved = None
            if reset_now:
                saved = self.checkpoints.save("post_reset")
            elif stopping or progress.epochs_done % cfg.checkpointing.every_epochs == 0 or progress.epochs_done == cfg.training.epochs:
                saved = self.checkpoints.save()
            record_digests(run, "epoch", epoch)
            fault_point("epoch_end")
            self.termination.epoch_ended()
            if stopping and progress.epochs_done < cfg.training.epochs:
                name = saved.name if saved else checkpoint_name(progress.epochs_done, "post_reset" if reset_now else "regular")
                raise Terminated(f"SIGTERM: stopped after epoch {epoch} with checkpoint {name}; run again with --resume")
        return run.out_dir

    def _measure_between_inner_epochs(self, epoch: int, inner: int, probe: dict[str, torch.Tensor]) -> None:
        """The official code measures (and resets) after every inner epoch; the last one is `_run`'s."""
        self.resets.measure_and_reset(epoch, self.resets.reset_due(epoch), inner, probe)

    def _log_epoch(self, epoch: int, samples: EpochSamples, stats: dict, times: EpochTimes, start: float) -> None:
        """The epoch's metrics line (global over processes), written by the main process."""
        run = self.built
        epoch_images = len(samples) * run.accelerator.num_processes
        self.progress.samples_seen += epoch_images
        rewards = run.accelerator.gather(samples.rewards)
        record = {
            "epoch": epoch,
            "samples": self.progress.samples_seen,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            **stats,
            "lr": run.optimizer.param_groups[0]["lr"],
            "global_step": self.progress.global_step,
            "images_per_s": epoch_images / (time.perf_counter() - start),
            "time_sampling_s": times.sampling,
            "time_reward_s": times.reward,
            "time_reward_wait_s": times.reward_wait,
            "time_training_s": times.training,
        }
        if run.is_main:
            run.metrics.append(record)
            run.tracker.log_epoch(record, samples.images, samples.prompts, samples.rewards)
            log.info("epoch %d: reward %.4f ± %.4f, kl %.2e, clipfrac %.3f", epoch, record["reward_mean"],
                     record["reward_std"], record["approx_kl"], record["clipfrac"])

    # ------------------------------------------------------------------ the stages, as tests and benchmarks call them
    cfg = _run_part("cfg")
    accelerator = _run_part("accelerator")
    pipe = _run_part("pipe")
    unet = _run_part("unet")
    critics = _run_part("critics")
    tower = _run_part("tower")
    optimizer = _run_part("optimizer")
    trainable = _run_part("trainable")
    scheduler = _run_part("scheduler")
    prompts = _run_part("prompts")
    reward_fn = _run_part("reward_fn")
    constraints = _run_part("constraints")
    negative_embed = _run_part("negative_embed")
    num_train_steps = _run_part("num_train_steps")
    trainable_steps = _run_part("trainable_steps")

    @property
    def policy(self) -> torch.nn.Module:
        return self.built.policy

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    def sample_epoch(self, epoch: int, times: EpochTimes) -> EpochSamples:
        return self.rollout.sample_epoch(epoch, times)

    def compute_advantages(self, samples: EpochSamples) -> dict[str, float]:
        return self.advantages.compute_advantages(samples)

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        return self.ppo.train_epoch(samples, epoch)

    def update_multipliers(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        return self.dual.update_multipliers(samples, epoch)

    def measure_and_reset(self, epoch: int, reset: bool, inner: int = 0) -> dict[str, float]:
        """Score (and if `reset`, reset) neurons on the last trained inner epoch's probe."""
        return self.resets.measure_and_reset(epoch, reset, inner, self.ppo.probe)

    def log_prob_of(self, view: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.density.log_prob_of(view, model)

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.density.policy_log_prob(batch, rows, j, model)

    def _shuffled(self, samples: EpochSamples, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.ppo.shuffled(samples, generator)

    _view = staticmethod(flat_view)
