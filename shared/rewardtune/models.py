"""Loading the policy: a Stable-Diffusion pipeline from a hub id, a local directory or a cache URI,
with the UNet made trainable through LoRA (peft, via `unet.add_adapter`) or fully."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from rewardtune.config import ModelConfig, PerformanceConfig
from rewardtune.errors import CheckpointError, RewardtuneError
from rewardtune.lora_metadata import adapter_metadata, canonicalize_safetensors, check_adapter_metadata
from rewardtune.tokenizer_fit import tokenizer_misfit

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FLOW_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILY_OF_PIPELINE = {"StableDiffusionPipeline": "sd", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
LORA_FILE = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_dir(source: str, revision: str | None = None, family: str = "sd") -> str:
    """A local pipeline directory for `source`, or a hub id for from_pretrained.

    Cache URIs (`s3://bucket/prefix/<key>`, or a cache directory entry holding a manifest) are
    materialized and sha256-verified; with RT_MODEL_CACHE set, hub ids and URLs are read from that cache
    (the cluster's mode: nothing is downloaded at training time). Plain local directories are used as is.
    """
    from rewardtune.cache import CACHE_ENV, resolve_source, source_kind

    kind = source_kind(source)
    if kind == "cache" or (kind in ("hub", "url") and os.environ.get(CACHE_ENV)):
        path = resolve_source(source, revision)
        check_pipeline_dir(path, family)
        return str(path)
    path = Path(source.removeprefix("file://")).expanduser()
    if path.exists():
        check_pipeline_dir(path, family)
        return str(path)
    if source.startswith(("file://", "/", ".")):
        raise RewardtuneError(f"model.source {source} does not exist; build one with `rewardtune init-tiny --out DIR`")
    return source


def check_pipeline_dir(path: Path, family: str = "sd") -> None:
    """Name the missing component (or the other family) instead of letting from_pretrained fail deep inside."""
    index = path / "model_index.json"
    if not index.is_file():
        raise RewardtuneError(f"model directory {path} has no model_index.json; it is not a diffusers pipeline directory")
    try:
        listed = json.loads(index.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        listed = None
    if not isinstance(listed, dict):
        raise RewardtuneError(f"model directory {path}: model_index.json is not a JSON object (damaged); re-save the "
                              "pipeline with save_pretrained")
    found = FAMILY_OF_PIPELINE.get(listed.get("_class_name"))
    if found is not None and found != family:
        raise RewardtuneError(f"model directory {path} holds a {listed['_class_name']} (model.family {found}), "
                              f"not model.family {family}; set model.family: {found}")
    for name in (REQUIRED_COMPONENTS if family == "sd" else FLOW_COMPONENTS):
        if name not in listed or not (path / name).is_dir():
            raise RewardtuneError(
                f"model directory {path} is missing the '{name}' component; re-save the pipeline with save_pretrained"
            )


def load_pipeline(cfg: ModelConfig) -> StableDiffusionPipeline:
    """Load the pipeline; offline (HF_HUB_OFFLINE=1) it only reads local files, as in the cluster."""
    location = resolve_model_dir(cfg.source, cfg.revision)
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # diffusers has no switch of its own; follow the hub's (set by the CLI)
        diffusers_logging.disable_progress_bar()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            location,
            revision=None if Path(location).exists() else cfg.revision,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=offline or Path(location).exists(),
        )
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as any of a dozen types from diffusers/torch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RewardtuneError(f"could not load model.source {cfg.source} ({type(err).__name__}): {first[:200]}; check "
                              "its files or re-save the pipeline with save_pretrained") from None
    misfit = tokenizer_misfit(pipe.tokenizer, pipe.text_encoder.config)
    if misfit:
        raise RewardtuneError(f"model.source {cfg.source}: {misfit} (tokenizer/ missing or damaged?); re-save the "
                              "pipeline with save_pretrained")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def prepare_policy(pipe: StableDiffusionPipeline, cfg: ModelConfig, device: torch.device, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """Freeze what is not trained, add LoRA, cast frozen weights; returns the trainable parameters.

    Trainable parameters stay float32 (master weights) whatever the frozen dtype is.
    """
    dtype = DTYPES[cfg.dtype]
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.requires_grad_(cfg.finetune == "full")
    frozen = [pipe.vae, pipe.text_encoder] + ([pipe.unet] if cfg.finetune == "lora" else [])
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.to(device)
    for module in frozen:
        if dtype != torch.float32:
            module.to(dtype=dtype)
    if cfg.finetune == "lora":
        try:
            pipe.unet.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(cfg.lora_target_modules),
                )
            )
        except ValueError as err:  # peft: no module matched, or one it cannot wrap
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise RewardtuneError(f"model.lora_target_modules {cfg.lora_target_modules}: {first}; use e.g. to_q, to_k, "
                                  "to_v, to_out.0") from None
        cast_training_params(pipe.unet, dtype=torch.float32)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    if not trainable:
        raise RewardtuneError(
            f"model.lora_target_modules {cfg.lora_target_modules} matched no UNet layer; use e.g. to_q, to_k, to_v, to_out.0"
        )
    return trainable


def apply_performance(pipe: StableDiffusionPipeline, perf: PerformanceConfig) -> None:
    """Speed switches that keep the math (config `performance`): memory layout, attention kernel, compilation.

    `Module.compile()` compiles the UNet in place: sampling and training call the same module (so the
    on-policy ratio is computed by the same compiled code), and its state dict keeps its names.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if perf.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if perf.attention != "default":
        processor = AttnProcessor2_0 if perf.attention == "sdpa" else AttnProcessor
        pipe.unet.set_attn_processor(processor())
        pipe.vae.set_attn_processor(processor())
    if perf.compile:
        pipe.unet.compile(backend=perf.compile_backend)


def save_policy(unet: torch.nn.Module, cfg: ModelConfig, directory: Path) -> None:
    """LoRA in the diffusers format with its adapter metadata (`pipe.load_lora_weights(dir)` applies the trained
    alpha / r); a full UNet via save_pretrained."""
    if cfg.finetune == "lora":
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=adapter_metadata(unet))
        canonicalize_safetensors(Path(directory) / LORA_FILE)
    else:
        unet.save_pretrained(directory / "unet", safe_serialization=True)


