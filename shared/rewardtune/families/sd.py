"""The `sd` family: SD 1.x/2.x, DDIM with eta > 0 and a UNet, exactly today's functions in `diffusion`/`models`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from rewardtune.config import ModelConfig
from rewardtune.diffusion import (
    ddim_posterior,
    ddim_step_with_logprob,
    decode_latents,
    encode_prompts,
    guided_noise_pred,
    require_resolution_multiple,
)
from rewardtune.families.base import Conditioning, Step
from rewardtune.families.lora import add_lora
from rewardtune.models import load_policy_weights, save_policy


class SDFamily:
    """Wraps a StableDiffusionPipeline whose scheduler is a DDIMScheduler (as `models.load_pipeline` sets)."""

    name = "sd"
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(self, pipe: StableDiffusionPipeline, eta: float = 1.0, model: torch.nn.Module | None = None) -> None:
        self.pipe, self.eta = pipe, eta
        self.scheduler = pipe.scheduler
        self.model = model if model is not None else pipe.unet  # may be the accelerator-wrapped UNet

    @property
    def device(self) -> torch.device:
        return self.pipe.text_encoder.device

    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        embeds = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts)
        negative = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [negative_prompt])
        return {"embeds": embeds, "negative_embeds": negative.expand(len(prompts), -1, -1)}

    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> None:
        require_resolution_multiple(resolution, self.vae_factor(), "the VAE's downsampling factor")

    def initial_latents(self, batch: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        self.check_resolution(resolution)
        factor = self.vae_factor()
        shape = (batch, self.pipe.unet.config.in_channels, resolution // factor, resolution // factor)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return latents * self.scheduler.init_noise_sigma

    def steps(self, num_steps: int, resolution: int) -> list[Step]:
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return [Step(k, t) for k, t in enumerate(self.scheduler.timesteps)]

    def forward(self, latents: torch.Tensor, step: Step, cond: Conditioning, guidance_scale: float, model=None) -> torch.Tensor:
        model = model if model is not None else self.model
        dtype = next(model.parameters()).dtype
        scaled = self.scheduler.scale_model_input(latents, step.timestep).to(dtype)
        return guided_noise_pred(model, scaled, step.timestep, cond["embeds"], cond["negative_embeds"], guidance_scale)

    def posterior(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the DDIM step's Gaussian (what `step_with_logprob` samples from)."""
        return ddim_posterior(self.scheduler, model_out, step.timestep, latents, self.eta)

    def step_with_logprob(self, model_out, step: Step, latents, prev=None, generator=None):
        return ddim_step_with_logprob(
            self.scheduler, model_out, step.timestep, latents, eta=self.eta, prev_sample=prev, generator=generator
        )

    def predicted_clean(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """x0_hat of the epsilon/v parameterization, from the same alphas the DDIM step uses."""
        alphas = self.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
        t = torch.as_tensor(step.timestep, device=latents.device).long().expand(latents.shape[0])
        alpha = alphas[t].reshape(-1, *([1] * (latents.ndim - 1)))
        x, out = latents.float(), model_out.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            return alpha.sqrt() * x - (1 - alpha).sqrt() * out
        return (x - (1 - alpha).sqrt() * out) / alpha.sqrt()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe.vae, latents)

    def add_lora(self, rank: int, alpha: float | None, targets: list[str] | None = None) -> list[torch.nn.Parameter]:
        return add_lora(self.pipe.unet, rank, alpha, list(targets or self.default_lora_targets))

    def _lora_cfg(self) -> ModelConfig:
        return ModelConfig.model_construct(finetune="lora")

    def save_lora(self, directory: Path) -> None:
        save_policy(self.pipe.unet, self._lora_cfg(), Path(directory))

    def load_lora(self, directory: Path) -> None:
        load_policy_weights(self.pipe.unet, self._lora_cfg(), Path(directory))

