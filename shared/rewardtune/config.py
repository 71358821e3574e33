"""The one run-config schema: YAML in, validated pydantic models out.

The CLI, the KFP components and the tests all build a `RunConfig` through `load_config` /
`parse_config`, so a value that is wrong anywhere is wrong everywhere, with the same one-line message.
"""

from __future__ import annotations

import difflib
import math
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rewardtune.errors import ConfigError

SECRET_ERROR = "credentials_in_config"
# Flow-GRPO's LoRA targets for SD3.5 (attention of both streams of the joint blocks): the sd3/flux default
FLOW_LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)


def _no_credentials(source: str | None) -> str | None:
    """Configs are copied into checkpoints, metrics and reports: a password in a URL would travel with them."""
    if source and "://" in source:
        parsed = urllib.parse.urlsplit(source)
        if parsed.username or parsed.password:
            raise PydanticCustomError(  # its own type: the error message must not echo the value back
                SECRET_ERROR,
                "{where}: credentials do not belong in a config (it is copied into checkpoints and reports); pass "
                "them as environment variables (AWS_*, HF_TOKEN) from a Secret",
                {"where": f"{parsed.scheme}://...@{parsed.hostname}"},
            )
    return source


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelled key must never silently fall back to a default."""

    # allow_inf_nan=False: a NaN or infinite hyperparameter is refused here, naming the field, instead of
    # turning every weight into NaN many steps later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    source: str = Field(description="Hub id, local diffusers directory, or cache URI (file:// or s3://).")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype of the frozen weights (VAE, text encoder, base UNet)."
    )
    finetune: Literal["lora", "full"] = "lora"
    _source_has_no_credentials = field_validator("source")(_no_credentials)
    lora_rank: int = Field(4, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0, description="Defaults to lora_rank (scale 1).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1,
        description="Layers that get LoRA adapters; sd3/flux default to Flow-GRPO's attention projections.",
    )
    family: Literal["sd", "sd3", "flux"] = Field(
        "sd", description="sd: SD 1.x/2.x (UNet, DDIM); sd3: SD3/SD3.5; flux: FLUX (rectified-flow transformers)."
    )

    @model_validator(mode="after")
    def _family_lora_targets(self) -> ModelConfig:
        if self.family != "sd" and "lora_target_modules" not in self.model_fields_set:
            self.__dict__["lora_target_modules"] = list(FLOW_LORA_TARGETS)  # no re-validation loop
        return self

    @field_validator("source")
    @classmethod
    def _builtin_source(cls, value: str) -> str:
        """A named source (entry point group `rewardtune.model_sources`; `testbed` = the committed testbed base
        model) becomes what its plugin returns (an absolute directory) here, once."""
        from rewardtune.errors import RewardtuneError
        from rewardtune.plugins import resolve_model_source

        try:
            return resolve_model_source(value)
        except RewardtuneError as err:
            raise ValueError(str(err)) from None


class PromptsConfig(_Strict):
    source: str = Field(
        "simple_animals", description="A built-in prompt set name or a path to a .txt/.jsonl/.csv file."
    )
    template: str = Field("{}", description="Format string applied to every prompt, e.g. 'a photo of a {}'.")
    heldout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of distinct prompts that prepare-prompts holds out for evaluation."
    )
    split_seed: int = Field(0, description="Seed of the train/held-out split (independent of training.seed).")

    @field_validator("template")
    @classmethod
    def _template_has_slot(cls, template: str) -> str:
        if "{}" not in template:  # a field validator, so the error names prompts.template
            raise ValueError("template must contain '{}' where the prompt goes, e.g. 'a photo of a {}'")
        if len(template.strip().splitlines()) > 1:
            raise ValueError("template must be one line: prepare-prompts writes one prompt a line")
        try:
            template.format("prompt")
        except (KeyError, IndexError, ValueError, AttributeError):
            raise ValueError("template may hold only '{}' as a placeholder; write a literal brace as '{{' or '}}'") from None
        return template


class SamplingConfig(_Strict):
    num_steps: int = Field(50, ge=2, le=1000)
    eta: float = Field(1.0, gt=0.0, le=1.0, description="DDIM eta; 0 gives a deterministic step with no density.")
    guidance_scale: float = Field(5.0, ge=1.0)
    batch_size: int = Field(8, ge=1, description="Trajectories sampled per device per batch.")
    batches_per_epoch: int = Field(4, ge=1)
    images_per_prompt: int = Field(
        1, ge=1, description="Images per drawn prompt in a sampling batch (groups for per-prompt statistics)."
    )
    resolution: int = Field(512, ge=8)
    negative_prompt: str = ""
    flow: FlowSamplingConfig | None = Field(
        None, description="The flow SDE of model.family sd3/flux (None there: the defaults); not used by sd."
    )
    reward_workers: int = Field(
        1, ge=0, le=1, description="1: score each batch in a reward thread while the next one samples; 0: inline."
    )

    @model_validator(mode="after")
    def _groups_fill_batches(self) -> SamplingConfig:
        if self.batch_size % self.images_per_prompt:
            raise ValueError(
                f"images_per_prompt={self.images_per_prompt} must divide sampling.batch_size={self.batch_size}"
            )
        return self


# The flow family's sampling (`sampling.flow`) and GRPO's groups (`algorithm.group`), docs/families.md.
class SdeWindowConfig(_Strict):
    start: int = Field(0, ge=0, description="First SDE (trained) step; steps outside the window are ODE steps.")
    size: int = Field(2, ge=1, description="Number of consecutive SDE steps (MixGRPO / Flow-GRPO-Fast).")


class FlowSamplingConfig(_Strict):
    """Sampling of a flow model (SD3/SD3.5, FLUX) with the SDE of `rewardtune.flow_sde`."""

    noise_level: float = Field(0.7, gt=0.0, le=1.0, description="a in g = a sqrt(sigma / (1 - sigma)); Flow-GRPO: 0.7.")
    sde_type: Literal["sde", "cps"] = Field("sde", description="sde: Flow-GRPO's; cps: coefficients-preserving.")
    sde_window: SdeWindowConfig | None = Field(None, description="None: every step but the last is an SDE step.")
    train_last_step: bool = Field(False, description="Also sample/train the last step (to sigma' = 0); not with cps.")
    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 tokens of the prompt encoding.")

    @model_validator(mode="after")
    def _cps_last_step(self) -> FlowSamplingConfig:
        if self.sde_type == "cps" and self.train_last_step:
            raise ValueError("train_last_step with sde_type cps: the last cps step has std 0 and no log-prob; set it false")
        return self

    def stochastic_steps(self, num_steps: int) -> list[bool]:
        """Which of `num_steps` steps are SDE (trainable) steps; a window that does not fit is a ValueError."""
        from rewardtune.flow_sde import sde_steps

        window = None if self.sde_window is None else (self.sde_window.start, self.sde_window.size)
        return sde_steps(num_steps, window, self.train_last_step)


class GroupConfig(_Strict):
    """GRPO: `group_size` images per prompt, advantages normalized within each group."""

    group_size: int = Field(24, ge=2, description="Images per prompt (Flow-GRPO's SD3.5 presets: 24).")
    std: Literal["global", "group"] = Field("global", description="Divide by all rewards' std or the group's own.")
    kl_coef: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="beta of the KL to the base policy in the loss (Flow-GRPO's train.beta; exact Gaussian KL per step, 0: off).",
    )


SamplingConfig.model_rebuild()


class RewardSpec(_Strict):
    name: str
    source: str | None = Field(None, description="Model source (hub id, directory, cache URI) for learned rewards.")
    options: dict[str, Any] = Field(default_factory=dict)
    _source_has_no_credentials = field_validator("source")(_no_credentials)

    @field_validator("options")
    @classmethod
    def _options_have_no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        for value in options.values():
            if isinstance(value, str):
                _no_credentials(value)
        return options

    @field_validator("options")
    @classmethod
    def _options_are_finite(cls, options: dict[str, Any]) -> dict[str, Any]:
        for key, value in options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"option {key} must be a finite number (got {value})")
        return options

    @model_validator(mode="after")
    def _known_name(self) -> RewardSpec:
        from rewardtune.errors import RewardtuneError

        try:
            return self._check_name()
        except RewardtuneError as err:  # a plugin that cannot be imported: the config names it, so say it here
            raise ValueError(str(err)) from None

    def _check_name(self) -> RewardSpec:
        from rewardtune.rewards import reward_names

        names = reward_names()
        if self.name not in names:
            hint = difflib.get_close_matches(self.name, names, n=1)
            maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"unknown reward '{self.name}'{maybe}; allowed: {', '.join(sorted(names))}")
        from rewardtune.rewards import allowed_options, unknown_options

        bad = unknown_options(self.name, self.options)
        if bad:
            allowed = allowed_options(self.name)
            hint = difflib.get_close_matches(bad[0], allowed, n=1)
            maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"reward '{self.name}' has no option '{bad[0]}'{maybe}; allowed: {', '.join(allowed) or 'none'}")
        from rewardtune.rewards import check_options

        check_options(self.name, self.options)
        return self


class StatTrackingConfig(_Strict):
    enabled: bool = True
    buffer_size: int = Field(16, ge=1)
    min_count: int = Field(16, ge=1)


class CriticConfig(_Strict):
    """TDPO's timestep-aware critic (docs/algorithms.md §3)."""

    input: Literal["decoded_latent"] = Field(
        "decoded_latent", description="What the critic sees: the VAE-decoded x_t, embedded by a frozen image tower."
    )
    input_stride: int = Field(
        1,
        ge=1,
        description=(
            "Decode and embed x_t every `input_stride` steps (the first and last always) and interpolate the "
            "embeddings in between; 1 is paper-exact, larger is a measured cheaper deviation."
        ),
    )
    image_encoder: str | None = Field(
        None, description="Source of the frozen image tower (CLIP vision model); None uses the training reward's."
    )
    preprocessing: Literal["float", "clip_processor"] = Field(
        "float",
        description="How a decoded x_t becomes the tower's input: float (torch resize of the float image) or "
        "clip_processor (the official code: quantized to uint8, then CLIPImageProcessor).",
    )
    hidden_sizes: list[int] = Field(default_factory=lambda: [1024, 128, 64, 16], min_length=1)
    dropout: list[float] = Field(default_factory=lambda: [0.2, 0.2, 0.1, 0.0])
    learning_rate: float = Field(1e-4, gt=0)
    value_clip: float = Field(0.2, gt=0)
    coef: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, gt=0, le=1.0)
    reward_clip: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Clip the normalized terminal reward to ±this before the returns and the critic's target; "
        "0 = no clipping (the official clip_range_reward = 0). DDPO clips with training.adv_clip_max instead.",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="kl_penalty_coef of the official code: per-step reward -= kl_coef x controller value x "
        "k(log pi - log pi_ref) against the frozen base policy; 0 = no penalty.",
    )
    kl_estimator: Literal["kl", "abs", "square", "clip", "approx", "js"] = Field(
        "clip", description="k of the KL penalty (official default clip = max(log pi - log pi_ref, 0))."
    )
    kl_init_coef: float = Field(
        0.2, gt=0, allow_inf_nan=False, description="The KL controller's initial value (official init_kl_coef)."
    )
    kl_target: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Target of the adaptive KL controller (mean over samples of the summed per-step log-ratio); "
        "None = a fixed controller.",
    )
    kl_horizon: int = Field(2000, ge=1, description="Horizon of the adaptive KL controller, in samples.")
    advantage_norm: Literal["global", "per_prompt"] = "global"
    fit_passes: int = Field(
        0,
        ge=0,
        description="Extra critic-only passes per epoch over the epoch's cached (critic input, return) pairs, after "
        "the PPO update, on an unclipped squared error (a declared deviation: the official critic trains only "
        "inside the PPO steps); 0 = official. Cheap: the inputs are cached, no UNet call.",
    )
    fit_batch_size: int = Field(128, ge=1, description="(sample, step) pairs per critic-only step of `fit_passes`.")
    hold_value_at_zero: bool = Field(
        False,
        description="Use V = 0 in the advantage A_k = R_k - V(s_k) (the critic still trains): the `tdpo_nocritic` "
        "control, which separates the critic's effect from the time-major loop's extra optimizer steps.",
    )
    flow_state: Literal["x0_hat", "x_t"] = Field(
        "x0_hat",
        description="Flow families: the critic's state is the decoded x0_hat = x_t - sigma v (no extra model call) "
        "or the decoded x_t (paper-literal); sigma is an extra critic input either way. sd: always x_t.",
    )

    @model_validator(mode="after")
    def _dropout_per_layer(self) -> CriticConfig:
        if len(self.dropout) != len(self.hidden_sizes):
            raise ValueError(
                f"dropout has {len(self.dropout)} entries but hidden_sizes has {len(self.hidden_sizes)}; give one per hidden layer"
            )
        if any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ValueError("dropout probabilities must lie in [0, 1)")
        return self


