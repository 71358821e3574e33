"""Rewards that need no model: image brightness and DDPO's JPEG (in)compressibility."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from rewardtune.rewards import register


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] floats in [0,1] -> [B,H,W,3] uint8 (rounded, as PIL would store them)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class Brightness:
    """Mean pixel value in [0,1]: a cheap, exact reward for tests and smoke runs."""

    name = "brightness"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


class JpegSize:
    """DDPO's compressibility reward: -size (or +size) of the JPEG at quality 95, in kB."""

    def __init__(self, name: str, sign: float, quality: int = 95) -> None:
        self.name, self.sign, self.quality = name, sign, quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality).to(images.device)


@register("brightness")
def _brightness(spec, device):
    return Brightness()


@register("jpeg_compressibility", options=("quality",))
def _jpeg_compressibility(spec, device):
    return JpegSize("jpeg_compressibility", -1.0, int(spec.options.get("quality", 95)))


@register("jpeg_incompressibility", options=("quality",))
def _jpeg_incompressibility(spec, device):
    return JpegSize("jpeg_incompressibility", 1.0, int(spec.options.get("quality", 95)))
