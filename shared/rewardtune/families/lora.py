"""LoRA on a family's denoiser: add adapters (peft via `add_adapter`), save in the diffusers format, load back."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from safetensors.torch import load_file

from rewardtune.errors import RewardtuneError
from rewardtune.lora_metadata import check_adapter_metadata
from rewardtune.models import LORA_FILE, set_lora_state


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> list[torch.nn.Parameter]:
    """Freeze `model`, add Gaussian-initialized adapters, keep them float32; returns the trainable parameters."""
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    )
    cast_training_params(model, dtype=torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RewardtuneError(f"model.lora_target_modules {targets} matched no layer of the {type(model).__name__}")
    return trainable


def load_lora_state(model: torch.nn.Module, directory: Path, prefix: str) -> None:
    """Load `pytorch_lora_weights.safetensors` (keys `<prefix>.<module>.lora_A.weight`) into the adapters;
    its stored scale must match theirs (`lora_metadata`)."""
    state = {k.removeprefix(f"{prefix}."): v for k, v in load_file(Path(directory) / LORA_FILE).items()}
    set_lora_state(model, state, directory)
    check_adapter_metadata(model, Path(directory) / LORA_FILE, prefix)