class ResetConfig(_Strict):
    """TDPO-R's periodic reset of active neurons (docs/algorithms.md §4)."""

    every: int = Field(10, ge=1, description="Reset every this many epochs.")
    target: Literal["critic", "policy_lora"] = "critic"
    rule: Literal["active", "overactive", "top_fraction"] = Field(
        "active", description="active: score > tau (TDPO-R); overactive: score > tau_high; top_fraction: top-k%."
    )
    tau: float = Field(0.0, ge=0.0)
    tau_high: float = Field(2.0, gt=0.0)
    fraction: float = Field(0.1, ge=0.0, le=1.0)


class ConstraintConfig(_Strict):
    """One CDPO constraint E[r_k] >= c_k on an auxiliary reward (docs/algorithms.md §5)."""

    reward: RewardSpec
    threshold: float | None = Field(None, description="Absolute c_k.")
    relative_margin: float | None = Field(
        None, ge=0.0, description="c_k = base model's epoch-0 mean minus this margin."
    )
    initial_multiplier: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _one_threshold(self) -> ConstraintConfig:
        if (self.threshold is None) == (self.relative_margin is None):
            raise ValueError(
                f"constraint on '{self.reward.name}' needs exactly one of threshold (absolute) or relative_margin"
            )
        return self


class LagrangeConfig(_Strict):
    learning_rate: float = Field(0.05, gt=0, description="eta_lambda of the projected dual ascent.")
    pid_kp: float = Field(0.0, ge=0)
    pid_kd: float = Field(0.0, ge=0)
    normalize: Literal["none", "base_std"] = Field(
        "none", description="base_std: divide each violation by the base model's epoch-0 std of that reward (scale-free η)."
    )
    scale_floor: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Smallest divisor under normalize: base_std.")


