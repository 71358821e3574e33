"""TDPO's timestep-aware critic: the LAION-aesthetic-predictor MLP on image embeddings of x_t.

The official code has no nonlinearity between layers; the neuron-reset machinery reads ReLU of each
hidden layer's output as that neuron's activation (docs/algorithms.md §3-4). Every layer's weights are drawn
with std 1/(d+1), d the critic's *input* size (not each layer's fan-in), at init and at every reset.
"""

from __future__ import annotations

import torch
from torch import nn


def init_std(input_dim: int) -> float:
    """The official critic's weight std 1/(d+1), with d the critic's input size, used for every layer."""
    return 1.0 / (input_dim + 1)


def init_linear_(
    layer: nn.Linear, std: float, generator: torch.Generator | None = None, rows: torch.Tensor | None = None
) -> None:
    """Weights ~ N(0, std), bias 0 — for the whole layer or just `rows` (output neurons)."""
    with torch.no_grad():
        if rows is None:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
            if layer.bias is not None:
                layer.bias.zero_()
            return
        idx = torch.nonzero(rows.cpu()).flatten()
        fresh = torch.randn(len(idx), layer.in_features, generator=generator) * std
        layer.weight[idx.to(layer.weight.device)] = fresh.to(layer.weight)
        if layer.bias is not None:
            layer.bias[idx.to(layer.bias.device)] = 0.0


def embedded_steps(num_steps: int, stride: int) -> list[int]:
    """Steps whose x_t is decoded and embedded: every `stride`-th, and always the last (the closest to the image)."""
    steps = list(range(0, num_steps, stride))
    if steps[-1] != num_steps - 1:
        steps.append(num_steps - 1)
    return steps


def interpolate_step_embeddings(steps: list[int], embeddings: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Fill [B, K, D] embeddings known at `steps` (sorted, first 0, last num_steps-1) to [B, num_steps, D].

    Linear in the step index between known neighbours, then re-normalized: the tower's embeddings are unit
    vectors and the critic was built for those, so an interpolated state should be one too.
    """
    if steps[0] != 0 or steps[-1] != num_steps - 1 or len(steps) != embeddings.shape[1]:
        raise ValueError(f"steps {steps} must start at 0, end at {num_steps - 1} and match {embeddings.shape[1]} embeddings")
    if len(steps) == num_steps:
        return embeddings
    known = torch.tensor(steps, dtype=torch.float32)
    grid = torch.arange(num_steps, dtype=torch.float32)
    right = torch.searchsorted(known, grid, right=False).clamp(1, len(steps) - 1)
    left = right - 1
    weight = ((grid - known[left]) / (known[right] - known[left])).to(embeddings)
    left, right = left.to(embeddings.device), right.to(embeddings.device)
    weight = weight.to(embeddings.device)[None, :, None]
    mixed = embeddings[:, left] * (1 - weight) + embeddings[:, right] * weight
    return torch.nn.functional.normalize(mixed, dim=-1)


class ValueCritic(nn.Module):
    """Linear d->1024, Dropout, ->128, Dropout, ->64, Dropout, ->16, ->1 (sizes configurable)."""

    def __init__(self, input_dim: int, hidden_sizes: list[int], dropout: list[float], generator: torch.Generator | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for size, p in zip(hidden_sizes, dropout, strict=True):
            layers.append(nn.Linear(width, size))
            if p > 0:
                layers.append(nn.Dropout(p))
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)
        self.init_std = init_std(input_dim)
        for layer in self.linears():
            init_linear_(layer, self.init_std, generator)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings.float()).squeeze(-1)


class Critics(nn.Module):
    """One value critic per reward (the main reward first, then CDPO's constrained rewards)."""

    def __init__(self, names: list[str], input_dim: int, hidden_sizes: list[int], dropout: list[float], seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = names
        self.init_std = init_std(input_dim)
        self.heads = nn.ModuleList(ValueCritic(input_dim, hidden_sizes, dropout, generator) for _ in names)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., R] values, one per reward."""
        return torch.stack([head(embeddings) for head in self.heads], dim=-1)
