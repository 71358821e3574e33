"""CDPO's constrained objective (docs/algorithms.md §5): max E[r_0] s.t. E[r_k] >= c_k, via Lagrange
multipliers updated by projected dual ascent (optionally PID-damped, Stooke et al. 2020).

The dual step can be scale-free (`algorithm.lagrange.normalize: base_std`): the violation c_k - Ĵ_k is
divided by the base model's (epoch-0) std of reward k, so one `lagrange.learning_rate` means "λ moves by
η per standard deviation of violation" for a reward in [0, 1] and for one in [0, 100] alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def dual_scale(base_std: float, floor: float) -> float:
    """The divisor of reward k's violation: its base-model std, never below `floor` (a constant reward has std 0)."""
    return max(float(base_std), floor)


def combine_advantages(main: torch.Tensor, auxiliary: list[torch.Tensor], multipliers: list[float]) -> torch.Tensor:
    """(A^0 + Σ λ_k A^k) / (1 + Σ λ_k): the policy's per-step advantage under the Lagrangian."""
    total = main.clone()
    for advantage, lam in zip(auxiliary, multipliers, strict=True):
        total = total + lam * advantage
    return total / (1.0 + sum(multipliers))


@dataclass
class DualState:
    """λ_k = max(0, I_k + kp e_k + kd (e_k - e_k')), I_k ← max(0, I_k + η e_k), e_k = c_k - Ĵ_k.

    With kp = kd = 0 this is plain projected dual ascent: λ_k ← max(0, λ_k + η (c_k - Ĵ_k)).
    `scales` (one per constraint; empty = all 1) divide e_k: e_k = (c_k - Ĵ_k) / s_k.
    """

    integral: list[float]
    previous_error: list[float] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.multipliers:
            self.multipliers = list(self.integral)
        if not self.previous_error:
            self.previous_error = [0.0] * len(self.integral)

    def update(self, thresholds: list[float], means: list[float], lr: float, kp: float = 0.0, kd: float = 0.0) -> list[float]:
        scales = self.scales or [1.0] * len(thresholds)
        for k, (c, j) in enumerate(zip(thresholds, means, strict=True)):
            error = (c - j) / scales[k]
            self.integral[k] = max(0.0, self.integral[k] + lr * error)
            self.multipliers[k] = max(0.0, self.integral[k] + kp * error + kd * (error - self.previous_error[k]))
            self.previous_error[k] = error
        return self.multipliers

    def state_dict(self) -> dict:
        return {"integral": self.integral, "previous_error": self.previous_error, "multipliers": self.multipliers,
                "scales": self.scales}
