"""The rollout stage: sample an epoch of trajectories with the current policy, the critic's inputs and
old values along them, the reference log-probs of the KL penalty, and the rewards of the images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rewardtune.critic import embedded_steps, interpolate_step_embeddings
from rewardtune.diffusion import (
    PromptEmbeddingCache,
    decode_latents,
    encode_prompts,
    sample_trajectories,
)
from rewardtune.families.base import Step
from rewardtune.families.rollout import sample_rollout
from rewardtune.faults import fault_point
from rewardtune.group_advantages import group_prompts
from rewardtune.numerics import check_images
from rewardtune.rewards import check_finite
from rewardtune.training.logprob import PolicyDensity, reference_policy
from rewardtune.training.setup import Progress, Run, epoch_seed


@dataclass
class EpochSamples:
    """One epoch's on-policy data; the step axis is the denoising step k (not the timestep value)."""

    prompts: list[str]
    latents: torch.Tensor  # [N, K, ...] x_t before each step
    next_latents: torch.Tensor  # [N, K, ...] x_{t-1} after each step
    timesteps: torch.Tensor  # [N, K]
    log_probs: torch.Tensor  # [N, K]
    prompt_embeds: torch.Tensor | None  # [N, L, D] (sd; None for flow models, see `conditioning`)
    negative_embeds: torch.Tensor | None  # [N, L, D]
    images: torch.Tensor  # [N, 3, H, W]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor | None = None  # [N, K]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)  # flow: the family's, batch-first
    sigmas: torch.Tensor | None = None  # [N, K] flow: sigma and sigma' of each step, as sampled
    sigmas_next: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class EpochTimes:
    sampling: float = 0.0
    reward: float = 0.0  # computing rewards (in the reward thread, overlapping sampling)
    reward_wait: float = 0.0  # waiting for rewards after the last batch sampled: what the overlap did not hide
    training: float = 0.0


