"""Advantage estimators, one per algorithm: DDPO's per-prompt normalized reward for every step, GRPO's
group-normalized one, TDPO's temporal returns minus the old critic values, CDPO's Lagrangian combination.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rewardtune.advantages import PerPromptStatTracker, batch_normalized
from rewardtune.config import RunConfig
from rewardtune.group_advantages import group_advantages
from rewardtune.kl import KLController, kl_penalty, sample_kl
from rewardtune.lagrangian import combine_advantages
from rewardtune.temporal import (
    discounted_returns,
    standardize,
    step_rewards,
)
from rewardtune.training.duals import DualAscent
from rewardtune.training.rollout import EpochSamples


class AdvantageEstimator:
    """`compute_advantages` fills `EpochSamples.advantages`; statistics are gathered across processes.

    It updates the per-prompt `stat_trackers` (one per reward) and the adaptive `kl_controller`, and reads
    CDPO's current multipliers from `dual`; all three are saved with the checkpoints.
    """

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, device: torch.device,
                 stat_trackers: list[PerPromptStatTracker], kl_controller: KLController, dual: DualAscent,
                 has_critic: bool) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = device
        self.stat_trackers = stat_trackers
        self.kl_controller = kl_controller
        self.dual = dual
        self.has_critic = has_critic

    def normalized_rewards(self, rewards: torch.Tensor, prompts: list[str], tracker: PerPromptStatTracker) -> torch.Tensor:
        """Normalize rewards by their prompt's (or the batch's) statistics, gathered across all processes.

        GRPO: by the prompt's group of this epoch (no history), `group_advantages`.
        """
        all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        all_rewards = self.accelerator.gather(rewards).cpu().numpy()
        if self.cfg.algorithm.name == "grpo":
            normalized = group_advantages(all_prompts, all_rewards, self.cfg.algorithm.group.std)
        elif self.cfg.training.stat_tracking.enabled:
            normalized = tracker.update(all_prompts, all_rewards)
        else:
            normalized = batch_normalized(all_rewards)
        n = len(prompts)
        mine = normalized[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
        mine = torch.as_tensor(mine, dtype=torch.float32, device=self.device)
        # DDPO clips its advantage; TDPO's terminal reward is unclipped (official clip_range_reward = 0)
        clip = self.cfg.algorithm.critic.reward_clip if self.has_critic else self.cfg.training.adv_clip_max
        return mine.clamp(-clip, clip) if clip > 0 else mine

    def compute_advantages(self, samples: EpochSamples) -> dict[str, float]:
        """DDPO/GRPO: one clipped advantage for every step. TDPO: A_k = R_k - V_old(s_k) per reward, per step;
        CDPO combines them with the Lagrange multipliers. Returns the KL penalty's statistics (if any)."""
        steps = samples.timesteps.shape[1]
        all_rewards = samples.extras["all_rewards"]
        terminals = [self.normalized_rewards(all_rewards[:, r], samples.prompts, tracker)
                     for r, tracker in enumerate(self.stat_trackers)]
        if not self.has_critic:
            samples.advantages = terminals[0][:, None].expand(-1, steps)
            return {}
        critic = self.cfg.algorithm.critic
        kl, beta, stats = None, 0.0, {}
        if critic.kl_coef > 0:
            ref = samples.extras["ref_log_probs"]
            kl = kl_penalty(samples.log_probs, ref, critic.kl_estimator)
            beta = critic.kl_coef * self.kl_controller.value
            measured = self.accelerator.gather(sample_kl(samples.log_probs, ref)).mean().item()
            stats = {"kl_mean": measured, "kl_controller": self.kl_controller.value, "kl_beta": beta}
            self.kl_controller.update(measured, len(samples) * self.accelerator.num_processes)
        groups = samples.prompts if critic.advantage_norm == "per_prompt" else None
        returns, advantages = [], []
        for r, terminal in enumerate(terminals):
            step_r = step_rewards(terminal, steps, kl if r == 0 else None, beta)
            returns.append(discounted_returns(step_r, critic.gamma))
            baseline = 0.0 if critic.hold_value_at_zero else samples.extras["old_values"][..., r]
            advantages.append(self._standardized(returns[-1] - baseline, groups))
        samples.extras["returns"] = torch.stack(returns, dim=-1)
        samples.advantages = combine_advantages(advantages[0], advantages[1:], self.dual.multipliers)
        return stats

    def _standardized(self, values: torch.Tensor, groups: list[str] | None) -> torch.Tensor:
        """Standardization over all processes' (sample, step) pairs, globally or per prompt: N processes
        standardize exactly as one process holding all their samples would."""
        if self.accelerator.num_processes == 1:
            return standardize(values, groups)
        everything = standardize(self.accelerator.gather(values), gather_object(groups) if groups is not None else None)
        n = values.shape[0]
        return everything[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]

