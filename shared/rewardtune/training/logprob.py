"""The policy's density: log pi(x_{t-1} | x_t) of (sample, step) pairs, recomputed with the model, and the
flat batches it is computed on. Shared by the PPO loop, the reference log-probs and the reset probe.
"""

from __future__ import annotations

import torch

from rewardtune.diffusion import (
    ddim_step_with_logprob,
    guided_noise_pred,
)
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
        run, cfg = self.run, self.run.cfg
        model = model or run.unet
        if run.is_flow:
            return self._flow_log_prob(view, model)
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
        _, log_prob = ddim_step_with_logprob(
            run.scheduler, noise_pred, timesteps, latents, eta=cfg.sampling.eta, prev_sample=view["next_latents"],
            check_std=not cfg.performance.sync_free_steps,  # the sampled schedule was checked once
        )
        return log_prob

    def _flow_log_prob(self, view: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        """The flow family's log-prob at the stored per-sample (timestep, sigma, sigma') of trainable steps."""
        run = self.run
        step = Step(-1, view["timesteps"], view["sigmas"], view["sigmas_next"], stochastic=True)
        cond = {name.removeprefix("cond."): value for name, value in view.items() if name.startswith("cond.")}
        with run.accelerator.autocast():
            out = run.family.forward(view["latents"], step, cond, run.cfg.sampling.guidance_scale, model=model)
        _, log_prob = run.family.step_with_logprob(out, step, view["latents"], prev=view["next_latents"])
        return log_prob

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log-probs of the rows' step column j of a [sample, step] batch."""
        return self.log_prob_of(flat_view(batch, [(rows, j)]), model)
