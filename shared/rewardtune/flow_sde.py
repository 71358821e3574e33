"""The rectified-flow denoising MDP: an SDE step with the same marginals as the Euler ODE, and its log-density.

Flow-GRPO's formulation (Liu et al. 2025). With sigma = sigma_i, sigma' = sigma_{i+1}, dt = sigma' - sigma < 0,
velocity v and noise level a:

    g    = a * sqrt(sigma / (1 - sigma))        (at sigma = 1: sigma' in the denominator, as Flow-GRPO does)
    mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
    std  = g * sqrt(-dt)

The CPS variant (coefficients-preserving sampling) uses std = sigma' sin(a pi / 2) and
mean = x0_hat (1 - sigma') + x1_hat sqrt(sigma'^2 - std^2), x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v.
Both log-densities are the full Gaussian one averaged over non-batch dims (the DDPO convention). sigma and
sigma' are per sample (TDPO shuffles the time axis per sample) and come from the stored trajectory, never
from matching a timestep by float equality.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rewardtune.diffusion import _per_sample, sample_step

SdeType = Literal["sde", "cps"]


def _sigmas(sigma: torch.Tensor | float, sigma_next: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = torch.as_tensor(sigma, device=like.device, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, device=like.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    if sigma_next.ndim == 0:
        sigma_next = sigma_next.expand(like.shape[0])
    if bool((sigma_next >= sigma).any()) or bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError("flow step needs 1 >= sigma > sigma_next >= 0 (a denoising step); check the stored schedule")
    return _per_sample(sigma, like.ndim), _per_sample(sigma_next, like.ndim)


def flow_posterior(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sde_type: SdeType = "sde",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of pi(x_{sigma'} | x_sigma) in float32; refuses a <= 0 and std = 0 (no density)."""
    if not noise_level > 0:
        raise ValueError(f"noise_level={noise_level}: a <= 0 makes the step deterministic (no log-density); use a > 0")
    x, v = sample.float(), velocity.float()
    s, s_next = _sigmas(sigma, sigma_next, x)
    if sde_type == "sde":
        dt = s_next - s
        denominator = 1 - torch.where(s == 1, s_next, s)
        g = noise_level * (s / denominator).sqrt()
        mean = x * (1 + g**2 * dt / (2 * s)) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
        std = g * (-dt).sqrt()
    elif sde_type == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat, x1_hat = x - s * v, x + (1 - s) * v
        mean = x0_hat * (1 - s_next) + x1_hat * (s_next**2 - std**2).clamp(min=0).sqrt()
    else:
        raise ValueError(f"sde_type={sde_type!r}; use 'sde' or 'cps'")
    if bool((std == 0).any()) or not bool(torch.isfinite(std).all()):
        raise ValueError(
            "a flow step has std 0 or an infinite std (sigma' = 0 with cps, or sigma = sigma' = 1) and no density; "
            "keep that step outside the SDE window (it is an ODE step by default)"
        )
    return mean, std


def flow_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    sde_type: SdeType = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic flow step: (x_{sigma'}, log pi(x_{sigma'} | x_sigma)); differentiable w.r.t. `velocity`."""
    mean, std = flow_posterior(velocity, sample, sigma, sigma_next, noise_level, sde_type)
    return sample_step(mean, std, prev_sample, generator)


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
    """The deterministic ODE step x + v dt in float32 (FlowMatchEulerDiscreteScheduler.step's arithmetic)."""
    x = sample.float()
    s, s_next = _sigmas(sigma, sigma_next, x)
    return x + (s_next - s) * velocity.float()


def sde_steps(num_steps: int, window: tuple[int, int] | None = None, train_last_step: bool = False) -> list[bool]:
    """Which steps are stochastic (sampled by the SDE, with a log-prob, trainable); the others are Euler steps.

    `window` = (start, size) keeps the SDE on steps start .. start+size-1 only (MixGRPO / Flow-GRPO-Fast);
    the last step (to sigma' = 0) is an ODE step unless `train_last_step` (Flow-GRPO trains K-1 of K steps).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: a flow trajectory needs at least 2 steps")
    last = num_steps if train_last_step else num_steps - 1
    start, size = (0, last) if window is None else window
    if start < 0 or size < 1 or start + size > last:
        raise ValueError(
            f"sde window (start={start}, size={size}) must lie within the {last} trainable steps 0..{last - 1}"
        )
    return [start <= k < start + size for k in range(num_steps)]
