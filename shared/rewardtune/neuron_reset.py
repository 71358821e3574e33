"""TDPO-R's reset of active neurons (docs/algorithms.md §4): score neurons by their activation, reset the
ones that carry primacy bias, leave the dormant ones (a regularizer against overoptimization) alone."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rewardtune.critic import init_linear_

SCORE_EPS = 1e-9


def neuron_scores(activations: torch.Tensor) -> torch.Tensor:
    """s_i = mean |ReLU(a_i)| over the batch, normalized by the layer's mean score. [B, n] -> [n]."""
    scores = torch.relu(activations.float()).abs().reshape(-1, activations.shape[-1]).mean(dim=0)
    return scores / (scores.mean() + SCORE_EPS)


def dormant_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    return scores <= tau


def select_neurons(scores: torch.Tensor, rule: str, tau: float = 0.0, tau_high: float = 2.0, fraction: float = 0.1) -> torch.Tensor:
    """Which neurons to reset: active (score > tau, TDPO-R), overactive (> tau_high), or the top fraction."""
    if rule == "active":
        return scores > tau
    if rule == "overactive":
        return scores > tau_high
    if rule == "top_fraction":
        mask = torch.zeros_like(scores, dtype=torch.bool)
        count = math.ceil(fraction * scores.numel())
        if count:
            mask[torch.topk(scores, count).indices] = True
        return mask
    raise ValueError(f"unknown reset rule {rule!r}")


def dormant_overlap(previous: torch.Tensor | None, current: torch.Tensor) -> float:
    """|D_prev ∩ D_now| / |D_prev ∪ D_now| (Jaccard); NaN when there is no previous measurement."""
    if previous is None:
        return float("nan")
    union = (previous | current).sum().item()
    return 1.0 if union == 0 else (previous & current).sum().item() / union


@torch.no_grad()
def record_activations(layers: list[nn.Module], forward: Callable[[], object]) -> list[torch.Tensor]:
    """Outputs of `layers` during one `forward()`, flattened to [positions, neurons]."""
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(index: int):
        def store(_module, _inputs, output):
            captured[index] = output.detach().float().reshape(-1, output.shape[-1])

        return store

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in captured):
        raise RuntimeError("a hooked layer did not run during the activation pass")
    return captured  # type: ignore[return-value]


def zero_adam_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Zero exp_avg and exp_avg_sq of `param` at `index` along `dim`, so Adam does not drag reset weights back."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index.to(state[key].device), 0.0)


@torch.no_grad()
def reset_linear_neurons(
    layer: nn.Linear,
    next_layer: nn.Linear,
    mask: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    std: float,
) -> None:
    """Re-draw incoming weights (bias 0) of the masked neurons and their outgoing column in `next_layer`,
    both from N(0, std): the critic's init distribution (`critic.init_std`, the same for every layer)."""
    if not mask.any():
        return
    index = torch.nonzero(mask.cpu()).flatten()
    init_linear_(layer, std, generator, rows=mask)
    fresh = torch.randn(next_layer.out_features, len(index), generator=generator) * std
    next_layer.weight[:, index.to(next_layer.weight.device)] = fresh.to(next_layer.weight)
    if optimizer is not None:
        zero_adam_moments(optimizer, layer.weight, index, 0)
        if layer.bias is not None:
            zero_adam_moments(optimizer, layer.bias, index, 0)
        zero_adam_moments(optimizer, next_layer.weight, index, 1)


@torch.no_grad()
def reset_lora_neurons(
    down: nn.Linear, up: nn.Linear, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None, generator: torch.Generator
) -> None:
    """A LoRA rank unit is a neuron: re-draw its down-projection row (peft's gaussian init, std 1/r) and
    zero its up-projection column, so the unit restarts without an immediate jump in the output."""
    if not mask.any():
        return
    index = torch.nonzero(mask.cpu()).flatten()
    rank = down.out_features
    fresh = torch.randn(len(index), down.in_features, generator=generator) / rank
    down.weight[index.to(down.weight.device)] = fresh.to(down.weight)
    up.weight[:, index.to(up.weight.device)] = 0.0
    if optimizer is not None:
        zero_adam_moments(optimizer, down.weight, index, 0)
        zero_adam_moments(optimizer, up.weight, index, 1)


@dataclass
class LayerReport:
    name: str
    total: int
    dormant: int
    reset: int
    overlap: float


def lora_pairs(unet: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """(name, lora_A, lora_B) of every LoRA-wrapped layer of the (peft-adapted) UNet."""
    pairs = []
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            pairs.append((name, module.lora_A["default"], module.lora_B["default"]))
    return pairs
