"""The `flow` family: rectified-flow transformers (SD3/SD3.5 and FLUX) with the flow SDE of `flow_sde`.

Schedules, prompt encoding, latent packing and the transformer call follow the diffusers pipelines
(`StableDiffusion3Pipeline`, `FluxPipeline`) term by term, so the sampler at noise level 0 reproduces the
pipelines' latents. sigma and sigma' of every step are stored with the trajectory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from peft.utils import get_peft_model_state_dict

from rewardtune.config import FLOW_LORA_TARGETS
from rewardtune.diffusion import require_resolution_multiple
from rewardtune.families.base import Conditioning, Step
from rewardtune.families.lora import add_lora, load_lora_state
from rewardtune.flow_sde import SdeType, euler_step, flow_posterior, flow_step_with_logprob, sde_steps
from rewardtune.lora_metadata import adapter_metadata, canonicalize_safetensors


class FlowFamily:
    """SD3/SD3.5 (`StableDiffusion3Pipeline`) or FLUX (`FluxPipeline`) behind the PolicyFamily seam.

    noise_level = 0 samples the ODE everywhere (evaluation, parity); otherwise the steps `sde_steps`
    selects (all but the last by default, or a window) are SDE steps with a log-prob.
    """

    default_lora_targets = FLOW_LORA_TARGETS

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline | FluxPipeline,
        noise_level: float = 0.7,
        sde_type: SdeType = "sde",
        sde_window: tuple[int, int] | None = None,
        train_last_step: bool = False,
        max_sequence_length: int = 256,
        model: torch.nn.Module | None = None,
    ) -> None:
        if noise_level < 0:
            raise ValueError(f"noise_level={noise_level} must be >= 0 (0: deterministic ODE sampling)")
        self.pipe = pipe
        self.name = "flux" if isinstance(pipe, FluxPipeline) else "sd3"
        self.noise_level, self.sde_type = noise_level, sde_type
        self.sde_window, self.train_last_step = sde_window, train_last_step
        self.max_sequence_length = max_sequence_length
        self.model = model if model is not None else pipe.transformer
        self._grid: tuple[int, int] | None = None  # FLUX: unpacked latent height/width of the current resolution

    @property
    def device(self) -> torch.device:
        return self.pipe.text_encoder.device

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        n = len(prompts)
        if self.name == "sd3":
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=[negative_prompt] * n,
                do_classifier_free_guidance=True, device=self.device, max_sequence_length=self.max_sequence_length,
            )
            return {"embeds": embeds, "negative_embeds": negative, "pooled": pooled, "negative_pooled": negative_pooled}
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        cond = {"embeds": embeds, "pooled": pooled}
        if not self.pipe.transformer.config.guidance_embeds:  # true CFG needs the negative prompt
            negative, negative_pooled, _ = self.pipe.encode_prompt(
                prompt=[negative_prompt] * n, prompt_2=None, device=self.device,
                max_sequence_length=self.max_sequence_length,
            )
            cond.update(negative_embeds=negative, negative_pooled=negative_pooled)
        return cond

    # ---------------------------------------------------------------- latents and schedule
    def check_resolution(self, resolution: int) -> None:
        multiple = self.vae_factor * (2 if self.name == "flux" else 1)  # FLUX packs 2×2 latent patches
        require_resolution_multiple(resolution, multiple, f"{self.name}'s latent grid")

    def _latent_hw(self, resolution: int) -> tuple[int, int]:
        self.check_resolution(resolution)
        side = resolution // self.vae_factor
        if self.name == "flux":
            self._grid = (side, side)  # the transformer's image ids and decoding need the unpacked grid
        return side, side

    def initial_latents(self, batch: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        h, w = self._latent_hw(resolution)
        channels = self.pipe.transformer.config.in_channels // (4 if self.name == "flux" else 1)
        latents = randn_tensor((batch, channels, h, w), generator=generator, device=self.device, dtype=torch.float32)
        if self.name == "flux":
            return self.pipe._pack_latents(latents, batch, channels, h, w)
        return latents

    def steps(self, num_steps: int, resolution: int) -> list[Step]:
        scheduler = self.pipe.scheduler
        h, w = self._latent_hw(resolution)
        kwargs: dict = {}
        sigmas = None
        if self.name == "flux":
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            if scheduler.config.get("use_flow_sigmas"):
                sigmas = None
        if scheduler.config.get("use_dynamic_shifting"):
            seq_len = (h // 2) * (w // 2) if self.name == "flux" else (h // self.model_patch) * (w // self.model_patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15 if self.name == "flux" else 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, **kwargs)
        sigma_all = scheduler.sigmas.to(self.device, torch.float32)
        stochastic = sde_steps(num_steps, self.sde_window, self.train_last_step) if self.noise_level > 0 else [False] * num_steps
        return [Step(k, timesteps[k], sigma_all[k], sigma_all[k + 1], stochastic[k]) for k in range(num_steps)]

    @property
    def model_patch(self) -> int:
        return self.pipe.transformer.config.patch_size

    # ---------------------------------------------------------------- model and step
    def _call(self, model, latents, timestep, embeds, pooled, guidance=None):
        if self.name == "sd3":
            return model(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                return_dict=False,
            )[0]
        if self._grid is None:
            raise RuntimeError("call steps(num_steps, resolution) or initial_latents first: FLUX needs the latent grid")
        h, w = self._grid
        img_ids = self.pipe._prepare_latent_image_ids(latents.shape[0], h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        return model(
            hidden_states=latents, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    def forward(self, latents: torch.Tensor, step: Step, cond: Conditioning, guidance_scale: float, model=None) -> torch.Tensor:
        """The guided velocity. SD3: CFG in one batched call ([negative; prompt], as the pipeline). FLUX-dev:
        the distilled guidance input; FLUX without it: true CFG in two calls, as FluxPipeline."""
        model = model if model is not None else self.model
        dtype = next(model.parameters()).dtype
        x = latents.to(dtype)
        t = torch.as_tensor(step.timestep, device=x.device)
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(dtype)
        if self.name == "flux":
            if self.pipe.transformer.config.guidance_embeds:
                guidance = torch.full([x.shape[0]], guidance_scale, device=x.device, dtype=torch.float32)
                return self._call(model, x, t, cond["embeds"], cond["pooled"], guidance)
            out = self._call(model, x, t, cond["embeds"], cond["pooled"])
            if guidance_scale == 1.0:
                return out
            negative = self._call(model, x, t, cond["negative_embeds"], cond["negative_pooled"])
            return negative + guidance_scale * (out - negative)
        if guidance_scale == 1.0:
            return self._call(model, x, t, cond["embeds"], cond["pooled"])
        out = self._call(
            model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["negative_embeds"], cond["embeds"]]),
            torch.cat([cond["negative_pooled"], cond["pooled"]]),
        )
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def posterior(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of a stochastic step's Gaussian (what `step_with_logprob` samples from)."""
        return flow_posterior(model_out, latents, step.sigma, step.sigma_next, self.noise_level, self.sde_type)

    def step_with_logprob(self, model_out, step: Step, latents, prev=None, generator=None):
        """SDE step with log-prob on stochastic steps; the Euler step (log-prob None) elsewhere."""
        if not step.stochastic:
            return euler_step(model_out, latents, step.sigma, step.sigma_next), None
        return flow_step_with_logprob(
            model_out, latents, step.sigma, step.sigma_next, self.noise_level, self.sde_type, prev, generator
        )

    def predicted_clean(self, model_out: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_t - sigma v: the critic's cheap state (no extra model call)."""
        sigma = torch.as_tensor(step.sigma, device=latents.device, dtype=torch.float32)
        sigma = sigma.reshape(-1, *([1] * (latents.ndim - 1))) if sigma.ndim else sigma
        return latents.float() - sigma * model_out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if self.name == "flux":
            h, w = self._grid
            latents = self.pipe._unpack_latents(latents, h * self.vae_factor, w * self.vae_factor, self.vae_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(next(vae.parameters()).dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------- LoRA
    def add_lora(self, rank: int, alpha: float | None, targets: list[str] | None = None) -> list[torch.nn.Parameter]:
        return add_lora(self.pipe.transformer, rank, alpha, list(targets or self.default_lora_targets))

    def save_lora(self, directory: Path) -> None:
        """The diffusers format with adapter metadata: `pipe.load_lora_weights(directory)` applies the trained scale."""
        model = self.pipe.transformer
        type(self.pipe).save_lora_weights(Path(directory), transformer_lora_layers=get_peft_model_state_dict(model),
                                          safe_serialization=True, transformer_lora_adapter_metadata=adapter_metadata(model))
        canonicalize_safetensors(Path(directory) / "pytorch_lora_weights.safetensors")

    def load_lora(self, directory: Path) -> None:
        load_lora_state(self.pipe.transformer, Path(directory), "transformer")


def load_flow_policy_weights(family: FlowFamily, finetune: str, path: Path) -> None:
    """A checkpoint's policy into the family's transformer: its diffusers LoRA file, or the full `transformer/`."""
    if finetune == "lora":
        family.load_lora(path)
    else:
        model = family.pipe.transformer
        model.load_state_dict(type(model).from_pretrained(Path(path) / "transformer").state_dict())


def load_flow_pipeline(location: str | Path, family: str, with_t5: bool = True):
    """Load an SD3 or FLUX pipeline directory offline; `with_t5=False` drops T5 (SD3 pads with zeros)."""
    if family not in ("sd3", "flux"):
        raise ValueError(f"model.family={family!r} is not a flow family; use sd3 or flux")
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    kwargs = {}
    if not with_t5:
        if family == "flux":
            raise ValueError("FLUX needs its T5 encoder; only SD3 can drop it")
        kwargs = {"text_encoder_3": None, "tokenizer_3": None}
    return cls.from_pretrained(str(location), local_files_only=True, **kwargs)


def prepare_flow_policy(pipe, cfg, device: torch.device, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """As `models.prepare_policy` for a transformer: freeze the VAE and text encoders, LoRA (or full) on the
    transformer; frozen weights in `model.dtype`, trainable parameters float32. Returns the trainable ones."""
    from rewardtune.models import DTYPES

    dtype = DTYPES[cfg.dtype]
    names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    frozen = [m for m in (getattr(pipe, n, None) for n in names) if m is not None]
    transformer = pipe.transformer
    for module in frozen:
        module.requires_grad_(False)
    transformer.requires_grad_(cfg.finetune == "full")
    for module in (*frozen, transformer):
        module.to(device)
    if dtype != torch.float32:
        for module in frozen + ([transformer] if cfg.finetune == "lora" else []):
            module.to(dtype=dtype)
    if cfg.finetune == "lora":
        trainable = add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, list(cfg.lora_target_modules))
    else:
        trainable = [p for p in transformer.parameters() if p.requires_grad]
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return trainable
