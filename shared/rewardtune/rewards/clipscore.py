"""CLIPScore: w * max(cos(image, text), 0) with a transformers CLIPModel (default openai/clip-vit-base-patch32,
the CLIPScore paper's backbone).

We use w = 100 by default (the torchmetrics convention, a percentage-like scale); set `options.w: 2.5`
for the CLIPScore paper's scale (Hessel et al. 2021).
"""

from __future__ import annotations

import torch

from rewardtune.cache import ModelRef
from rewardtune.rewards import register, register_sources, register_tower
from rewardtune.rewards.pickscore import ClipTextImage, clip_text_image_refs, load_clip_text_image

DEFAULT_SOURCE = "openai/clip-vit-base-patch32"


@register_sources("clipscore")
def _sources(spec) -> list[ModelRef]:
    return clip_text_image_refs(spec, DEFAULT_SOURCE, DEFAULT_SOURCE)


@register_tower("clipscore")
def _tower(spec) -> str:
    return spec.source or DEFAULT_SOURCE


@register("clipscore", options=("revision", "dtype", "files", "tokenizer_source", "w"))
def _build(spec, device: torch.device) -> ClipTextImage:
    w = float(spec.options.get("w", 100.0))
    return load_clip_text_image("clipscore", spec, DEFAULT_SOURCE, DEFAULT_SOURCE, "clipscore", device, w)
