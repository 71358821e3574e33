"""Family-driven trajectory sampling: x_T -> x_0 recording what PPO needs per step (the `sample` stage of a run)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewardtune.families.base import Conditioning, PolicyFamily, Rollout, Step

# Called before each step with (step index, x_t); TDPO stores critic inputs through it.
StepHook = Callable[[int, torch.Tensor], None]
# Called after each model call with (step, x_t, guided model output): the flow critic's state
# x0_hat = family.predicted_clean(out, step, x_t) costs no extra model call.
ModelHook = Callable[[Step, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample_rollout(
    family: PolicyFamily,
    cond: Conditioning,
    *,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    before_step: StepHook | None = None,
    after_model: ModelHook | None = None,
    progress: bool = False,
) -> Rollout:
    """Sample one batch; deterministic steps get log-prob 0 and `stochastic[k] = False`."""
    from tqdm.auto import tqdm

    batch = cond["embeds"].shape[0]
    latents = family.initial_latents(batch, resolution, generator)
    steps = family.steps(num_steps, resolution)
    device = latents.device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    all_latents, all_log_probs = [latents], []
    for step in tqdm(steps, desc="sampling", leave=False, disable=not progress):
        if before_step is not None:
            before_step(step.index, latents)
        with autocast:
            model_out = family.forward(latents, step, cond, guidance_scale)
        if after_model is not None:
            after_model(step, latents, model_out)
        latents, log_prob = family.step_with_logprob(model_out, step, latents, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob if log_prob is not None else torch.zeros(batch, device=device))

    def per_sample(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        if values[0] is None:
            return None
        return torch.stack([torch.as_tensor(v, device=device).expand(batch) for v in values], dim=1)

    return Rollout(
        latents=torch.stack(all_latents, dim=1),
        timesteps=per_sample([s.timestep for s in steps]),
        log_probs=torch.stack(all_log_probs, dim=1),
        stochastic=torch.tensor([s.stochastic for s in steps], device=device),
        conditioning=cond,
        images=family.decode(latents),
        sigmas=per_sample([s.sigma for s in steps]),
        sigmas_next=per_sample([s.sigma_next for s in steps]),
    )
