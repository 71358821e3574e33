"""TDPO's temporal rewards: per-step rewards, returns, step-specific advantages, the value loss.

Pure functions on [N, K] tensors (N samples, K denoising steps, step k = the k-th step taken,
so k = K-1 produces x_0). See docs/algorithms.md §3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-8


def step_rewards(terminal: torch.Tensor, num_steps: int, kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """r_k: the terminal reward at the last step, minus kl_coef * kl_k at every step (kl: `kl.kl_penalty`)."""
    rewards = torch.zeros(terminal.shape[0], num_steps, dtype=torch.float32, device=terminal.device)
    rewards[:, -1] = terminal
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl
    return rewards


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_k = r_k + gamma R_{k+1}, computed backwards along the step axis."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for k in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, k] + gamma * running
        returns[:, k] = running
    return returns


def standardize(values: torch.Tensor, groups: Sequence[str] | None = None) -> torch.Tensor:
    """Zero mean, unit std over all (sample, step) pairs, or within each prompt's samples."""
    if groups is None:
        return (values - values.mean()) / (values.std(unbiased=False) + EPS)
    out = torch.empty_like(values)
    for group in dict.fromkeys(groups):
        rows = torch.tensor([g == group for g in groups], device=values.device)
        chunk = values[rows]
        out[rows] = (chunk - chunk.mean()) / (chunk.std(unbiased=False) + EPS)
    return out


def temporal_advantages(returns: torch.Tensor, values: torch.Tensor, groups: Sequence[str] | None = None) -> torch.Tensor:
    """A_k = R_k - V_old(s_k), standardized (TDPO drops DDPO's advantage clipping)."""
    return standardize(returns - values, groups)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """½ mean(max((V - R)^2, (clip(V, V_old ± eps) - R)^2)), PPO's pessimistic value loss."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target): 1 is a perfect critic, 0 no better than a constant."""
    var = target.var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - (target - predicted).var(unbiased=False) / var)


def explained_variance_by_thirds(predicted: torch.Tensor, target: torch.Tensor) -> list[float]:
    """`explained_variance` over the first, middle and last third of the step axis ([B, K], k = 0 the noisiest step).

    Why: a critic that sees only the decoded x_t (no prompt) cannot predict a prompt-dependent return from near-pure
    noise, so its explained variance is bounded at early steps whatever its capacity; the thirds show where it learns.
    """
    k = target.shape[1]
    bounds = [0, round(k / 3), round(2 * k / 3), k]
    return [explained_variance(predicted[:, a:b].reshape(-1), target[:, a:b].reshape(-1)) if b > a else float("nan")
            for a, b in zip(bounds, bounds[1:], strict=False)]
