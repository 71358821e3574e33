"""The policy's density: log pi(x_{t-1} | x_t) of (sample, step) pairs, recomputed with the model, and the
flat batches it is computed on. Shared by the PPO loop, the reference log-probs and the reset probe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rewardtune.diffusion import ddim_posterior, guided_noise_pred, sample_step
from rewardtune.families.base import Step
from rewardtune.training.setup import Run


def is_row_field(name: str) -> bool:
    """Fields indexed by sample only (text conditioning); all others are [sample, step, ...]."""
    return name in ("prompt_embeds", "negative_embeds") or name.startswith("cond.")


def flat_view(batch: dict[str, torch.Tensor], chunk: list[tuple[slice, int]]) -> dict[str, torch.Tensor]:
    """The (sample, step) pairs of a chunk as one flat batch."""
    out = {}
    for name, value in batch.items():
        if is_row_field(name):
            parts = [value[rows] for rows, _ in chunk]
        else:
            parts = [value[rows, j] for rows, j in chunk]
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out


class PolicyDensity:
    """log-probs of the run's policy (the prepared denoiser unless another model is given)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def log_prob_of(self, view: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """log pi(x_{t-1} | x_t) of each pair in a flat batch, recomputed with gradients."""
        return self.posterior_of(view, model)[0]

    def posterior_of(
        self, view: dict[str, torch.Tensor], model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of the stored next latents, mean, std) of each pair's step density, from one model call:
        the log-prob feeds the PPO ratio, the mean GRPO's KL to the base policy."""
        run, cfg = self.run, self.run.cfg
        model = model or run.unet
        if run.is_flow:
            return self._flow_posterior(view, model)
        latents, timesteps = view["latents"], view["timesteps"]
        model_dtype = next(model.parameters()).dtype
        with run.accelerator.autocast():
            noise_pred = guided_noise_pred(
                model,
                run.scheduler.scale_model_input(latents, timesteps).to(model_dtype),
                timesteps,
                view["prompt_embeds"],
                view["negative_embeds"],
                cfg.sampling.guidance_scale,
            )
        mean, std = ddim_posterior(
            run.scheduler, noise_pred, timesteps, latents, cfg.sampling.eta,
            check_std=not cfg.performance.sync_free_steps,  # the sampled schedule was checked once
        )
        return sample_step(mean, std, view["next_latents"])[1], mean, std

    def _flow_posterior(self, view: dict[str, torch.Tensor], model: torch.nn.Module):
        """The flow family's step density at the stored per-sample (timestep, sigma, sigma') of trainable steps."""
        run = self.run
        step = Step(-1, view["timesteps"], view["sigmas"], view["sigmas_next"], stochastic=True)
        cond = {name.removeprefix("cond."): value for name, value in view.items() if name.startswith("cond.")}
        with run.accelerator.autocast():
            out = run.family.forward(view["latents"], step, cond, run.cfg.sampling.guidance_scale, model=model)
        mean, std = run.family.posterior(out, step, view["latents"])
        return sample_step(mean, std, view["next_latents"])[1], mean, std

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log-probs of the rows' step column j of a [sample, step] batch."""
        return self.log_prob_of(flat_view(batch, [(rows, j)]), model)


@contextmanager
def reference_policy(run: Run) -> Iterator[torch.nn.Module]:
    """The frozen base policy of the KL terms: the run's copy (full fine-tune), else its LoRA policy with the
    adapters off for the duration (no copy); use under `torch.no_grad()`."""
    if run.reference_unet is not None:
        yield run.reference_unet
        return
    run.policy.disable_adapters()
    try:
        yield run.policy
    finally:
        run.policy.enable_adapters()
