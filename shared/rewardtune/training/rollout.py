"""The rollout stage: sample an epoch of trajectories with the current policy, the critic's inputs and
old values along them, the reference log-probs of the KL penalty, and the rewards of the images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rewardtune.critic import embedded_steps, interpolate_step_embeddings
from rewardtune.diffusion import (
    decode_latents,
    encode_prompts,
    sample_trajectories,
)
from rewardtune.faults import fault_point
from rewardtune.rewards import check_finite
from rewardtune.training.setup import epoch_seed


@dataclass
class EpochSamples:
    """One epoch's on-policy data; the step axis is the denoising step k (not the timestep value)."""

    prompts: list[str]
    latents: torch.Tensor  # [N, K, ...] x_t before each step
    next_latents: torch.Tensor  # [N, K, ...] x_{t-1} after each step
    timesteps: torch.Tensor  # [N, K]
    log_probs: torch.Tensor  # [N, K]
    prompt_embeds: torch.Tensor  # [N, L, D]
    negative_embeds: torch.Tensor  # [N, L, D]
    images: torch.Tensor  # [N, 3, H, W]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor | None = None  # [N, K]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class EpochTimes:
    sampling: float = 0.0
    reward: float = 0.0
    training: float = 0.0


class Rollout:
    """`sample_epoch` and what it records along the trajectories."""

    @torch.no_grad()
    def sample_epoch(self, epoch: int, times: EpochTimes) -> EpochSamples:
        cfg = self.cfg.sampling
        seed = epoch_seed(self.cfg.training.seed, epoch, self.accelerator.process_index)
        prompt_rng = np.random.default_rng(seed)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.unet.eval()
        parts: list[dict] = []
        embed_steps = embedded_steps(cfg.num_steps, self.cfg.algorithm.critic.input_stride)
        embed_at = set(embed_steps)
        for _ in range(cfg.batches_per_epoch):
            start = time.perf_counter()
            prompts = [self.prompts[i] for i in prompt_rng.integers(len(self.prompts), size=cfg.batch_size)]
            embeds = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts)
            negative = self.negative_embed.expand(len(prompts), -1, -1)
            critic_inputs: list[torch.Tensor] = []

            def store(k: int, x_t: torch.Tensor, critic_inputs=critic_inputs) -> None:
                if k in embed_at:
                    critic_inputs.append(self.critic_input(x_t))
            traj = sample_trajectories(
                self.policy,
                self.pipe.vae,
                self.scheduler,
                embeds,
                negative,
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                eta=cfg.eta,
                resolution=cfg.resolution,
                generator=generator,
                autocast_dtype=self.autocast_dtype,
                before_step=store if self.critics else None,
                progress=self._progress(),
            )
            extras = {}
            if self.critics is not None:
                extras["critic_inputs"] = interpolate_step_embeddings(
                    embed_steps, torch.stack(critic_inputs, dim=1), cfg.num_steps
                )
                extras["old_values"] = self.accelerator.unwrap_model(self.critics).eval()(extras["critic_inputs"])
                if self.cfg.algorithm.critic.kl_coef > 0:
                    extras["ref_log_probs"] = self.reference_log_probs(traj)
            times.sampling += time.perf_counter() - start
            start = time.perf_counter()
            scores = [check_finite(self.cfg.reward.name, self.reward_fn(traj.images, prompts).float(), prompts)]
            for spec, fn in zip(self.constraints, self.aux_reward_fns, strict=True):
                scores.append(check_finite(spec.reward.name, fn(traj.images, prompts).float(), prompts))
            times.reward += time.perf_counter() - start
            rewards = torch.stack([score.to(self.device) for score in scores], dim=1)
            parts.append({"prompts": prompts, "traj": traj, "rewards": rewards, "extras": extras})
            fault_point("sample")
            self.safe_point(epoch)
        def cat(get) -> torch.Tensor:
            return torch.cat([get(p) for p in parts])

        return EpochSamples(
            prompts=[q for p in parts for q in p["prompts"]],
            latents=cat(lambda p: p["traj"].latents[:, :-1]),
            next_latents=cat(lambda p: p["traj"].latents[:, 1:]),
            timesteps=cat(lambda p: p["traj"].timesteps),
            log_probs=cat(lambda p: p["traj"].log_probs),
            prompt_embeds=cat(lambda p: p["traj"].prompt_embeds),
            negative_embeds=cat(lambda p: p["traj"].negative_embeds),
            images=cat(lambda p: p["traj"].images),
            rewards=cat(lambda p: p["rewards"][:, 0]),
            extras={
                "all_rewards": cat(lambda p: p["rewards"]),
                **{name: cat(lambda p, name=name: p["extras"][name]) for name in parts[0]["extras"]},
            },
        )

    @torch.no_grad()
    def critic_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The critic's state at a step: the VAE-decoded x_t embedded by the frozen image tower."""
        return self.tower.embed(decode_latents(self.pipe.vae, latents))

    @torch.no_grad()
    def reference_log_probs(self, traj) -> torch.Tensor:
        """log pi_ref of each sampled step under the frozen base policy (for the per-step KL penalty)."""
        unet = self.policy
        model = self.reference_unet or unet
        batch = {"latents": traj.latents[:, :-1], "next_latents": traj.latents[:, 1:], "timesteps": traj.timesteps,
                 "prompt_embeds": traj.prompt_embeds, "negative_embeds": traj.negative_embeds}
        if self.reference_unet is None:
            unet.disable_adapters()
        try:
            steps = traj.timesteps.shape[1]
            return torch.stack([self.policy_log_prob(batch, slice(None), k, model) for k in range(steps)], dim=1)
        finally:
            if self.reference_unet is None:
                unet.enable_adapters()

