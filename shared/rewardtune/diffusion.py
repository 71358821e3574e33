"""The denoising MDP: a DDIM step that also returns its log-density, and a trajectory sampler.

No released package ships a DDIM step with log-prob; this follows `DDIMScheduler.step` term by term
(same noise -> same `prev_sample`), and adds the Gaussian log-density of the posterior
(docs/algorithms.md §1). Timesteps may differ per sample, because TDPO shuffles the time axis per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from rewardtune.errors import ConfigError

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _schedule_on(scheduler: DDIMScheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas_cumprod and final_alpha_cumprod on `device` in float32, copied once per scheduler and device.

    Why: the scheduler keeps them on the CPU; copying them at every step is a host-to-device copy from
    pageable memory, which waits for the GPU's queue to drain (a host sync per step). Same values.
    """
    cache = scheduler.__dict__.setdefault("_rewardtune_on_device", {})
    key = (str(device), scheduler.alphas_cumprod.data_ptr())
    if key not in cache:
        cache.clear()
        cache[key] = (
            scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float32),
        )
    return cache[key]


def ddim_posterior(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    check_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of pi(x_{t-1} | x_t) for the DDIM step with this eta, in float32.

    `check_std=False` skips the std > 0 check, a host sync; callers that checked the whole schedule
    once (`check_schedule`) pass it inside their step loops.
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: a DDIM step with eta <= 0 is deterministic and has no log-density; use eta > 0")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    sample32, output32 = sample.float(), model_output.float()
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = timestep - step_size

    alphas_cumprod, final = _schedule_on(scheduler, sample.device)
    alpha_t = _per_sample(alphas_cumprod[timestep], sample.ndim)
    alpha_prev = _per_sample(
        torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final), sample.ndim
    )
    beta_t = 1 - alpha_t

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        pred_x0 = (sample32 - beta_t.sqrt() * output32) / alpha_t.sqrt()
        pred_eps = output32
    elif kind == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample32 - beta_t.sqrt() * output32
        pred_eps = alpha_t.sqrt() * output32 + beta_t.sqrt() * sample32
    else:
        raise ValueError(f"prediction_type={kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    if scheduler.config.clip_sample:
        pred_x0 = pred_x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    if check_std and bool((std == 0).any()):
        raise ValueError(
            "a DDIM step has std 0 and no density (set_alpha_to_one=True at the last step?); "
            "use a scheduler with set_alpha_to_one=False, as SD 1.x does"
        )
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).sqrt() * pred_eps
    return mean, std


def check_schedule(scheduler: DDIMScheduler, eta: float, device: torch.device, latent_shape: tuple[int, ...]) -> None:
    """Raise what `ddim_posterior` would raise at any step of the schedule, with one host sync for all steps."""
    steps = scheduler.timesteps.to(device)
    zeros = torch.zeros((len(steps), *latent_shape[1:]), device=device)
    ddim_posterior(scheduler, zeros, steps, zeros, eta, check_std=True)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2), averaged over all non-batch dims (the DDPO convention)."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - std.log() - _HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def sample_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_prev ~ N(mean, std^2) (or take the stored one) and its log-prob: the Gaussian policy step that
    every model family shares, so sampling and training read the density the same way."""
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    check_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step: returns (prev_sample, log pi(prev_sample | sample)).

    With `prev_sample` given (training), only the log-prob is new; it is differentiable w.r.t.
    `model_output`. `prev_sample` is returned in float32.
    """
    mean, std = ddim_posterior(scheduler, model_output, timestep, sample, eta, check_std)
    return sample_step(mean, std, prev_sample, generator)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Token embeddings as SD's pipeline computes them (padded to model_max_length)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