class AlgorithmConfig(_Strict):
    name: Literal["ddpo", "grpo", "tdpo", "tdpo_r", "cdpo"] = "ddpo"
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reset: ResetConfig = Field(default_factory=ResetConfig)
    constraints: list[ConstraintConfig] = Field(default_factory=list)
    lagrange: LagrangeConfig = Field(default_factory=LagrangeConfig)
    group: GroupConfig | None = Field(None, description="GRPO's groups (None with grpo: the defaults).")

    @property
    def uses_critic(self) -> bool:
        return self.name in ("tdpo", "tdpo_r", "cdpo")

    @property
    def uses_reset(self) -> bool:
        return self.name in ("tdpo_r", "cdpo")

    @property
    def loss_kl_coef(self) -> float:
        """GRPO's beta of the KL-to-base term in the loss (TDPO's KL is a per-step reward penalty instead)."""
        return self.group.kl_coef if self.name == "grpo" and self.group is not None else 0.0

    @property
    def uses_reference_policy(self) -> bool:
        return (self.uses_critic and self.critic.kl_coef > 0) or self.loss_kl_coef > 0

    @model_validator(mode="after")
    def _constraints_only_for_cdpo(self) -> AlgorithmConfig:
        if self.name == "cdpo" and not self.constraints:
            raise ValueError("cdpo needs at least one entry in algorithm.constraints")
        names = [c.reward.name for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"algorithm.constraints name a reward twice ({names}); give each auxiliary reward once")
        if self.name != "cdpo" and self.constraints:
            raise ValueError(f"algorithm.constraints are only used by cdpo, not {self.name}; remove them or set name: cdpo")
        if self.group is not None and self.name != "grpo":
            raise ValueError(f"algorithm.group is only used by grpo, not {self.name}; remove it or set name: grpo")
        if self.name == "grpo" and self.group is None:
            self.__dict__["group"] = GroupConfig()
        return self


