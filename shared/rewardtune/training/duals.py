"""CDPO's dual ascent: the Lagrange multipliers of the constraints, updated once per epoch from the
gathered constraint rewards, and the thresholds they are measured against.
"""

from __future__ import annotations

from accelerate import Accelerator

from rewardtune.config import AlgorithmConfig
from rewardtune.errors import CheckpointError
from rewardtune.lagrangian import DualState, dual_scale
from rewardtune.training.rollout import EpochSamples


class DualAscent:
    """The multipliers (`state`) and thresholds of `algorithm.constraints`; saved with the checkpoints."""

    def __init__(self, algorithm: AlgorithmConfig, accelerator: Accelerator) -> None:
        self.algorithm = algorithm
        self.accelerator = accelerator
        self.constraints = algorithm.constraints
        self.state = DualState(integral=[c.initial_multiplier for c in self.constraints])
        # None: relative to the base policy, set from epoch 0's rewards
        self.thresholds: list[float | None] = [c.threshold for c in self.constraints]

    @property
    def multipliers(self) -> list[float]:
        return self.state.multipliers

    def load_state(self, state: dict, thresholds: list[float | None]) -> None:
        self.state = DualState(**state)
        self.thresholds = thresholds

    def update_multipliers(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        """Projected dual ascent on c_k - Ĵ_k once per epoch; relative thresholds come from epoch 0's base policy."""
        gathered = self.accelerator.gather(samples.extras["all_rewards"])
        means = gathered.mean(dim=0).tolist()[1:]
        for k, spec in enumerate(self.constraints):
            if self.thresholds[k] is None:
                if epoch != 0:
                    raise CheckpointError("relative CDPO thresholds are set at epoch 0; resume from a checkpoint that has them")
                self.thresholds[k] = means[k] - spec.relative_margin
        lagrange = self.algorithm.lagrange
        if lagrange.normalize == "base_std" and not self.state.scales:
            if epoch != 0:
                raise CheckpointError("scale-free CDPO scales are set at epoch 0; resume from a checkpoint that has them")
            stds = gathered.std(dim=0).tolist()[1:] if gathered.shape[0] > 1 else [0.0] * len(self.constraints)
            self.state.scales = [dual_scale(s, lagrange.scale_floor) for s in stds]
        self.state.update(self.thresholds, means, lagrange.learning_rate, lagrange.pid_kp, lagrange.pid_kd)
        record = {}
        for k, spec in enumerate(self.constraints):
            name = spec.reward.name
            record |= {f"lambda_{name}": self.state.multipliers[k], f"constraint_{name}": means[k],
                       f"threshold_{name}": self.thresholds[k]}
        return record
