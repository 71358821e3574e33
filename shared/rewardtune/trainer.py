"""The reward fine-tuning loop: sample trajectories, score them, estimate per-step advantages,
train the policy with PPO's clipped objective (DDPO), one readable loop as in ddpo-pytorch.

Every epoch draws its randomness from (seed, epoch, process): a run resumed from a checkpoint at an
epoch boundary continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from filelock import FileLock
from filelock import Timeout as FileLockTimeout
from safetensors.torch import load_file, save_file

from rewardtune import digests
from rewardtune.advantages import PerPromptStatTracker, batch_normalized
from rewardtune.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from rewardtune.config import RunConfig
from rewardtune.critic import Critics, embedded_steps, interpolate_step_embeddings
from rewardtune.diffusion import (
    PromptEmbeddingCache,
    ddim_step_with_logprob,
    decode_latents,
    encode_prompts,
    guided_noise_pred,
    sample_trajectories,
)
from rewardtune.errors import CheckpointError, RewardtuneError, Terminated
from rewardtune.faults import fault_point
from rewardtune.kl import KLController, kl_penalty, sample_kl
from rewardtune.lagrangian import DualState, combine_advantages, dual_scale
from rewardtune.losses import ppo_clipped_loss, ppo_diagnostics
from rewardtune.metrics import MetricsLog
from rewardtune.models import (
    apply_performance,
    load_pipeline,
    load_policy_weights,
    prepare_policy,
    save_policy,
)
from rewardtune.neuron_reset import (
    dormant_mask,
    dormant_overlap,
    lora_pairs,
    neuron_scores,
    record_activations,
    reset_linear_neurons,
    reset_lora_neurons,
    select_neurons,
)
from rewardtune.numerics import StepHealth, check_images
from rewardtune.prompts import load_prompts
from rewardtune.resume_policy import (
    apply_optimizer_settings,
    check_epochs,
    check_resume,
    fresh_start_warning,
    loading_checkpoint,
    record_resume,
)
from rewardtune.rewards import build_reward, check_finite
from rewardtune.shared_dir import require_shared_dir
from rewardtune.temporal import (
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    standardize,
    step_rewards,
)
from rewardtune.tracking import TrainingTracker

log = logging.getLogger(__name__)

# Written by a run that stopped cleanly on SIGTERM: a launcher reports only "a worker exited non-zero"
# (torchrun and accelerate launch exit 1 even when every rank exited 143), so the stage reads this instead.
TERMINATED_FILE = "terminated.json"


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process)."""
    return (seed * 1_000_003 + epoch * 7919 + process * 104_729) % (2**31 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RewardtuneError("device: cuda was requested but no CUDA GPU is visible; set device: cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def load_optimizer_state(path: Path) -> dict:
    """An optimizer state file, loaded as data only (a crafted pickle is refused, never run).

    Loaded to the CPU: `Optimizer.load_state_dict` moves each state to its parameter's device, and a map
    to accelerate's per-process device (`cpu:0` under a multi-process CPU run) cannot be restored.
    """
    import pickle

    fix = "resume from another checkpoint or start a new --out"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for anything but tensors and data
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not a weights-only torch file "
                              f"({_first_line(err)}); {fix}") from None
    except Exception as err:  # noqa: BLE001 - a truncated zip, an I/O error: one line, not a traceback
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} could not be read ({_first_line(err)}); {fix}") from None