class TrainingConfig(_Strict):
    epochs: int = Field(100, ge=1)
    inner_epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1, description="Trajectories per training micro-batch.")
    gradient_accumulation_steps: int = Field(
        2, ge=1, description="Micro-batches per optimizer step (times the trained timesteps, as in DDPO)."
    )
    learning_rate: float = Field(3e-4, gt=0)
    lr_warmup_steps: int = Field(
        0, ge=0, description="Optimizer steps over which the policy's rate rises linearly to learning_rate "
        "(rewardtune.lr_schedule); the critic's rate is constant. 0: constant."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    adv_clip_max: float = Field(5.0, gt=0)
    timestep_fraction: float = Field(1.0, gt=0, le=1.0)
    fused_steps: int = Field(
        1, ge=1, description="Micro-steps fused into one UNet call: same loss and optimizer steps, larger batches."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's seed range (accelerate seeds numpy with it).")
    stat_tracking: StatTrackingConfig = Field(default_factory=StatTrackingConfig)


class PerformanceConfig(_Strict):
    """Switches that change speed, never the math: each has an exactness test (tests/test_performance.py)."""

    channels_last: bool = Field(False, description="UNet and VAE weights and activations in channels-last layout.")
    attention: Literal["default", "sdpa", "eager"] = Field(
        "default", description="Attention processor: diffusers' choice, AttnProcessor2_0 (SDPA) or the eager matmuls."
    )
    compile: bool = Field(False, description="torch.compile the UNet forward (the same compiled module samples and trains).")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="torch.compile backend: inductor (generated kernels) or aot_eager (graph capture only)."
    )
    cache_prompt_embeds: bool = Field(True, description="Encode each distinct prompt once per epoch.")
    sync_free_steps: bool = Field(True, description="No host sync inside the sampling and training step loops.")
    overlap_critic_inputs: bool = Field(
        False, description="sd: decode and embed the critic's x_t in the reward thread while the next batch samples."
    )


class CheckpointConfig(_Strict):
    every_epochs: int = Field(1, ge=1)
    keep_last: int = Field(3, ge=1, description="Newest checkpoints kept; reset checkpoints are always kept.")
    termination_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM, finish the epoch and checkpoint only if that fits in this many seconds "
        "(keep it below the pod's terminationGracePeriodSeconds, 30 by default); otherwise stop at once.",
    )
    lock_wait_s: float = Field(
        120.0, ge=0, description="How long train waits for another process (an old pod in its grace) to release --out."
    )


