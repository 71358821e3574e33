"""Building a run: the accelerator, the pipeline and its trainable policy, rewards, critics, the optimizer
(one parameter group per network) and the frozen reference policy.

Every epoch draws its randomness from (seed, epoch, process): see `epoch_seed`.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rewardtune.advantages import PerPromptStatTracker
from rewardtune.config import RunConfig
from rewardtune.critic import Critics
from rewardtune.diffusion import (
    encode_prompts,
)
from rewardtune.errors import RewardtuneError
from rewardtune.families import make_family
from rewardtune.kl import KLController
from rewardtune.lagrangian import DualState
from rewardtune.metrics import MetricsLog
from rewardtune.models import apply_performance, load_pipeline, prepare_policy, resolve_model_dir
from rewardtune.numerics import StepHealth
from rewardtune.prompts import load_prompts
from rewardtune.rewards import build_reward
from rewardtune.shared_dir import require_shared_dir
from rewardtune.tracking import TrainingTracker


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, process)."""
    return (seed * 1_000_003 + epoch * 7919 + process * 104_729) % (2**31 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RewardtuneError("device: cuda was requested but no CUDA GPU is visible; set device: cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class InlineExecutor:
    """`sampling.reward_workers: 0`: score in the sampling thread (serialized; the overlap's baseline)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - re-raised by .result(), as a pool would
            future.set_exception(err)
        return future


class RunSetup:
    """The models and optimizer of one run; the other parts of `Trainer` read these attributes."""

    def _build(self, cfg: RunConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        device = resolve_device(cfg.device)
        k = cfg.sampling.num_steps
        self.is_flow = cfg.model.family != "sd"
        # the trainable (stochastic) steps: all of sd's; a flow model's SDE steps (its ODE steps have no density)
        flags = cfg.sampling.flow.stochastic_steps(k) if self.is_flow else [True] * k
        self.trainable_steps = [i for i, stochastic in enumerate(flags) if stochastic]
        self.trainable_set = set(self.trainable_steps)
        self.num_train_steps = max(1, int(len(self.trainable_steps) * cfg.training.timestep_fraction))
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

        self._load_policy()
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
                self.reward_names, self.tower.dim + int(self.is_flow), algo.critic.hidden_sizes, algo.critic.dropout, cfg.training.seed
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
            self.unet, self.critics, self.optimizer = self.accelerator.prepare(self.denoiser, self.critics, self.optimizer)
        else:
            self.unet, self.optimizer = self.accelerator.prepare(self.denoiser, self.optimizer)
        self.dual = DualState(integral=[c.initial_multiplier for c in self.constraints])
        self.thresholds: list[float | None] = [c.threshold for c in self.constraints]
        self.previous_dormant: dict[str, torch.Tensor] = {}
        if not self.is_flow:  # a flow family encodes the negative prompt with each batch (pooled + sequence)
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
    def _load_policy(self) -> None:
        """The pipeline of `model.family`, its trainable parameters, and the `PolicyFamily` that drives it.

        `self.unet` (set by `_build`) is the accelerator-prepared denoiser: the UNet (sd) or transformer (flow).
        """
        cfg = self.cfg
        if self.is_flow:
            from rewardtune.families.flow import load_flow_pipeline, prepare_flow_policy

            self.pipe = load_flow_pipeline(resolve_model_dir(cfg.model.source, cfg.model.revision, cfg.model.family),
                                           cfg.model.family)
            self.trainable = prepare_flow_policy(self.pipe, cfg.model, self.device, cfg.training.gradient_checkpointing)
            self.denoiser = self.pipe.transformer
        else:
            self.pipe = load_pipeline(cfg.model)
            self.trainable = prepare_policy(self.pipe, cfg.model, self.device, cfg.training.gradient_checkpointing)
            apply_performance(self.pipe, cfg.performance)
            self.denoiser = self.pipe.unet
        self.scheduler = self.pipe.scheduler
        if not self.is_flow:
            self.scheduler.set_timesteps(cfg.sampling.num_steps, device=self.device)
        # samples through the unwrapped denoiser; the PPO loop passes the prepared one (`model=self.unet`)
        self.family = make_family(self.pipe, eta=cfg.sampling.eta, flow=cfg.sampling.flow)

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

        return copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    @property
    def policy(self) -> torch.nn.Module:
        """The UNet (or transformer) itself: under DDP `self.unet` is a wrapper without `.config` (sampling and probes need no gradient sync)."""
        return self.accelerator.unwrap_model(self.unet)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _progress(self) -> bool:
        # progress bars only on a terminal: in a pod's log (or a failed run's stderr) they are noise
        return self.cfg.logging.progress_bars and self.is_main and sys.stderr.isatty()

