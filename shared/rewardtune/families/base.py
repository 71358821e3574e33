"""The model-family seam: what the RL loop needs from a text-to-image model, and nothing more.

A family turns prompts into conditioning, draws initial latents, lists the denoising steps with
everything a step needs stored per step (timestep, and for flow models sigma and sigma'), runs the
guided model forward, takes one stochastic step with its log-density, decodes, and saves/loads LoRA.
The trainer (phase 2) talks only to this protocol; `sd` is today's DDIM/UNet path, `flow` is SD3/FLUX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# Batch-first text conditioning (e.g. embeds, negative_embeds, pooled, negative_pooled): rows index samples.
Conditioning = dict[str, torch.Tensor]


def select(cond: Conditioning, rows) -> Conditioning:
    return {name: value[rows] for name, value in cond.items()}


def concat(conds: list[Conditioning]) -> Conditioning:
    return {name: torch.cat([c[name] for c in conds]) for name in conds[0]}


@dataclass
class Step:
    """One denoising step's inputs, shared (0-d) or per sample ([B]), exactly as stored with a trajectory.

    `sigma`/`sigma_next` are None for DDIM. `stochastic` steps are sampled with noise and have a log-prob
    (the trainable ones); the others are deterministic (flow: Euler/ODE steps outside the SDE window).
    """

    index: int
    timestep: torch.Tensor
    sigma: torch.Tensor | None = None
    sigma_next: torch.Tensor | None = None
    stochastic: bool = True


@dataclass
class Rollout:
    """A batch of trajectories; index k of the step axis is the k-th denoising step."""

    latents: torch.Tensor  # [B, K+1, ...] x_T ... x_0 (float32)
    timesteps: torch.Tensor  # [B, K]
    log_probs: torch.Tensor  # [B, K]; 0 at deterministic steps
    stochastic: torch.Tensor  # [K] bool: steps with a log-prob (the trainable ones)
    conditioning: Conditioning
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    sigmas: torch.Tensor | None = None  # [B, K] flow only
    sigmas_next: torch.Tensor | None = None  # [B, K]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def step(self, k: int | torch.Tensor, rows=slice(None)) -> Step:
        """The stored inputs of step k (an int, or a [B] tensor of per-sample step indices after shuffling)."""
        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            values = values[rows]
            if isinstance(k, int):
                return values[:, k]
            return values.gather(1, k.to(values.device)[:, None])[:, 0]

        flags = self.stochastic[k] if isinstance(k, int) else self.stochastic[k.to(self.stochastic.device)]
        if bool(flags.any()) != bool(flags.all()):
            raise ValueError("a batch mixes SDE and ODE steps; shuffle only the stochastic (trainable) steps")
        index = k if isinstance(k, int) else -1
        return Step(index, pick(self.timesteps), pick(self.sigmas), pick(self.sigmas_next), bool(flags.all()))


@runtime_checkable
class PolicyFamily(Protocol):
    """What the RL loop needs from a model family (see docs/families.md)."""

    name: str
    model: torch.nn.Module  # the trained denoiser (UNet or transformer)
    default_lora_targets: tuple[str, ...]

    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning: ...

    def check_resolution(self, resolution: int) -> None:
        """Raise `ConfigError` unless the model can sample images of this side (its latent grid's multiple)."""

    def initial_latents(self, batch: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor: ...

    def steps(self, num_steps: int, resolution: int) -> list[Step]: ...

    def forward(
        self, latents: torch.Tensor, step: Step, cond: Conditioning, guidance_scale: float, model: torch.nn.Module | None = None
    ) -> torch.Tensor: ...

    def posterior(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_with_logprob(
        self,
        model_out: torch.Tensor,
        step: Step,
        latents: torch.Tensor,
        prev: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def predicted_clean(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def add_lora(self, rank: int, alpha: float | None, targets: list[str] | None = None) -> list[torch.nn.Parameter]: ...

    def save_lora(self, directory: Path) -> None: ...

    def load_lora(self, directory: Path) -> None: ...