class EvaluationConfig(_Strict):
    """Held-out evaluation (`rewardtune evaluate`): which prompts, how many images, which seeds.

    Every image's noise comes from (seed, prompt, image index) alone, so the same prompt and index
    gives the same initial and per-step noise at every checkpoint and the images are comparable.
    """

    num_heldout_prompts: int = Field(16, ge=1, description="Held-out prompts evaluated (the first N of a seeded shuffle).")
    num_train_prompts: int = Field(8, ge=0, description="Training prompts evaluated beside them (0 for none).")
    images_per_prompt: int = Field(4, ge=1, description="Images per prompt; diversity needs at least 2.")
    seed: int = Field(20240601, ge=0, description="Base of every per-image noise seed (independent of training.seed).")
    batch_size: int = Field(16, ge=1, description="Images generated and scored per batch.")
    image_tower: str | None = Field(
        None,
        description="CLIP vision source for diversity/drift embeddings; None uses the pixel fallback (not CLIP).",
    )
    grid_prompts: int = Field(4, ge=1, description="Held-out prompts shown in the image grids.")


class LoggingConfig(_Strict):
    progress_bars: bool = True
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers (accelerate's) to log to; none by default."
    )
    project: str = Field("rewardtune", min_length=1, description="TensorBoard run name, MLflow experiment, W&B project.")
    sample_grid_images: int = Field(16, ge=0, description="Sampled images per epoch in the trackers' image grid.")

    @field_validator("trackers")
    @classmethod
    def _each_tracker_once(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"a tracker is named twice in {trackers}; name each once")
        return trackers


