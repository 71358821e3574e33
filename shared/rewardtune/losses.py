"""PPO's clipped surrogate on per-step log-probs, and its diagnostics."""

from __future__ import annotations

import torch


def ppo_clipped_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))), rho = pi/pi_old (docs/algorithms.md §2)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


@torch.no_grad()
def ppo_diagnostics(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> dict[str, torch.Tensor]:
    """approx KL = ½ mean((log pi - log pi_old)^2) and the fraction of clipped ratios (as DDPO logs them)."""
    diff = log_prob - old_log_prob
    return {
        "approx_kl": 0.5 * (diff**2).mean(),
        "clipfrac": (torch.abs(torch.exp(diff) - 1.0) > clip_range).float().mean(),
    }
