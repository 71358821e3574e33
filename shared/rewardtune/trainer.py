"""The reward fine-tuning loop: sample trajectories, score them, estimate per-step advantages,
train the policy with PPO's clipped objective (DDPO), one readable loop as in ddpo-pytorch.

Every epoch draws its randomness from (seed, epoch, process): a run resumed from a checkpoint at an
epoch boundary continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from rewardtune.advantages import PerPromptStatTracker, batch_normalized
from rewardtune.checkpoint import latest_checkpoint, list_checkpoints, prune_checkpoints, save_checkpoint
from rewardtune.config import RunConfig
from rewardtune.diffusion import (
    ddim_step_with_logprob,
    encode_prompts,
    guided_noise_pred,
    sample_trajectories,
)
from rewardtune.errors import CheckpointError, RewardtuneError
from rewardtune.losses import ppo_clipped_loss, ppo_diagnostics
from rewardtune.metrics import MetricsLog
from rewardtune.models import load_pipeline, load_policy_weights, prepare_policy, save_policy
from rewardtune.prompts import load_prompts
from rewardtune.rewards import build_reward, check_finite

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process)."""
    return (seed * 1_000_003 + epoch * 7919 + process * 104_729) % (2**31 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RewardtuneError("device: cuda was requested but no CUDA GPU is visible; set device: cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


class Trainer:
    """Holds the models and optimizer of one run; `run()` is the whole job."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        device = resolve_device(cfg.device)
        k = cfg.sampling.num_steps
        self.num_train_steps = max(1, int(k * cfg.training.timestep_fraction))
        # time-major loops (TDPO) step the optimizer within one time column; DDPO accumulates over steps too
        self.time_major = cfg.algorithm.uses_critic
        accumulation = cfg.training.gradient_accumulation_steps * (1 if self.time_major else self.num_train_steps)
        self.accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=cfg.training.mixed_precision,
            gradient_accumulation_steps=accumulation,
        )
        self.device = self.accelerator.device
        if cfg.training.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(cfg.training.seed)

        self.pipe = load_pipeline(cfg.model)
        self.trainable = prepare_policy(self.pipe, cfg.model, self.device, cfg.training.gradient_checkpointing)
        self.scheduler = self.pipe.scheduler
        self.scheduler.set_timesteps(k, device=self.device)
        self.prompts = load_prompts(cfg.prompts.source, cfg.prompts.template)
        self._check_prompt_lengths()
        self.reward_fn = build_reward(cfg.reward, self.device)
        self.stat_tracker = PerPromptStatTracker(cfg.training.stat_tracking.buffer_size, cfg.training.stat_tracking.min_count)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.trainable, "lr": cfg.training.learning_rate, "name": "policy"}],
            betas=(cfg.training.adam_beta1, cfg.training.adam_beta2),
            weight_decay=cfg.training.adam_weight_decay,
            eps=cfg.training.adam_epsilon,
        )
        self.unet, self.optimizer = self.accelerator.prepare(self.pipe.unet, self.optimizer)
        self.negative_embed = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [cfg.sampling.negative_prompt])
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.epochs_done = 0
        self.samples_seen = 0
        self.global_step = 0

    # ------------------------------------------------------------------ setup helpers
    def _check_prompt_lengths(self) -> None:
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length
        too_long = [p for p in self.prompts if len(tokenizer(p).input_ids) > limit]
        if too_long:
            raise RewardtuneError(
                f"{len(too_long)} prompt(s) exceed the tokenizer's {limit} tokens (first: {too_long[0][:60]!r}); "
                "shorten them, they would be silently truncated"
            )

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _progress(self) -> bool:
        return self.cfg.logging.progress_bars and self.is_main

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_epoch(self, epoch: int, times: EpochTimes) -> EpochSamples:
        cfg = self.cfg.sampling
        seed = epoch_seed(self.cfg.training.seed, epoch, self.accelerator.process_index)
        prompt_rng = np.random.default_rng(seed)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.unet.eval()
        parts: list[dict] = []
        for _ in range(cfg.batches_per_epoch):
            start = time.perf_counter()
            prompts = [self.prompts[i] for i in prompt_rng.integers(len(self.prompts), size=cfg.batch_size)]
            embeds = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts)
            negative = self.negative_embed.expand(len(prompts), -1, -1)
            traj = sample_trajectories(
                self.unet,
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
                progress=self._progress(),
            )
            times.sampling += time.perf_counter() - start
            start = time.perf_counter()
            rewards = check_finite(self.cfg.reward.name, self.reward_fn(traj.images, prompts).float(), prompts)
            times.reward += time.perf_counter() - start
            parts.append({"prompts": prompts, "traj": traj, "rewards": rewards.to(self.device)})
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
            rewards=cat(lambda p: p["rewards"]),
        )

    # ------------------------------------------------------------------ advantages
    def terminal_advantages(self, samples: EpochSamples) -> torch.Tensor:
        """DDPO: normalize each reward by its prompt's (or the batch's) statistics, across all processes."""
        all_prompts = gather_object(samples.prompts) if self.accelerator.num_processes > 1 else samples.prompts
        all_rewards = self.accelerator.gather(samples.rewards).cpu().numpy()
        if self.cfg.training.stat_tracking.enabled:
            advantages = self.stat_tracker.update(all_prompts, all_rewards)
        else:
            advantages = batch_normalized(all_rewards)
        n = len(samples)
        mine = advantages[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
        return torch.as_tensor(mine, dtype=torch.float32, device=self.device)

    def compute_advantages(self, samples: EpochSamples) -> None:
        clip = self.cfg.training.adv_clip_max
        advantages = self.terminal_advantages(samples).clamp(-clip, clip)
        samples.advantages = advantages[:, None].expand(-1, samples.timesteps.shape[1])

    # ------------------------------------------------------------------ training
    def _shuffled(self, samples: EpochSamples, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Shuffle samples, then the time axis of each sample independently (as DDPO and TDPO do)."""
        n, k = samples.timesteps.shape
        order = torch.randperm(n, generator=generator)
        time_perm = torch.stack([torch.randperm(k, generator=generator) for _ in range(n)])
        fields = {
            "latents": samples.latents,
            "next_latents": samples.next_latents,
            "timesteps": samples.timesteps,
            "log_probs": samples.log_probs,
            "advantages": samples.advantages,
            **{name: value for name, value in samples.extras.items() if value.ndim >= 2 and value.shape[1] == k},
        }
        out: dict[str, torch.Tensor] = {}
        rows = torch.arange(n)[:, None]
        for name, value in fields.items():
            value = value[order.to(value.device)]
            out[name] = value[rows.to(value.device), time_perm.to(value.device)]
        out["prompt_embeds"] = samples.prompt_embeds[order.to(self.device)]
        out["negative_embeds"] = samples.negative_embeds[order.to(self.device)]
        return out

    def _micro_steps(self, n: int) -> list[tuple[slice, int]]:
        """(sample slice, time column) pairs in the loop order of the algorithm."""
        bs = self.cfg.training.batch_size
        batches = [slice(i, i + bs) for i in range(0, n, bs)]
        steps = range(self.num_train_steps)
        if self.time_major:
            return [(b, j) for j in steps for b in batches]
        return [(b, j) for b in batches for j in steps]

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int) -> torch.Tensor:
        latents = batch["latents"][rows, j]
        timesteps = batch["timesteps"][rows, j]
        model_dtype = next(self.unet.parameters()).dtype
        with self.accelerator.autocast():
            noise_pred = guided_noise_pred(
                self.unet,
                self.scheduler.scale_model_input(latents, timesteps).to(model_dtype),
                timesteps,
                batch["prompt_embeds"][rows],
                batch["negative_embeds"][rows],
                self.cfg.sampling.guidance_scale,
            )
        _, log_prob = ddim_step_with_logprob(
            self.scheduler, noise_pred, timesteps, latents, eta=self.cfg.sampling.eta, prev_sample=batch["next_latents"][rows, j]
        )
        return log_prob

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        cfg = self.cfg.training
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, self.accelerator.process_index) + 1)
        self.unet.train()
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        from tqdm.auto import tqdm

        for _ in range(cfg.inner_epochs):
            batch = self._shuffled(samples, generator)
            for rows, j in tqdm(self._micro_steps(len(samples)), desc="training", leave=False, disable=not self._progress()):
                with self.accelerator.accumulate(self.unet):
                    log_prob = self.policy_log_prob(batch, rows, j)
                    old = batch["log_probs"][rows, j]
                    loss = ppo_clipped_loss(log_prob, old, batch["advantages"][rows, j], cfg.clip_range)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                        self.global_step += 1
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(loss.detach())
                for name, value in ppo_diagnostics(log_prob.detach(), old, cfg.clip_range).items():
                    stats[name].append(value)
        return {name: torch.stack(values).mean().item() for name, values in stats.items()}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict:
        m = self.cfg.model
        return {"model_source": m.source, "finetune": m.finetune, "lora_rank": m.lora_rank if m.finetune == "lora" else None,
                "algorithm": self.cfg.algorithm.name}

    def trainer_state(self) -> dict:
        return {"epochs_done": self.epochs_done, "samples_seen": self.samples_seen, "global_step": self.global_step,
                "stat_tracker": self.stat_tracker.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        self.epochs_done, self.samples_seen = state["epochs_done"], state["samples_seen"]
        self.global_step = state["global_step"]
        self.stat_tracker.load_state_dict(state["stat_tracker"])

    def _write_checkpoint(self, directory: Path) -> None:
        save_policy(self.accelerator.unwrap_model(self.unet), self.cfg.model, directory)
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "trainer_state.json").write_text(json.dumps(self.trainer_state(), indent=1))
        (directory / "config.yaml").write_text(self.cfg.to_yaml())

    def save(self, kind: str = "regular") -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            path = save_checkpoint(self.checkpoint_dir, self.epochs_done, kind, self._write_checkpoint, self.checkpoint_meta())
            prune_checkpoints(self.checkpoint_dir, self.cfg.checkpointing.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path, manifest: dict) -> None:
        expected = self.checkpoint_meta()
        found = manifest.get("meta", {})
        for key in ("model_source", "finetune", "lora_rank"):
            if found.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {path} was trained with {key}={found.get(key)!r}, this config has {expected[key]!r}; "
                    "resume with the original config or use a new --out directory"
                )
        load_policy_weights(self.accelerator.unwrap_model(self.unet), self.cfg.model, path)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.load_trainer_state(json.loads((path / "trainer_state.json").read_text()))

    # ------------------------------------------------------------------ the job
    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        if resume:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is not None:
                self.load(*found)
                log.info("resumed from %s at epoch %d", found[0], self.epochs_done)
        elif list_checkpoints(self.checkpoint_dir):
            raise RewardtuneError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue that run or choose a new --out"
            )
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.truncate_to(self.epochs_done)
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
        for epoch in range(self.epochs_done, cfg.training.epochs):
            set_seed(epoch_seed(cfg.training.seed, epoch, self.accelerator.process_index))
            start = time.perf_counter()
            times = EpochTimes()
            samples = self.sample_epoch(epoch, times)
            self.compute_advantages(samples)
            t0 = time.perf_counter()
            stats = self.train_epoch(samples, epoch)
            times.training = time.perf_counter() - t0
            self.epochs_done = epoch + 1
            epoch_images = len(samples) * self.accelerator.num_processes
            self.samples_seen += epoch_images
            rewards = self.accelerator.gather(samples.rewards)
            record = {
                "epoch": epoch,
                "samples": self.samples_seen,
                "reward_mean": rewards.mean().item(),
                "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
                **stats,
                "lr": self.optimizer.param_groups[0]["lr"],
                "global_step": self.global_step,
                "images_per_s": epoch_images / (time.perf_counter() - start),
                "time_sampling_s": times.sampling,
                "time_reward_s": times.reward,
                "time_training_s": times.training,
            }
            if self.is_main:
                self.metrics.append(record)
                log.info("epoch %d: reward %.4f ± %.4f, kl %.2e, clipfrac %.3f", epoch, record["reward_mean"],
                         record["reward_std"], record["approx_kl"], record["clipfrac"])
            if self.epochs_done % cfg.checkpointing.every_epochs == 0 or self.epochs_done == cfg.training.epochs:
                self.save()
        return self.out_dir