def load_policy_weights(unet: torch.nn.Module, cfg: ModelConfig, directory: Path) -> None:
    """Checkpoint weights into `unet`; an unreadable or mismatched file is a one-line CheckpointError."""
    try:
        _load_policy_weights(unet, cfg, directory)
    except RewardtuneError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors/diffusers/torch raise many types for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {directory}: the policy weights cannot be loaded ({type(err).__name__}: "
                              f"{first}); use another checkpoint or the config it was trained with") from None


def set_lora_state(model: torch.nn.Module, peft_state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load adapter weights (peft key names) whose shapes match exactly: a checkpoint of another model or
    rank is refused in one line rather than half-loaded."""
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    if {k: v.shape for k, v in peft_state.items()} != expected:
        raise CheckpointError(
            f"checkpoint {directory} holds LoRA weights of another shape (different model or lora_rank); "
            "resume with the config it was trained with, or start a new output directory"
        )
    result = set_peft_model_state_dict(model, peft_state)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {directory} has LoRA keys this model lacks: {result.unexpected_keys[:3]}")


def _load_policy_weights(unet: torch.nn.Module, cfg: ModelConfig, directory: Path) -> None:
    if cfg.finetune == "lora":
        state = load_file(directory / LORA_FILE)
        state = {k.removeprefix("unet."): v for k, v in state.items()}
        set_lora_state(unet, convert_unet_state_dict_to_peft(state), directory)
        check_adapter_metadata(unet, directory / LORA_FILE, "unet")
    else:
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(directory / "unet")
        unet.load_state_dict(loaded.state_dict())
