"""Building a run: the accelerator, the pipeline and its trainable policy, rewards, critics, the optimizer
(one parameter group per network) and the frozen reference policy, held by one `Run` that the stages share.

Every epoch draws its randomness from (seed, epoch, process): see `epoch_seed`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rewardtune.config import RunConfig
from rewardtune.critic import Critics
from rewardtune.diffusion import (
    encode_prompts,
)
from rewardtune.errors import RewardtuneError
from rewardtune.families import make_family
from rewardtune.families.base import PolicyFamily
from rewardtune.metrics import MetricsLog
from rewardtune.models import apply_performance, load_pipeline, prepare_policy, resolve_model_dir
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


@dataclass
class Progress:
    """The run's counters: written by the loop and the optimizer, saved and restored by the checkpoints."""

    epochs_done: int = 0
    samples_seen: int = 0
    global_step: int = 0


@dataclass
class Run:
    """What `build_run` builds for one run: the parts the stages share, read (never rebuilt) by each."""

    cfg: RunConfig
    out_dir: Path
    accelerator: Accelerator
    tracker: TrainingTracker
    device: torch.device
    is_flow: bool
    trainable_steps: list[int]  # the trainable (stochastic) steps: all of sd's, a flow model's SDE steps
    num_train_steps: int
    time_major: bool  # TDPO's loop order: the optimizer steps within one time column
    pipe: object
    family: PolicyFamily
    trainable: list[torch.nn.Parameter]
    scheduler: object
    unet: torch.nn.Module  # the accelerator-prepared denoiser: the UNet (sd) or transformer (flow)
    optimizer: torch.optim.Optimizer
    critics: Critics | None
    tower: object | None  # the critic's frozen image tower
    reference_unet: torch.nn.Module | None  # the KL penalty's frozen base policy (None: LoRA with adapters off)
    prompts: list[str]
    reward_fn: Callable
    aux_reward_fns: list[Callable]
    reward_names: list[str]
    constraints: list
    reward_pool: object
    negative_embed: torch.Tensor | None  # sd: the encoded negative prompt (a flow family encodes it per batch)
    autocast_dtype: torch.dtype | None
    metrics: MetricsLog
    checkpoint_dir: Path

    @property
    def trainable_set(self) -> set[int]:
        return set(self.trainable_steps)

    @property
    def policy(self) -> torch.nn.Module:
        """The UNet (or transformer) itself: under DDP `unet` is a wrapper without `.config` (sampling and probes need no gradient sync)."""
        return self.accelerator.unwrap_model(self.unet)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def progress_bars(self) -> bool:
        # progress bars only on a terminal: in a pod's log (or a failed run's stderr) they are noise
        return self.cfg.logging.progress_bars and self.is_main and sys.stderr.isatty()

    def trained_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything the optimizer updates: what must stay finite."""
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        if self.critics is not None:
            named += [(f"critic.{n}", p) for n, p in self.accelerator.unwrap_model(self.critics).named_parameters()]
        return named


def build_run(cfg: RunConfig, out_dir: str | Path) -> Run:
    """Everything a run needs, built in a fixed order (the global RNG seeds the LoRA and reward weights)."""
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    k = cfg.sampling.num_steps
    is_flow = cfg.model.family != "sd"
    flags = cfg.sampling.flow.stochastic_steps(k) if is_flow else [True] * k  # a flow model's ODE steps have no density
    trainable_steps = [i for i, stochastic in enumerate(flags) if stochastic]
    num_train_steps = max(1, int(len(trainable_steps) * cfg.training.timestep_fraction))
    # time-major loops (TDPO) step the optimizer within one time column; DDPO accumulates over steps too
    time_major = cfg.algorithm.uses_critic
    accumulation = cfg.training.gradient_accumulation_steps * (1 if time_major else num_train_steps)
    if accumulation % cfg.training.fused_steps:
        raise RewardtuneError(
            f"training.fused_steps={cfg.training.fused_steps} must divide the {accumulation} micro-steps of an "
            "optimizer step, or a fused call would straddle two optimizer steps"
        )
    accumulation //= cfg.training.fused_steps
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.training.mixed_precision,
        gradient_accumulation_steps=accumulation,
        **TrainingTracker.accelerator_kwargs(cfg, out_dir),
    )
    tracker = TrainingTracker(accelerator, cfg, out_dir)
    device = accelerator.device
    require_shared_dir(out_dir, accelerator)  # before any work: all processes fail together
    if cfg.training.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.training.seed)

    pipe, trainable, denoiser, family = _load_policy(cfg, device, is_flow)
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.template)
    _check_prompt_lengths(pipe.tokenizer, prompts)
    reward_fn = build_reward(cfg.reward, device)
    reward_pool = InlineExecutor() if cfg.sampling.reward_workers == 0 else ThreadPoolExecutor(1, "reward")
    algo = cfg.algorithm
    constraints = algo.constraints
    aux_reward_fns = [build_reward(c.reward, device) for c in constraints]
    reward_names = [cfg.reward.name] + [c.reward.name for c in constraints]
    groups = [{"params": trainable, "lr": cfg.training.learning_rate, "name": "policy"}]
    critics: Critics | None = None
    tower = None
    if algo.uses_critic:
        tower = _load_critic_tower(cfg, device)
        critics = Critics(
            reward_names, tower.dim + int(is_flow), algo.critic.hidden_sizes, algo.critic.dropout, cfg.training.seed
        ).to(device)
        groups.append({"params": list(critics.parameters()), "lr": algo.critic.learning_rate, "name": "critic"})
    reference_unet = _reference_policy(cfg, denoiser) if algo.uses_reference_policy else None
    optimizer = torch.optim.AdamW(
        groups,
        betas=(cfg.training.adam_beta1, cfg.training.adam_beta2),
        weight_decay=cfg.training.adam_weight_decay,
        eps=cfg.training.adam_epsilon,
    )
    if critics is not None:
        unet, critics, optimizer = accelerator.prepare(denoiser, critics, optimizer)
    else:
        unet, optimizer = accelerator.prepare(denoiser, optimizer)
    negative_embed = None
    if not is_flow:  # a flow family encodes the negative prompt with each batch (pooled + sequence)
        negative_embed = encode_prompts(pipe.tokenizer, pipe.text_encoder, [cfg.sampling.negative_prompt])
    return Run(
        cfg=cfg, out_dir=out_dir, accelerator=accelerator, tracker=tracker, device=device, is_flow=is_flow,
        trainable_steps=trainable_steps, num_train_steps=num_train_steps, time_major=time_major, pipe=pipe,
        family=family, trainable=trainable, scheduler=pipe.scheduler, unet=unet, optimizer=optimizer,
        critics=critics, tower=tower, reference_unet=reference_unet, prompts=prompts, reward_fn=reward_fn,
        aux_reward_fns=aux_reward_fns, reward_names=reward_names, constraints=constraints, reward_pool=reward_pool,
        negative_embed=negative_embed,
        autocast_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision),
        metrics=MetricsLog(out_dir / "metrics.jsonl"), checkpoint_dir=out_dir / "checkpoints",
    )


def _load_policy(cfg: RunConfig, device: torch.device, is_flow: bool):
    """(pipeline, trainable parameters, denoiser, `PolicyFamily`) of `model.family`.

    The denoiser (UNet for sd, transformer for flow) is unprepared: `build_run` hands it to the accelerator.
    """
    if is_flow:
        from rewardtune.families.flow import load_flow_pipeline, prepare_flow_policy

        pipe = load_flow_pipeline(resolve_model_dir(cfg.model.source, cfg.model.revision, cfg.model.family),
                                  cfg.model.family)
        trainable = prepare_flow_policy(pipe, cfg.model, device, cfg.training.gradient_checkpointing)
        denoiser = pipe.transformer
    else:
        pipe = load_pipeline(cfg.model)
        trainable = prepare_policy(pipe, cfg.model, device, cfg.training.gradient_checkpointing)
        apply_performance(pipe, cfg.performance)
        denoiser = pipe.unet
    if not is_flow:
        pipe.scheduler.set_timesteps(cfg.sampling.num_steps, device=device)
    # samples through the unwrapped denoiser; the PPO loop passes the prepared one (`model=run.unet`)
    family = make_family(pipe, eta=cfg.sampling.eta, flow=cfg.sampling.flow)
    family.check_resolution(cfg.sampling.resolution)  # before any work, not at the first batch
    return pipe, trainable, denoiser, family


def _check_prompt_lengths(tokenizer, prompts: list[str]) -> None:
    limit = tokenizer.model_max_length
    # verbose=False: this check replaces the tokenizer's own warning about the same thing
    too_long = [p for p in prompts if len(tokenizer(p, verbose=False).input_ids) > limit]
    if too_long:
        raise RewardtuneError(
            f"{len(too_long)} prompt(s) exceed the tokenizer's {limit} tokens (first: {too_long[0][:60]!r}); "
            "shorten them, they would be silently truncated"
        )


def _load_critic_tower(cfg: RunConfig, device: torch.device):
    """The frozen image tower that embeds decoded x_t for the critic (the reward's own CLIP tower by default)."""
    from rewardtune.rewards import critic_image_tower, critic_tower_checkpoint
    from rewardtune.rewards.towers import load_clip_image_tower

    critic = cfg.algorithm.critic
    source = critic_image_tower(cfg)
    checkpoint = None if critic.image_encoder else critic_tower_checkpoint(cfg.reward)
    return load_clip_image_tower(source, device, checkpoint=checkpoint, preprocessing=critic.preprocessing)


def _reference_policy(cfg: RunConfig, denoiser: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen base policy of the KL penalty: LoRA runs use the UNet with adapters off (no copy)."""
    if cfg.model.finetune == "lora":
        return None
    import copy

    return copy.deepcopy(denoiser).requires_grad_(False).eval()