class InlineExecutor:
    """`sampling.reward_workers: 0`: score in the sampling thread (serialized; the overlap's baseline)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - re-raised by .result(), as a pool would
            future.set_exception(err)
        return future


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
    reward: float = 0.0  # computing rewards (in the reward thread, overlapping sampling)
    reward_wait: float = 0.0  # waiting for rewards after the last batch sampled: what the overlap did not hide
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
        if accumulation % cfg.training.fused_steps:
            raise RewardtuneError(
                f"training.fused_steps={cfg.training.fused_steps} must divide the {accumulation} micro-steps of an "
                "optimizer step, or a fused call would straddle two optimizer steps"
            )
        accumulation //= cfg.training.fused_steps
        self.accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=cfg.training.mixed_precision,
            gradient_accumulation_steps=accumulation,
            **TrainingTracker.accelerator_kwargs(cfg, self.out_dir),
        )
        self.tracker = TrainingTracker(self.accelerator, cfg, self.out_dir)
        self.device = self.accelerator.device
        require_shared_dir(self.out_dir, self.accelerator)  # before any work: all processes fail together
        if cfg.training.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(cfg.training.seed)

        self.pipe = load_pipeline(cfg.model)
        self.trainable = prepare_policy(self.pipe, cfg.model, self.device, cfg.training.gradient_checkpointing)
        apply_performance(self.pipe, cfg.performance)
        self.scheduler = self.pipe.scheduler
        self.scheduler.set_timesteps(k, device=self.device)
        self.prompts = load_prompts(cfg.prompts.source, cfg.prompts.template)
        self._check_prompt_lengths()
        self.reward_fn = build_reward(cfg.reward, self.device)
        self.reward_pool = InlineExecutor() if cfg.sampling.reward_workers == 0 else ThreadPoolExecutor(1, "reward")
        algo = cfg.algorithm
        self.constraints = algo.constraints
        self.aux_reward_fns = [build_reward(c.reward, self.device) for c in self.constraints]
        self.reward_names = [cfg.reward.name] + [c.reward.name for c in self.constraints]
        tracking = cfg.training.stat_tracking
        self.stat_trackers = [PerPromptStatTracker(tracking.buffer_size, tracking.min_count) for _ in self.reward_names]
        groups = [{"params": self.trainable, "lr": cfg.training.learning_rate, "name": "policy"}]
        self.critics: Critics | None = None
        if algo.uses_critic:
            self.tower = self._load_critic_tower()
            self.critics = Critics(
                self.reward_names, self.tower.dim, algo.critic.hidden_sizes, algo.critic.dropout, cfg.training.seed
            ).to(self.device)
            groups.append({"params": list(self.critics.parameters()), "lr": algo.critic.learning_rate, "name": "critic"})
        self.reference_unet = self._reference_policy() if algo.uses_critic and algo.critic.kl_coef > 0 else None
        self.kl_controller = KLController(algo.critic.kl_init_coef, algo.critic.kl_target, algo.critic.kl_horizon)
        self.optimizer = torch.optim.AdamW(
            groups,
            betas=(cfg.training.adam_beta1, cfg.training.adam_beta2),
            weight_decay=cfg.training.adam_weight_decay,
            eps=cfg.training.adam_epsilon,
        )
        if self.critics is not None:
            self.unet, self.critics, self.optimizer = self.accelerator.prepare(self.pipe.unet, self.critics, self.optimizer)
        else:
            self.unet, self.optimizer = self.accelerator.prepare(self.pipe.unet, self.optimizer)
        self.dual = DualState(integral=[c.initial_multiplier for c in self.constraints])
        self.thresholds: list[float | None] = [c.threshold for c in self.constraints]
        self.previous_dormant: dict[str, torch.Tensor] = {}
        self.negative_embed = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [cfg.sampling.negative_prompt])
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.epochs_done = 0
        self.samples_seen = 0
        self.global_step = 0
        self.term_requested_at: float | None = None  # monotonic time of SIGTERM
        self.epoch_started_at = 0.0
        self.last_epoch_s: float | None = None  # wall time of the last full epoch, checkpoint included
        self.step_health = StepHealth(cfg.training.mixed_precision)

    # ------------------------------------------------------------------ setup helpers
    def _check_prompt_lengths(self) -> None:
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length
        # verbose=False: this check replaces the tokenizer's own warning about the same thing
        too_long = [p for p in self.prompts if len(tokenizer(p, verbose=False).input_ids) > limit]
        if too_long:
            raise RewardtuneError(
                f"{len(too_long)} prompt(s) exceed the tokenizer's {limit} tokens (first: {too_long[0][:60]!r}); "
                "shorten them, they would be silently truncated"
            )

    def _load_critic_tower(self):
        """The frozen image tower that embeds decoded x_t for the critic (the reward's own CLIP tower by default)."""
        from rewardtune.rewards import critic_tower_checkpoint, critic_tower_source
        from rewardtune.rewards.towers import load_clip_image_tower

        critic = self.cfg.algorithm.critic
        source = critic.image_encoder or critic_tower_source(self.cfg.reward)
        if source is None:
            raise RewardtuneError(
                f"algorithm.critic.image_encoder is required: reward '{self.cfg.reward.name}' has no image tower "
                "to share; give a CLIP vision model source (hub id, directory or cache URI)"
            )
        checkpoint = None if critic.image_encoder else critic_tower_checkpoint(self.cfg.reward)
        return load_clip_image_tower(source, self.device, checkpoint=checkpoint, preprocessing=critic.preprocessing)

    def _reference_policy(self) -> torch.nn.Module | None:
        """The frozen base policy of the KL penalty: LoRA runs use the UNet with adapters off (no copy)."""
        if self.cfg.model.finetune == "lora":
            return None
        import copy

        return copy.deepcopy(self.pipe.unet).requires_grad_(False).eval()

    @property
    def policy(self) -> torch.nn.Module:
        """The UNet itself: under DDP `self.unet` is a wrapper without `.config` (sampling and probes need no gradient sync)."""
        return self.accelerator.unwrap_model(self.unet)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _progress(self) -> bool:
        # progress bars only on a terminal: in a pod's log (or a failed run's stderr) they are noise
        return self.cfg.logging.progress_bars and self.is_main and sys.stderr.isatty()

    # ------------------------------------------------------------------ sampling
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
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        encode = (PromptEmbeddingCache(tokenizer, text_encoder) if self.cfg.performance.cache_prompt_embeds
                  else lambda prompts: encode_prompts(tokenizer, text_encoder, prompts))
        for _ in range(cfg.batches_per_epoch):
            start = time.perf_counter()
            group = cfg.images_per_prompt
            drawn = prompt_rng.integers(len(self.prompts), size=cfg.batch_size // group)
            prompts = [self.prompts[i] for i in drawn for _ in range(group)]
            embeds = encode(prompts)
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
                sync_free=self.cfg.performance.sync_free_steps,
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
            check_images(traj.images, prompts, epoch, self.trained_parameters() if self.epochs_done else None)
            # scored in the reward thread while the next batch samples (ddpo-pytorch's executor)
            rewards = self.reward_pool.submit(self.score_batch, traj.images, prompts, times)
            parts.append({"prompts": prompts, "traj": traj, "rewards": rewards, "extras": extras})
            fault_point("sample")
            self.safe_point(epoch)
        start = time.perf_counter()
        for part in parts:
            part["rewards"] = part["rewards"].result()
        times.reward_wait += time.perf_counter() - start
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
    def score_batch(self, images: torch.Tensor, prompts: list[str], times: EpochTimes) -> torch.Tensor:
        """[B, 1 + constraints] rewards of one sampled batch; raises (never guesses) when a reward fails."""
        start = time.perf_counter()
        scores = [check_finite(self.cfg.reward.name, self.reward_fn(images, prompts).float(), prompts)]
        for spec, fn in zip(self.constraints, self.aux_reward_fns, strict=True):
            scores.append(check_finite(spec.reward.name, fn(images, prompts).float(), prompts))
        times.reward += time.perf_counter() - start
        return torch.stack([score.to(self.device) for score in scores], dim=1)

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

    # ------------------------------------------------------------------ advantages
    def normalized_rewards(self, rewards: torch.Tensor, prompts: list[str], tracker: PerPromptStatTracker) -> torch.Tensor:
        """Normalize rewards by their prompt's (or the batch's) statistics, gathered across all processes."""
        all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        all_rewards = self.accelerator.gather(rewards).cpu().numpy()
        if self.cfg.training.stat_tracking.enabled:
            normalized = tracker.update(all_prompts, all_rewards)
        else:
            normalized = batch_normalized(all_rewards)
        n = len(prompts)
        mine = normalized[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
        mine = torch.as_tensor(mine, dtype=torch.float32, device=self.device)
        # DDPO clips its advantage; TDPO's terminal reward is unclipped (official clip_range_reward = 0)
        clip = self.cfg.algorithm.critic.reward_clip if self.critics is not None else self.cfg.training.adv_clip_max
        return mine.clamp(-clip, clip) if clip > 0 else mine

    def compute_advantages(self, samples: EpochSamples) -> dict[str, float]:
        """DDPO: one clipped advantage for every step. TDPO: A_k = R_k - V_old(s_k) per reward, per step;
        CDPO combines them with the Lagrange multipliers. Returns the KL penalty's statistics (if any)."""
        steps = samples.timesteps.shape[1]
        all_rewards = samples.extras["all_rewards"]
        terminals = [self.normalized_rewards(all_rewards[:, r], samples.prompts, tracker)
                     for r, tracker in enumerate(self.stat_trackers)]
        if self.critics is None:
            samples.advantages = terminals[0][:, None].expand(-1, steps)
            return {}
        critic = self.cfg.algorithm.critic
        kl, beta, stats = None, 0.0, {}
        if critic.kl_coef > 0:
            ref = samples.extras["ref_log_probs"]
            kl = kl_penalty(samples.log_probs, ref, critic.kl_estimator)
            beta = critic.kl_coef * self.kl_controller.value
            measured = self.accelerator.gather(sample_kl(samples.log_probs, ref)).mean().item()
            stats = {"kl_mean": measured, "kl_controller": self.kl_controller.value, "kl_beta": beta}
            self.kl_controller.update(measured, len(samples) * self.accelerator.num_processes)
        groups = samples.prompts if critic.advantage_norm == "per_prompt" else None
        returns, advantages = [], []
        for r, terminal in enumerate(terminals):
            step_r = step_rewards(terminal, steps, kl if r == 0 else None, beta)
            returns.append(discounted_returns(step_r, critic.gamma))
            advantages.append(self._standardized(returns[-1] - samples.extras["old_values"][..., r], groups))
        samples.extras["returns"] = torch.stack(returns, dim=-1)
        samples.advantages = combine_advantages(advantages[0], advantages[1:], self.dual.multipliers)
        return stats

    def _standardized(self, values: torch.Tensor, groups: list[str] | None) -> torch.Tensor:
        """Standardization over all processes' (sample, step) pairs, globally or per prompt: N processes
        standardize exactly as one process holding all their samples would."""
        if self.accelerator.num_processes == 1:
            return standardize(values, groups)
        everything = standardize(self.accelerator.gather(values), gather_object(groups) if groups is not None else None)
        n = values.shape[0]
        return everything[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]

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

    def _micro_steps(self, n: int) -> list[list[tuple[slice, int]]]:
        """(sample slice, time column) pairs in the loop order of the algorithm, `fused_steps` per UNet call.

        Fusing consecutive micro-steps of one optimizer step changes only the batch shape: every pair
        still weighs the same in the step's mean loss.
        """
        bs = self.cfg.training.batch_size
        batches = [slice(i, i + bs) for i in range(0, n, bs)]
        steps = range(self.num_train_steps)
        if self.time_major:
            pairs = [(b, j) for j in steps for b in batches]
        else:
            pairs = [(b, j) for b in batches for j in steps]
        fused = self.cfg.training.fused_steps
        return [pairs[i : i + fused] for i in range(0, len(pairs), fused)]

    @staticmethod
    def _view(batch: dict[str, torch.Tensor], chunk: list[tuple[slice, int]]) -> dict[str, torch.Tensor]:
        """The (sample, step) pairs of a chunk as one flat batch."""
        out = {}
        for name, value in batch.items():
            if name in ("prompt_embeds", "negative_embeds"):
                parts = [value[rows] for rows, _ in chunk]
            else:
                parts = [value[rows, j] for rows, j in chunk]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def log_prob_of(self, view: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """log pi(x_{t-1} | x_t) of each pair in a flat batch, recomputed with gradients."""
        model = model or self.unet
        latents, timesteps = view["latents"], view["timesteps"]
        model_dtype = next(model.parameters()).dtype
        with self.accelerator.autocast():
            noise_pred = guided_noise_pred(
                model,
                self.scheduler.scale_model_input(latents, timesteps).to(model_dtype),
                timesteps,
                view["prompt_embeds"],
                view["negative_embeds"],
                self.cfg.sampling.guidance_scale,
            )
        _, log_prob = ddim_step_with_logprob(
            self.scheduler, noise_pred, timesteps, latents, eta=self.cfg.sampling.eta, prev_sample=view["next_latents"],
            check_std=not self.cfg.performance.sync_free_steps,  # the sampled schedule was checked once
        )
        return log_prob

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.log_prob_of(self._view(batch, [(rows, j)]), model)

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        cfg = self.cfg.training
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, self.accelerator.process_index) + 1)
        self.unet.train()
        models = [self.unet] if self.critics is None else [self.unet, self.critics.train()]
        critic_cfg = self.cfg.algorithm.critic
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        if self.critics is not None:
            stats["critic_loss"] = []
        from tqdm.auto import tqdm

        for inner in range(cfg.inner_epochs):
            if inner and self.measures_neurons:  # official: measure (and reset) after every inner epoch; the last is _run's
                self.measure_and_reset(epoch, self.reset_due(epoch), inner - 1)
            batch = self._shuffled(samples, generator)
            for chunk in tqdm(self._micro_steps(len(samples)), desc="training", leave=False, disable=not self._progress()):
                view = self._view(batch, chunk)
                with self.accelerator.accumulate(*models):
                    log_prob = self.log_prob_of(view)
                    old = view["log_probs"]
                    loss = ppo_clipped_loss(log_prob, old, view["advantages"], cfg.clip_range)
                    total = loss
                    if self.critics is not None:
                        values = self.critics(view["critic_inputs"])
                        value_loss = clipped_value_loss(values, view["old_values"], view["returns"], critic_cfg.value_clip)
                        total = loss + critic_cfg.coef * value_loss
                        stats["critic_loss"].append(value_loss.detach())
                    self.accelerator.backward(total)
                    synced = self.accelerator.sync_gradients
                    if synced:
                        self.clip_gradients()
                        self.global_step += 1
                        if self.critics is not None:
                            fault_point("critic_update")
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if synced:
                    fault_point("optimizer_step")
                    self.safe_point(epoch)
                stats["loss"].append(loss.detach())
                for name, value in ppo_diagnostics(log_prob.detach(), old, cfg.clip_range).items():
                    stats[name].append(value)
            self.probe = self._probe(batch)
        means = torch.stack([torch.stack(values).mean() for values in stats.values()])
        means = self.accelerator.reduce(means, reduction="mean")  # every rank has as many micro-steps: the global mean
        return dict(zip(stats, means.tolist(), strict=True))

    def _probe(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The neuron-score probe of the official code: the first `sampling.batch_size` samples of this inner
        epoch's shuffled buffer at the last trained time column (all processes' probes are gathered later)."""
        rows = slice(0, self.cfg.sampling.batch_size)
        probe = {name: batch[name][rows, self.num_train_steps - 1] for name in
                 ("latents", "timesteps", *(["critic_inputs"] if self.critics is not None else []))}
        probe["prompt_embeds"], probe["negative_embeds"] = batch["prompt_embeds"][rows], batch["negative_embeds"][rows]
        return probe

    def trained_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything the optimizer updates: what must stay finite."""
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.unet).named_parameters() if p.requires_grad]
        if self.critics is not None:
            named += [(f"critic.{n}", p) for n, p in self.accelerator.unwrap_model(self.critics).named_parameters()]
        return named

    def clip_gradients(self) -> None:
        """Unscale once (one optimizer, however many networks), then clip each network's norm separately.

        The official TDPO code unscales the critic twice under fp16; this does not.
        """
        self.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.training.max_grad_norm)]
        if self.critics is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(self.critics.parameters(), self.cfg.training.max_grad_norm))
        self.step_health.record(norms)

    # ------------------------------------------------------------------ neuron reset (TDPO-R)
    @property
    def measures_neurons(self) -> bool:
        """TDPO's critic neurons are measured (and logged) even without resets, as in the official code."""
        return self.cfg.algorithm.uses_critic

    def reset_due(self, epoch: int) -> bool:
        algo = self.cfg.algorithm
        return algo.uses_reset and (epoch + 1) % algo.reset.every == 0

    def _reset_layers(self) -> list[tuple[str, torch.nn.Linear, torch.nn.Linear, bool]]:
        """(name, layer, next layer, is_lora) for every layer whose neurons are scored (and can be reset)."""
        if self.cfg.algorithm.uses_reset and self.cfg.algorithm.reset.target == "policy_lora":
            if self.cfg.model.finetune != "lora":
                raise RewardtuneError("algorithm.reset.target: policy_lora needs model.finetune: lora")
            return [(name, down, up, True) for name, down, up in lora_pairs(self.policy)]
        critics = self.accelerator.unwrap_model(self.critics)
        layers = []
        for head_name, head in zip(critics.names, critics.heads, strict=True):
            linears = head.linears()
            layers += [(f"{head_name}.{i}", linears[i], linears[i + 1], False) for i in range(len(linears) - 1)]
        return layers

    def _global_scores(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Neuron scores over every process's probe, identical on every rank.

        The activations are all-gathered (as the official recycler does), scored, and rank 0's scores are
        broadcast, so the masks, the statistics and the reset agree bit for bit on every replica.
        """
        if self.accelerator.num_processes == 1:
            return [neuron_scores(a).cpu() for a in activations]
        from accelerate.utils import broadcast

        scores = [neuron_scores(self.accelerator.gather(a.contiguous())) for a in activations]
        return [s.cpu() for s in broadcast(scores, from_process=0)]

    @torch.no_grad()
    def measure_and_reset(self, epoch: int, reset: bool, inner: int = 0) -> dict[str, float]:
        """Score neurons on the inner epoch's probe; reset the selected ones if `reset`."""
        rules = self.cfg.algorithm.reset
        layers = self._reset_layers()
        modules = [down for _, down, _, _ in layers]
        probe = self.probe
        if layers and layers[0][3]:
            batch = {k: v.unsqueeze(1) if k in ("latents", "timesteps") else v for k, v in probe.items()}
            batch["next_latents"] = batch["latents"]
            acts = record_activations(modules, lambda: self.policy_log_prob(batch, slice(None), 0, self.policy))
        else:
            critics = self.accelerator.unwrap_model(self.critics).eval()
            acts = record_activations(modules, lambda: critics(probe["critic_inputs"]))
            critics.train()
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.training.seed, epoch, 0) + 2 + inner)
        total = dormant = resets = 0
        overlaps = []
        for (name, down, up, is_lora), scores in zip(layers, self._global_scores(acts), strict=True):
            dormant_now = dormant_mask(scores, rules.tau)
            overlaps.append(dormant_overlap(self.previous_dormant.get(name), dormant_now))
            self.previous_dormant[name] = dormant_now
            total += scores.numel()
            dormant += int(dormant_now.sum())
            if reset:
                mask = select_neurons(scores, rules.rule, rules.tau, rules.tau_high, rules.fraction)
                resets += int(mask.sum())
                if is_lora:
                    reset_lora_neurons(down, up, mask, self.optimizer.optimizer, generator)
                else:  # the critic's own init std 1/(d+1), d its input size, for every layer
                    std = self.accelerator.unwrap_model(self.critics).init_std
                    reset_linear_neurons(down, up, mask, self.optimizer.optimizer, generator, std)
                fault_point("reset")
        if reset:
            self._record_digests("reset", epoch)
        finite = [o for o in overlaps if o == o]
        return {"neurons_total": total, "neurons_dormant": dormant, "neurons_active": total - dormant,
                "dormant_fraction": dormant / max(total, 1), "dormant_overlap": sum(finite) / len(finite) if finite else None,
                "reset": reset, "neurons_reset": resets}

    def _record_digests(self, phase: str, epoch: int) -> None:
        """This replica's policy, critic and optimizer digests (only with RT_DIGEST_DIR: a test hook)."""
        if not os.environ.get(digests.DIGEST_ENV):
            return
        parts = {"policy": [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad],
                 "optimizer": digests.optimizer_tensors(self.optimizer.optimizer)}
        if self.critics is not None:
            parts["critic"] = list(self.accelerator.unwrap_model(self.critics).state_dict().items())
        digests.record(phase, epoch, self.accelerator.process_index, parts)

    # ------------------------------------------------------------------ constraints (CDPO)
    def update_multipliers(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        """Projected dual ascent on c_k - Ĵ_k once per epoch; relative thresholds come from epoch 0's base policy."""
        gathered = self.accelerator.gather(samples.extras["all_rewards"])
        means = gathered.mean(dim=0).tolist()[1:]
        for k, spec in enumerate(self.constraints):
            if self.thresholds[k] is None:
                if epoch != 0:
                    raise CheckpointError("relative CDPO thresholds are set at epoch 0; resume from a checkpoint that has them")
                self.thresholds[k] = means[k] - spec.relative_margin
        lagrange = self.cfg.algorithm.lagrange
        if lagrange.normalize == "base_std" and not self.dual.scales:
            if epoch != 0:
                raise CheckpointError("scale-free CDPO scales are set at epoch 0; resume from a checkpoint that has them")
            stds = gathered.std(dim=0).tolist()[1:] if gathered.shape[0] > 1 else [0.0] * len(self.constraints)
            self.dual.scales = [dual_scale(s, lagrange.scale_floor) for s in stds]
        self.dual.update(self.thresholds, means, lagrange.learning_rate, lagrange.pid_kp, lagrange.pid_kd)
        record = {}
        for k, spec in enumerate(self.constraints):
            name = spec.reward.name
            record |= {f"lambda_{name}": self.dual.multipliers[k], f"constraint_{name}": means[k],
                       f"threshold_{name}": self.thresholds[k]}
        return record

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict:
        m = self.cfg.model
        return {"model_source": m.source, "finetune": m.finetune, "lora_rank": m.lora_rank if m.finetune == "lora" else None,
                "algorithm": self.cfg.algorithm.name}

    def trainer_state(self) -> dict:
        return {"epochs_done": self.epochs_done, "samples_seen": self.samples_seen, "global_step": self.global_step,
                "stat_trackers": [t.state_dict() for t in self.stat_trackers], "dual": self.dual.state_dict(),
                "thresholds": self.thresholds, "kl_controller": self.kl_controller.state_dict(),
                "previous_dormant": {k: v.tolist() for k, v in self.previous_dormant.items()}}

    def load_trainer_state(self, state: dict) -> None:
        self.epochs_done, self.samples_seen = state["epochs_done"], state["samples_seen"]
        self.global_step = state["global_step"]
        for tracker, tracker_state in zip(self.stat_trackers, state["stat_trackers"], strict=True):
            tracker.load_state_dict(tracker_state)
        self.dual = DualState(**state["dual"])
        self.thresholds = state["thresholds"]
        if "kl_controller" in state:  # checkpoints written before the KL controller existed hold none
            self.kl_controller.load_state_dict(state["kl_controller"])
        self.previous_dormant = {k: torch.tensor(v, dtype=torch.bool) for k, v in state["previous_dormant"].items()}

    def _write_checkpoint(self, directory: Path) -> None:
        save_policy(self.accelerator.unwrap_model(self.unet), self.cfg.model, directory)
        if self.critics is not None:
            save_file(self.accelerator.unwrap_model(self.critics).state_dict(), directory / "critic.safetensors")
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
        for key in ("model_source", "finetune", "lora_rank", "algorithm"):
            if found.get(key) != expected[key]:
                raise CheckpointError(
                    f"checkpoint {path} was trained with {key}={found.get(key)!r}, this config has {expected[key]!r}; "
                    "resume with the original config or use a new --out directory"
                )
        changes = check_resume(path, self.cfg)
        with loading_checkpoint(path):
            load_policy_weights(self.accelerator.unwrap_model(self.unet), self.cfg.model, path)
            if self.critics is not None:
                self.accelerator.unwrap_model(self.critics).load_state_dict(load_file(path / "critic.safetensors"))
            try:
                self.optimizer.load_state_dict(load_optimizer_state(path / "optimizer.pt"))
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"checkpoint {path}: optimizer.pt does not fit this run's parameters "
                                      f"({_first_line(err)}); resume with the original config or start a new --out") from None
            self.load_trainer_state(json.loads((path / "trainer_state.json").read_text()))
        apply_optimizer_settings(self.optimizer, self.cfg)
        check_epochs(path, self.epochs_done, self.cfg.training.epochs)
        if changes and self.is_main:
            record_resume(self.out_dir, path, self.epochs_done, changes)

    # ------------------------------------------------------------------ termination (SIGTERM)
    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.term_requested_at is None:
            self.term_requested_at = time.monotonic()
            log.warning("SIGTERM received: stopping at the next safe point (grace %.0f s)",
                        self.cfg.checkpointing.termination_grace_s)

    def safe_point(self, epoch: int) -> None:
        """Inside an epoch: after SIGTERM, stop now unless the rest of the epoch and its checkpoint fit the grace.

        Only epoch boundaries are checkpointed (mid-epoch state would need the sampled trajectories), so
        stopping here loses this epoch's work but nothing else: resume redoes it bit-identically.
        """
        if self.term_requested_at is None and self.accelerator.num_processes == 1:
            return
        now = time.monotonic()
        # the epoch (checkpoint included) is predicted to end as the last one did, or now if it is already later
        fits = self.term_requested_at is None or (
            self.last_epoch_s is not None
            and max(self.epoch_started_at + self.last_epoch_s, now)
            < self.term_requested_at + self.cfg.checkpointing.termination_grace_s
        )
        requested, fits = self._termination_votes(fits)
        if not requested or fits:
            return
        found = latest_checkpoint(self.checkpoint_dir)
        newest = found[0].name if found else "none (starts over)"
        raise Terminated(f"SIGTERM: epoch {epoch} cannot finish within the {self.cfg.checkpointing.termination_grace_s:g} s "
                         f"grace ({now - self.epoch_started_at:.1f} s in); stopped without a new checkpoint, newest is "
                         f"{newest}; run again with --resume")

    def _termination_votes(self, fits: bool) -> tuple[bool, bool]:
        """(some process got SIGTERM, every process has time to finish the epoch), agreed by all processes,
        so that none stops alone and leaves the others waiting in a collective."""
        requested = self.term_requested_at is not None
        if self.accelerator.num_processes == 1:
            return requested, fits
        vote = torch.tensor([[float(requested), float(fits)]], device=self.device)
        votes = self.accelerator.gather(vote)
        return bool(votes[:, 0].max() > 0), bool(votes[:, 1].min() > 0)

    def _lock_out_dir(self) -> FileLock:
        """An exclusive lock on the run directory, held for the whole run (filelock: flock on POSIX).

        A retried pod can start while the old one is still inside its termination grace, writing its last
        checkpoint; the new one waits up to `checkpointing.lock_wait_s` for it instead of writing alongside.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / ".rewardtune.lock"
        lock = FileLock(path, mode=0o644)
        wait = self.cfg.checkpointing.lock_wait_s
        try:
            lock.acquire(timeout=0)
        except FileLockTimeout:
            if wait > 0:
                log.warning("%s is locked by another run; waiting up to %g s", self.out_dir, wait)
            try:
                if wait <= 0:
                    raise
                lock.acquire(timeout=wait, poll_interval=0.2)
            except FileLockTimeout:
                raise RewardtuneError(
                    f"{self.out_dir} is in use by another `rewardtune train` (lock {path.name} held for "
                    f"{wait:g} s); wait for it to end or choose another --out"
                ) from None
        return lock

    # ------------------------------------------------------------------ the job
    def run(self, resume: bool = False) -> Path:
        """The whole job; on SIGTERM it checkpoints at the next safe point and raises `Terminated`."""
        handler_installed = threading.current_thread() is threading.main_thread()
        lock = self._lock_out_dir() if self.is_main else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if handler_installed else None
        stopped = False
        try:
            return self._run(resume)
        except Terminated as err:
            stopped = True
            if self.is_main:
                write_json_atomic(self.out_dir / TERMINATED_FILE, {"message": str(err), "epochs_done": self.epochs_done})
            raise
        finally:
            # Under a launcher, the first rank to exit makes it SIGTERM the others, which may still be on their
            # way out of a clean stop: they keep this (recording, not killing) handler until they exit.
            if handler_installed and not (stopped and self.accelerator.num_processes > 1):
                signal.signal(signal.SIGTERM, previous)
            self.tracker.finish()
            if lock is not None:
                lock.release()

    def _run(self, resume: bool) -> Path:
        cfg = self.cfg
        if self.is_main:
            (self.out_dir / TERMINATED_FILE).unlink(missing_ok=True)
            for path in remove_stale(self.checkpoint_dir):
                log.warning("removed %s: an incomplete checkpoint write from a killed run", path.name)
        if resume:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is not None:
                self.load(*found)
                log.info("resumed from %s at epoch %d", found[0], self.epochs_done)
            else:
                log.warning(fresh_start_warning(self.checkpoint_dir))
        elif list_checkpoints(self.checkpoint_dir):
            raise RewardtuneError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue that run or choose a new --out"
            )
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.truncate_to(self.epochs_done)
            write_text_atomic(self.out_dir / "config.yaml", cfg.to_yaml())
        self.tracker.start(self.epochs_done)
        for epoch in range(self.epochs_done, cfg.training.epochs):
            set_seed(epoch_seed(cfg.training.seed, epoch, self.accelerator.process_index))
            self.epoch_started_at = time.monotonic()
            self.safe_point(epoch)
            start = time.perf_counter()
            times = EpochTimes()
            samples = self.sample_epoch(epoch, times)
            advantage_stats = self.compute_advantages(samples)
            t0 = time.perf_counter()
            stats = {**advantage_stats, **self.train_epoch(samples, epoch)}
            self.step_health.check(epoch, stats, self.trained_parameters())
            times.training = time.perf_counter() - t0
            self.epochs_done = epoch + 1
            if self.critics is not None:  # over all processes' (sample, step) pairs
                stats["value_explained_variance"] = explained_variance(
                    self.accelerator.gather(samples.extras["old_values"][..., 0]),
                    self.accelerator.gather(samples.extras["returns"][..., 0]),
                )
            if self.constraints:
                stats |= self.update_multipliers(samples, epoch)
            reset_now = self.reset_due(epoch)
            if reset_now:
                self.save("pre_reset")
                fault_point("pre_reset_saved")
            if self.measures_neurons:
                stats |= self.measure_and_reset(epoch, reset_now, cfg.training.inner_epochs - 1)
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
                "time_reward_wait_s": times.reward_wait,
                "time_training_s": times.training,
            }
            if self.is_main:
                self.metrics.append(record)
                self.tracker.log_epoch(record, samples.images, samples.prompts, samples.rewards)
                log.info("epoch %d: reward %.4f ± %.4f, kl %.2e, clipfrac %.3f", epoch, record["reward_mean"],
                         record["reward_std"], record["approx_kl"], record["clipfrac"])
            fault_point("metrics")
            stopping, _ = self._termination_votes(True)
            saved = None
            if reset_now:
                saved = self.save("post_reset")
            elif stopping or self.epochs_done % cfg.checkpointing.every_epochs == 0 or self.epochs_done == cfg.training.epochs:
                saved = self.save()
            self._record_digests("epoch", epoch)
            fault_point("epoch_end")
            self.last_epoch_s = time.monotonic() - self.epoch_started_at
            if stopping and self.epochs_done < cfg.training.epochs:
                name = saved.name if saved else checkpoint_name(self.epochs_done, "post_reset" if reset_now else "regular")
                raise Terminated(f"SIGTERM: stopped after epoch {epoch} with checkpoint {name}; run again with --resume")
        return self.out_dir