class RunConfig(_Strict):
    model: ModelConfig
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    reward: RewardSpec
    eval_rewards: list[RewardSpec] = Field(default_factory=list)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _batches_fill_optimizer_steps(self) -> RunConfig:
        per_epoch = self.sampling.batch_size * self.sampling.batches_per_epoch
        per_step = self.training.batch_size * self.training.gradient_accumulation_steps
        if per_epoch % self.training.batch_size:
            raise ValueError(
                f"training.batch_size={self.training.batch_size} must divide the {per_epoch} trajectories per epoch "
                "(sampling.batch_size x sampling.batches_per_epoch)"
            )
        if per_epoch % per_step:
            raise ValueError(
                f"training.batch_size x training.gradient_accumulation_steps = {per_step} must divide the {per_epoch} "
                "trajectories per epoch, or the last optimizer step of an epoch would be partial"
            )
        return self

    @model_validator(mode="after")
    def _family_sections(self) -> RunConfig:
        """sampling.flow belongs to the flow families; GRPO's groups must fill a process's epoch."""
        flow = self.model.family != "sd"
        if self.sampling.flow is not None and not flow:
            raise ValueError("sampling.flow is for model.family sd3 or flux; remove it or set model.family")
        if flow:
            if self.sampling.flow is None:
                self.sampling.__dict__["flow"] = FlowSamplingConfig()
            try:
                self.sampling.flow.stochastic_steps(self.sampling.num_steps)
            except ValueError as err:
                raise ValueError(f"sampling.flow.sde_window: {err}") from None
        group = self.algorithm.group
        per_epoch = self.sampling.batch_size * self.sampling.batches_per_epoch
        if group is not None and per_epoch % group.group_size:
            raise ValueError(
                f"algorithm.group.group_size={group.group_size} must divide the {per_epoch} trajectories a process "
                "samples per epoch (sampling.batch_size x sampling.batches_per_epoch): groups are sampled whole"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at the parent of `loc` (for did-you-mean hints)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError) -> str:
    """One line naming the field path and what is allowed (the first error; the rest are counted)."""
    first = err.errors()[0]
    loc = first["loc"]
    path = _field_path(loc)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
        msg = f"config error at {path}: unknown key{maybe}; allowed keys here: {', '.join(allowed)}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        shown = "" if first["type"] in ("missing", SECRET_ERROR) or isinstance(got, dict) else f" (got {got!r})"
        msg = f"config error at {path}: {text}{shown}"
    more = len(err.errors()) - 1
    return msg + (f" [+{more} more]" if more else "")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


# What PyYAML's constructors raise, besides YAMLError, for explicitly tagged scalars they cannot build
YAML_BUILD_ERRORS = (ValueError, KeyError, AttributeError, TypeError, OverflowError)


class StrictYAMLLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a
    config with two `training:` sections would train with half of what it says (merge keys `<<` may still be
    overridden, as YAML intends)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, what: str, fix: str) -> Any:
    """YAML (safe, duplicate keys refused: `StrictYAMLLoader`) whose every failure is a one-line `ConfigError`.

    PyYAML's constructors raise plain Python errors for explicitly tagged scalars they cannot build
    (`!!timestamp a` raises AttributeError, `!!int a` ValueError, `!!bool x` KeyError), not YAMLError.
    """
    try:
        return yaml.load(text, Loader=StrictYAMLLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} is not valid YAML{where} ({getattr(err, 'problem', None) or err}); {fix}") from None
    except YAML_BUILD_ERRORS as err:
        raise ConfigError(f"{what} is not valid YAML (a tagged value PyYAML cannot build: "
                          f"{type(err).__name__}: {err}); {fix}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars (numbers, bools, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. training.epochs=3)")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override '{item}': the value", "quote it, e.g. key='value'")
        _set_dotted(data, key.strip(), value)
    return data


def parse_config(data: Any, overrides: list[str] | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("config must be a YAML mapping of sections (model, sampling, training, ...)")
    data = apply_overrides(dict(data), overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; every problem becomes a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file (see configs/)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_config(parse_yaml(text, f"config file {path}", "fix the file (see configs/ for examples)"), overrides)
