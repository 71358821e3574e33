"""The scale a LoRA file means: diffusers' adapter metadata, saved with every LoRA file and checked on load.

A LoRA file holds only A and B; the update is `scale * B A` with scale = lora_alpha / r (alpha / sqrt(r) with
rsLoRA). Without the adapter config in the file's header, diffusers' `load_lora_weights` rebuilds the adapter
with lora_alpha = r, scale 1.0, so a run trained with alpha != rank would ship at the wrong strength. We store
the peft config the way diffusers' own training scripts do (`save_lora_weights(..., unet_lora_adapter_metadata=
peft_config.to_dict())`) and, loading into an adapter built from the run's config, refuse a file whose stored
scale disagrees; a file from before this (no metadata) loads at the config's scale with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rewardtune.checkpoint import write_bytes_atomic
from rewardtune.errors import CheckpointError

log = logging.getLogger(__name__)

ADAPTER = "default"  # the adapter name peft's add_adapter gives (diffusers' training scripts use the same)


def adapter_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config as a plain dict, for `save_lora_weights(..., <component>_lora_adapter_metadata=)`."""
    return model.peft_config[ADAPTER].to_dict()


def adapter_scale(meta: dict[str, Any]) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA: the factor peft multiplies B A by."""
    rank = float(meta["r"])
    return float(meta["lora_alpha"]) / (math.sqrt(rank) if meta.get("use_rslora") else rank)


def read_adapter_metadata(file: Path, prefix: str) -> dict[str, Any] | None:
    """The `<prefix>.*` adapter metadata diffusers wrote into `file`'s safetensors header; None when it has none."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{file}: its LoRA adapter metadata is not JSON (damaged header); use another "
                              "checkpoint") from None
    if not isinstance(packed, dict):
        raise CheckpointError(f"{file}: its LoRA adapter metadata is not a JSON object; use another checkpoint")
    meta = {k.removeprefix(f"{prefix}."): v for k, v in packed.items() if k.startswith(f"{prefix}.")}
    return meta or None


def check_adapter_metadata(model: torch.nn.Module, file: Path, prefix: str) -> None:
    """Refuse a LoRA file whose stored scale differs from `model`'s adapter; warn when the file stores none."""
    have = adapter_metadata(model)
    found = read_adapter_metadata(Path(file), prefix)
    if found is None:
        log.warning("%s has no LoRA adapter metadata (written before rewardtune stored it): loaded at the config's "
                    "lora_alpha %g / lora_rank %d = scale %g; diffusers' load_lora_weights would apply scale 1.0 to "
                    "this file, so ship it with `rewardtune export` (which writes the scale into the file)",
                    file, have["lora_alpha"], have["r"], adapter_scale(have))
        return
    try:
        stored = adapter_scale(found)
        differs = (float(found["r"]) != float(have["r"]) or float(found["lora_alpha"]) != float(have["lora_alpha"])
                   or bool(found.get("use_rslora")) != bool(have.get("use_rslora")))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"{file}: its LoRA adapter metadata lacks a usable r/lora_alpha (damaged header); use "
                              "another checkpoint") from None
    if differs:
        raise CheckpointError(
            f"{file} was saved with LoRA r={found.get('r')}, lora_alpha={found.get('lora_alpha')}, use_rslora="
            f"{bool(found.get('use_rslora'))} (scale {stored:g}); this config has r={have['r']}, lora_alpha="
            f"{have['lora_alpha']} (scale {adapter_scale(have):g}); set model.lora_rank/lora_alpha as trained"
        )


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, in place and atomically.

    Why: safetensors 0.8 serializes the metadata map in a random order per save (a Rust HashMap), so a file
    with two metadata keys, as every LoRA file with adapter metadata has (`format`, `lora_adapter_metadata`),
    came out as one of two byte strings for the same tensors: two identical runs or exports had different
    sha256 digests. Only the key order changes: the header keeps its length (space padding, as safetensors
    pads it) and every tensor offset, and a header that would not round-trip is left as it was.
    """
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + size]
    header = json.loads(raw, object_pairs_hook=dict)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or len(meta) < 2 or list(meta) == sorted(meta):
        return
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size or json.loads(text) != json.loads(raw):
        return
    write_bytes_atomic(path, data[:8] + text + b" " * (size - len(text)) + data[8 + size :])