def _ready_event(device: torch.device) -> torch.cuda.Event | None:
    """On a GPU, an event after the batch's sampling kernels, for the reward thread's stream to wait on."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class Rollout:
    """`sample_epoch` and what it records along the trajectories.

    `safe_point(epoch)` is the SIGTERM check called after each sampled batch; `density` computes the
    reference log-probs; `progress` says whether the policy has been trained yet (for the image check).
    """

    def __init__(self, run: Run, density: PolicyDensity, progress: Progress, safe_point: Callable[[int], None]) -> None:
        self.run = run
        self.density = density
        self.progress = progress
        self.safe_point = safe_point

    @torch.no_grad()
    def sample_epoch(self, epoch: int, times: EpochTimes) -> EpochSamples:
        cfg = self.run.cfg.sampling
        seed = epoch_seed(self.run.cfg.training.seed, epoch, self.run.accelerator.process_index)
        prompt_rng = np.random.default_rng(seed)
        generator = torch.Generator(self.run.device).manual_seed(seed)
        self.run.unet.eval()
        parts: list[dict] = []
        embed_steps = embedded_steps(cfg.num_steps, self.run.cfg.algorithm.critic.input_stride)
        tokenizer, text_encoder = self.run.pipe.tokenizer, self.run.pipe.text_encoder
        self._encode = (PromptEmbeddingCache(tokenizer, text_encoder) if self.run.cfg.performance.cache_prompt_embeds
                        else lambda prompts: encode_prompts(tokenizer, text_encoder, prompts))
        grouped = self.epoch_prompts(prompt_rng) if self.run.cfg.algorithm.name == "grpo" else None
        for b in range(cfg.batches_per_epoch):
            start = time.perf_counter()
            if grouped is not None:
                prompts = grouped[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            else:
                group = cfg.images_per_prompt  # several images per prompt: per-prompt statistics within the batch
                drawn = prompt_rng.integers(len(self.run.prompts), size=cfg.batch_size // group)
                prompts = [self.run.prompts[i] for i in drawn for _ in range(group)]
            if self.run.is_flow:
                traj, extras = self._sample_flow(prompts, generator, embed_steps)
            else:
                traj, extras = self._sample_sd(prompts, generator, embed_steps)
            times.sampling += time.perf_counter() - start
            check_images(traj.images, prompts, epoch, self.run.trained_parameters() if self.progress.epochs_done else None)
            # scored in the reward thread while the next batch samples (ddpo-pytorch's executor)
            rewards = self.run.reward_pool.submit(self.score_batch, traj.images, prompts, times)
            if self.overlaps_critic_inputs:  # then its critic inputs, in the same thread, still under the next batch
                extras["embedded"] = self.run.reward_pool.submit(self.embed_steps, traj.latents, embed_steps, _ready_event(traj.latents.device))
            parts.append({"prompts": prompts, "traj": traj, "rewards": rewards, "extras": extras})
            fault_point("sample")
            self.safe_point(epoch)
        start = time.perf_counter()
        for part in parts:
            part["rewards"] = part["rewards"].result()
            if self.overlaps_critic_inputs:
                self._critic_extras(part["extras"], part["extras"].pop("embedded").result(), embed_steps)
        times.reward_wait += time.perf_counter() - start
        return self._epoch_samples(parts)

    @property
    def overlaps_critic_inputs(self) -> bool:
        """`performance.overlap_critic_inputs` applies to the sd family's critic (x_t is all it embeds)."""
        return self.run.cfg.performance.overlap_critic_inputs and self.run.critics is not None and not self.run.is_flow

    @torch.no_grad()
    def embed_steps(self, latents: torch.Tensor, steps: list[int], ready: torch.cuda.Event | None) -> torch.Tensor:
        """[B, len(steps), d] critic inputs of a sampled trajectory's x_t (latents[:, k] is x_t before step k).

        Each step is decoded alone at the batch's shape, exactly as the in-loop hook decodes it; on a GPU on
        a side stream that waits for the sampling stream's `ready` event.
        """
        if ready is None:
            return torch.stack([self.critic_input(latents[:, k].contiguous()) for k in steps], dim=1)
        stream = torch.cuda.Stream(latents.device)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            out = torch.stack([self.critic_input(latents[:, k].contiguous()) for k in steps], dim=1)
        stream.synchronize()
        return out

    def _critic_extras(self, extras: dict, embedded: torch.Tensor, embed_steps: list[int]) -> None:
        """The sd critic's inputs at every step (strided steps interpolated) and its old values."""
        extras["critic_inputs"] = interpolate_step_embeddings(embed_steps, embedded, self.run.cfg.sampling.num_steps)
        extras["old_values"] = self.run.accelerator.unwrap_model(self.run.critics).eval()(extras["critic_inputs"])

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor, prompts: list[str], times: EpochTimes) -> torch.Tensor:
        """[B, 1 + constraints] rewards of one sampled batch; raises (never guesses) when a reward fails."""
        start = time.perf_counter()
        scores = [check_finite(self.run.cfg.reward.name, self.run.reward_fn(images, prompts).float(), prompts)]
        for spec, fn in zip(self.run.constraints, self.run.aux_reward_fns, strict=True):
            scores.append(check_finite(spec.reward.name, fn(images, prompts).float(), prompts))
        times.reward += time.perf_counter() - start
        return torch.stack([score.to(self.run.device) for score in scores], dim=1)

    def epoch_prompts(self, prompt_rng: np.random.Generator) -> list[str]:
        """GRPO: this process's prompts of the epoch, each `group_size` times in a row (groups are never split
        across processes; batches may split them, the advantages are computed over the whole epoch)."""
        cfg = self.run.cfg.sampling
        size = self.run.cfg.algorithm.group.group_size
        drawn = [self.run.prompts[i] for i in prompt_rng.integers(len(self.run.prompts), size=cfg.batch_size * cfg.batches_per_epoch // size)]
        return group_prompts(drawn, size)

    def _sample_sd(self, prompts: list[str], generator: torch.Generator, embed_steps: list[int]):
        """One batch of the sd family: DDIM trajectories, critic inputs of the decoded x_t."""
        cfg = self.run.cfg.sampling
        embed_at = set(embed_steps)
        embeds = self._encode(prompts)
        negative = self.run.negative_embed.expand(len(prompts), -1, -1)
        critic_inputs: list[torch.Tensor] = []

        def store(k: int, x_t: torch.Tensor, critic_inputs=critic_inputs) -> None:
            if k in embed_at:
                critic_inputs.append(self.critic_input(x_t))
        traj = sample_trajectories(
            self.run.policy,
            self.run.pipe.vae,
            self.run.scheduler,
            embeds,
            negative,
            num_steps=cfg.num_steps,
            guidance_scale=cfg.guidance_scale,
            eta=cfg.eta,
            resolution=cfg.resolution,
            generator=generator,
            autocast_dtype=self.run.autocast_dtype,
            before_step=store if self.run.critics and not self.overlaps_critic_inputs else None,
            progress=self.run.progress_bars(),
            sync_free=self.run.cfg.performance.sync_free_steps,
        )
        extras = {}
        if self.run.critics is not None:
            if not self.overlaps_critic_inputs:  # else filled in when the reward thread has embedded them
                self._critic_extras(extras, torch.stack(critic_inputs, dim=1), embed_steps)
            if self.run.cfg.algorithm.critic.kl_coef > 0:
                extras["ref_log_probs"] = self.reference_log_probs(traj)
        return traj, extras

    def _sample_flow(self, prompts: list[str], generator: torch.Generator, embed_steps: list[int]):
        """One batch of a flow family: SDE trajectories; the critic's state is the decoded x0_hat (from the
        model output the step already computed) or the decoded x_t, with sigma as an extra input."""
        cfg = self.run.cfg.sampling
        embed_at = set(embed_steps)
        critic_inputs: list[torch.Tensor] = []
        use_x0 = self.run.cfg.algorithm.critic.flow_state == "x0_hat"

        def after_model(step: Step, x_t: torch.Tensor, out: torch.Tensor) -> None:
            if step.index in embed_at:
                critic_inputs.append(self.run.tower.embed(self.run.family.decode(self.run.family.predicted_clean(out, step, x_t))))

        def before_step(k: int, x_t: torch.Tensor) -> None:
            if k in embed_at:
                critic_inputs.append(self.run.tower.embed(self.run.family.decode(x_t)))

        critic = self.run.critics is not None
        traj = sample_rollout(
            self.run.family, self.run.family.encode(prompts, cfg.negative_prompt), num_steps=cfg.num_steps,
            guidance_scale=cfg.guidance_scale, resolution=cfg.resolution, generator=generator,
            autocast_dtype=self.run.autocast_dtype, before_step=before_step if critic and not use_x0 else None,
            after_model=after_model if critic and use_x0 else None, progress=self.run.progress_bars(),
        )
        extras = {}
        if critic:
            embedded = interpolate_step_embeddings(embed_steps, torch.stack(critic_inputs, dim=1), cfg.num_steps)
            extras["critic_inputs"] = torch.cat([embedded, traj.sigmas[..., None].to(embedded)], dim=-1)
            extras["old_values"] = self.run.accelerator.unwrap_model(self.run.critics).eval()(extras["critic_inputs"])
            if self.run.cfg.algorithm.critic.kl_coef > 0:
                extras["ref_log_probs"] = self.reference_log_probs(traj)
        return traj, extras

    def _epoch_samples(self, parts: list[dict]) -> EpochSamples:
        """The batches of an epoch as one `EpochSamples` (sample axis first)."""
        def cat(get) -> torch.Tensor:
            return torch.cat([get(p) for p in parts])

        flow = self.run.is_flow
        return EpochSamples(
            prompts=[q for p in parts for q in p["prompts"]],
            latents=cat(lambda p: p["traj"].latents[:, :-1]),
            next_latents=cat(lambda p: p["traj"].latents[:, 1:]),
            timesteps=cat(lambda p: p["traj"].timesteps),
            log_probs=cat(lambda p: p["traj"].log_probs),
            prompt_embeds=None if flow else cat(lambda p: p["traj"].prompt_embeds),
            negative_embeds=None if flow else cat(lambda p: p["traj"].negative_embeds),
            images=cat(lambda p: p["traj"].images),
            rewards=cat(lambda p: p["rewards"][:, 0]),
            extras={
                "all_rewards": cat(lambda p: p["rewards"]),
                **{name: cat(lambda p, name=name: p["extras"][name]) for name in parts[0]["extras"]},
            },
            conditioning={k: cat(lambda p, k=k: p["traj"].conditioning[k]) for k in parts[0]["traj"].conditioning} if flow else {},
            sigmas=cat(lambda p: p["traj"].sigmas) if flow else None,
            sigmas_next=cat(lambda p: p["traj"].sigmas_next) if flow else None,
        )

    @torch.no_grad()
    def critic_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The critic's state at a step: the VAE-decoded x_t embedded by the frozen image tower."""
        return self.run.tower.embed(decode_latents(self.run.pipe.vae, latents))

    @torch.no_grad()
    def reference_log_probs(self, traj) -> torch.Tensor:
        """log pi_ref of each sampled step under the frozen base policy (for the per-step KL penalty)."""
        batch = {"latents": traj.latents[:, :-1], "next_latents": traj.latents[:, 1:], "timesteps": traj.timesteps}
        if self.run.is_flow:  # only the stochastic steps have a density; the ODE steps' reference log-prob is 0
            batch |= {"sigmas": traj.sigmas, "sigmas_next": traj.sigmas_next,
                      **{f"cond.{k}": v for k, v in traj.conditioning.items()}}
        else:
            batch |= {"prompt_embeds": traj.prompt_embeds, "negative_embeds": traj.negative_embeds}
        steps, trainable = traj.timesteps.shape[1], self.run.trainable_set
        zero = torch.zeros_like(traj.log_probs[:, 0])
        with reference_policy(self.run) as model:
            return torch.stack([self.density.policy_log_prob(batch, slice(None), k, model) if k in trainable else zero
                                for k in range(steps)], dim=1)

