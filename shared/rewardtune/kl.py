"""TDPO's per-step KL penalty against the frozen base policy: the estimators and the KL controller.

Both follow the official TDPO code (docs/algorithms.md §3). With d = log pi - log pi_ref per step, the
penalty added to every step's reward is -kl_coef * beta * k(d), beta the controller's current value:
fixed, or adapted once per epoch towards a target KL as in PPO (Ziegler et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("kl", "abs", "square", "clip", "approx", "js")
# the proportional error of the adaptive controller is clipped to ±this (the official value)
ADAPTIVE_ERROR_CLIP = 0.2


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-step divergence estimate k(log pi, log pi_ref), elementwise.

    With d = log pi - log pi_ref: kl = d, abs = |d|, square = d²/2, clip = max(d, 0), approx =
    (e^d - 1) - d; js = ½[max(log pi - log m, 0) + max(log pi_ref - log m, 0)] with m = ½(pi + pi_ref),
    the densities taken as exp of the (per-pixel mean) log-probabilities, as the official code does.
    """
    diff = log_prob - ref_log_prob
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "square":
        return 0.5 * diff**2
    if kind == "clip":
        return diff.clamp(min=0.0)
    if kind == "approx":
        return torch.expm1(diff) - diff
    if kind == "js":
        log_m = torch.logaddexp(log_prob, ref_log_prob) - math.log(2.0)  # log ½(e^a + e^b), without overflow
        return 0.5 * ((log_prob - log_m).clamp(min=0.0) + (ref_log_prob - log_m).clamp(min=0.0))
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_ESTIMATORS)}")


def gaussian_kl_same_std(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std²) || N(ref_mean, std²)) per element, averaged over non-batch dims: [B, ...] -> [B].

    GRPO's KL to the base policy (Flow-GRPO): both step densities share the std (it depends on the schedule,
    not the model), so the KL is the squared mean gap over twice the variance. This is the exact closed form;
    Flow-GRPO's code divides by 2g² (g without the sqrt(-dt) of its std) on its `sde` steps, i.e. its value is
    this one times -dt, so its beta is not ours (docs/algorithms.md §8, deviations).
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def sample_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-sample KL of the controller: log pi - log pi_ref summed over the steps, [N, K] -> [N].

    The controller is fed their mean over every process's samples (the official `mean_kl`).
    """
    return (log_prob - ref_log_prob).sum(dim=1)


def adaptive_kl_update(value: float, current: float, target: float, n_steps: int, horizon: int) -> float:
    """beta_{t+1} = beta_t * (1 + clip(current/target - 1, ±0.2) * n_steps / horizon)."""
    error = min(max(current / target - 1.0, -ADAPTIVE_ERROR_CLIP), ADAPTIVE_ERROR_CLIP)
    return value * (1.0 + error * n_steps / horizon)


@dataclass
class KLController:
    """beta of the KL penalty: fixed when `target` is None, else adapted once per epoch."""

    value: float
    target: float | None = None
    horizon: int = 2000

    def update(self, current: float, n_steps: int) -> None:
        """After an epoch of `n_steps` samples (all processes) whose measured KL is `current`."""
        if self.target is not None:
            self.value = adaptive_kl_update(self.value, current, self.target, n_steps, self.horizon)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