class PromptEmbeddingCache:
    """Encode each distinct prompt once (the text encoder is frozen): a batch encodes only prompts not seen yet.

    Why: with a few dozen prompts and many batches per epoch most text-encoder calls repeat. Rows equal
    `encode_prompts` of the batch to float rounding (a prompt may be encoded in a batch of other size).
    """

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if new:
            self.rows.update(zip(new, encode_prompts(self.tokenizer, self.text_encoder, new), strict=True))
        return torch.stack([self.rows[p] for p in prompts])


def require_resolution_multiple(resolution: int, multiple: int, of_what: str) -> None:
    """`ConfigError` unless `sampling.resolution` is a multiple of the model's latent grid (`of_what` says whose)."""
    if resolution % multiple:
        raise ConfigError(f"sampling.resolution={resolution} must be a multiple of {of_what} {multiple}; "
                          f"use e.g. {max(multiple, resolution // multiple * multiple)}")


def guided_noise_pred(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance in one batched UNet call: eps_u + w (eps_c - eps_u).

    The embeddings follow the latents' dtype (callers cast latents to the UNet's): with `model.dtype: float16`
    and a full fine-tune the text encoder is half while the trained UNet keeps float32 master weights.
    """
    prompt_embeds, negative_embeds = prompt_embeds.to(latents.dtype), negative_embeds.to(latents.dtype)
    if guidance_scale == 1.0:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(latents.shape[0])
    out = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
    ).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class Trajectories:
    """A batch of denoising trajectories; index k of the step axis is the k-th denoising step."""

    latents: torch.Tensor  # [B, K+1, C, h, w], x_T ... x_0 (float32)
    timesteps: torch.Tensor  # [B, K]
    log_probs: torch.Tensor  # [B, K], log pi_old of each step
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor  # [B, L, D]
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]

    def __len__(self) -> int:
        return self.latents.shape[0]


# Called before each step with (step index, x_t); TDPO stores critic inputs through it.
StepHook = Callable[[int, torch.Tensor], None]


@torch.no_grad()
def sample_trajectories(
    unet: torch.nn.Module,
    vae,
    scheduler: DDIMScheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    resolution: int,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    before_step: StepHook | None = None,
    progress: bool = False,
    sync_free: bool = False,
) -> Trajectories:
    """Sample x_T -> x_0 with the DDIM posterior, recording everything PPO needs per step.

    `sync_free` checks the schedule once before the loop instead of at every step (no host sync inside).
    """
    from tqdm.auto import tqdm

    device = prompt_embeds.device
    batch = prompt_embeds.shape[0]
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    require_resolution_multiple(resolution, vae_factor, "the VAE's downsampling factor")
    scheduler.set_timesteps(num_steps, device=device)
    shape = (batch, unet.config.in_channels, resolution // vae_factor, resolution // vae_factor)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    model_dtype = next(unet.parameters()).dtype
    if sync_free:
        check_schedule(scheduler, eta, device, shape)
    # written in place step by step: no list of K tensors and no stacking copy of the trajectory at the end
    all_latents = torch.empty((batch, len(scheduler.timesteps) + 1, *shape[1:]), device=device, dtype=latents.dtype)
    all_latents[:, 0] = latents
    all_log_probs: torch.Tensor | None = None
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for k, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress)):
        if before_step is not None:
            before_step(k, latents)
        with autocast:
            noise_pred = guided_noise_pred(
                unet, scheduler.scale_model_input(latents, t).to(model_dtype), t, prompt_embeds, negative_embeds, guidance_scale
            )
        latents, log_prob = ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta=eta, generator=generator, check_std=not sync_free
        )
        if all_log_probs is None:
            all_log_probs = torch.empty((batch, len(scheduler.timesteps)), device=device, dtype=log_prob.dtype)
        all_latents[:, k + 1] = latents
        all_log_probs[:, k] = log_prob
    images = decode_latents(vae, latents)
    return Trajectories(
        latents=all_latents,
        timesteps=scheduler.timesteps.repeat(batch, 1),
        log_probs=all_log_probs,
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        images=images,
    )


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1] (float32)."""
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
