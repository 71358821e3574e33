"""Exact rewards of the testbed world, computed by pixel analysis (no model, no training).

Analysis of one image (resized to 32x32 if needed), all colors in [0,1] RGB:

- background b = per-channel median of the 1-pixel border;
- foreground mask M = pixels farther than 0.25 (Euclidean RGB) from b; f = median color inside M;
- area a = |M| / 1024, centroid (x, y) of M, fill = |M| / area of M's bounding box.

`testbed_fidelity` (prompt fidelity) = the share of the prompt's five attributes that the image shows:
background (b's nearest palette background), color (f's nearest palette color), shape (fill nearest to
circle pi/4, square 1, triangle 1/2), size (area nearer, in log ratio, to the prompted shape's small or
large area), position (centroid nearest to the five position centers). Fewer than 4 foreground pixels:
only the background can be right. Non-world prompts score 0.

`testbed_gold` (the "aesthetic" the proxy imitates), in [0,1]:

    gold = clean^3 * (s_contrast + s_center + s_size) / 3
    s_contrast = exp(-((|Y(f) - Y(b)| - 0.5) / 0.25)^2)     Y = 0.299 R + 0.587 G + 0.114 B
    s_center   = exp(-(|centroid - (16,16)| / 10)^2)
    s_size     = exp(-((a - 0.18) / 0.12)^2)
    clean      = share of pixels within 0.2 of b or of f     (flat, two-color images are clean)

Each term has a pleasant range, so pushing any attribute past it (huge shapes, garish contrast, noise)
lowers gold: the off-distribution behaviour a learned proxy does not know about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rewardtune.rewards import register
from rewardtune.testbed.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RESOLUTION,
    SHAPES,
    SIZES,
    SQUARE_HALF,
    parse_prompt,
)

FG_THRESHOLD = 0.25
CLEAN_TOLERANCE = 0.2
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
ATTRIBUTES = ("background", "color", "shape", "size", "position")


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _nearest(value: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    return min(palette, key=lambda k: float(np.sum((value - np.array(palette[k])) ** 2)))


def shape_area(shape: str, size: str) -> float:
    """Expected foreground area (pixels) of a shape at a size word."""
    r = SIZES[size]
    return {"circle": math.pi * r * r, "square": (2 * SQUARE_HALF * r) ** 2, "triangle": 2 * r * r}[shape]


@dataclass
class Analysis:
    background: np.ndarray
    foreground: np.ndarray | None
    area: float  # share of pixels
    centroid: tuple[float, float] | None
    fill: float
    clean: float


def analyze(image: np.ndarray) -> Analysis:
    """Pixel analysis of one [3,32,32] image in [0,1] (see the module docstring)."""
    border = np.concatenate([image[:, 0, :], image[:, -1, :], image[:, 1:-1, 0], image[:, 1:-1, -1]], axis=1)
    bg = np.median(border, axis=1)
    dist = np.sqrt(((image - bg[:, None, None]) ** 2).sum(axis=0))
    mask = dist > FG_THRESHOLD
    count = int(mask.sum())
    near_bg = dist <= CLEAN_TOLERANCE
    if count < 4:
        return Analysis(bg, None, count / mask.size, None, 0.0, float(near_bg.mean()))
    fg = np.median(image[:, mask], axis=1)
    near_fg = np.sqrt(((image - fg[:, None, None]) ** 2).sum(axis=0)) <= CLEAN_TOLERANCE
    ys, xs = np.nonzero(mask)
    bbox = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return Analysis(bg, fg, count / mask.size, centroid, count / bbox, float((near_bg | near_fg).mean()))


def attribute_checks(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """Which of the prompt's attributes the image shows (all False for a non-world prompt)."""
    spec = parse_prompt(prompt)
    if spec is None:
        return dict.fromkeys(ATTRIBUTES, False)
    a = analyze(image)
    checks = dict.fromkeys(ATTRIBUTES, False)
    checks["background"] = _nearest(a.background, BACKGROUNDS) == spec.background
    if a.foreground is None or a.centroid is None:
        return checks
    checks["color"] = _nearest(a.foreground, COLORS) == spec.color
    checks["shape"] = min(SHAPES, key=lambda s: abs(a.fill - FILL[s])) == spec.shape
    pixels = a.area * RESOLUTION * RESOLUTION
    checks["size"] = min(SIZES, key=lambda s: abs(math.log(pixels / shape_area(spec.shape, s)))) == spec.size
    cx, cy = a.centroid
    checks["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2) == spec.position
    return checks


def fidelity(image: np.ndarray, prompt: str) -> float:
    checks = attribute_checks(image, prompt)
    return sum(checks.values()) / len(checks)


def gold_aesthetic(image: np.ndarray) -> float:
    a = analyze(image)
    if a.foreground is None or a.centroid is None:
        return 0.0
    contrast = abs(_luma(a.foreground) - _luma(a.background))
    s_contrast = math.exp(-(((contrast - 0.5) / 0.25) ** 2))
    off = math.hypot(a.centroid[0] - 16.0, a.centroid[1] - 16.0)
    s_center = math.exp(-((off / 10.0) ** 2))
    s_size = math.exp(-(((a.area - 0.18) / 0.12) ** 2))
    return a.clean**3 * (s_contrast + s_center + s_size) / 3.0


def to_world(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] (any size) -> float64 numpy at the world's 32x32."""
    x = images.detach().float().clamp(0, 1)
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x.cpu().double().numpy()


class Gold:
    """The analytic aesthetic: never trained on, so it is the ground truth that reveals proxy hacking."""

    name = "testbed_gold"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([gold_aesthetic(im) for im in to_world(images)], dtype=torch.float32, device=images.device)


class Fidelity:
    """Share of the prompt's attributes present: the testbed's prompt-alignment reward (CLIPScore's role)."""

    name = "testbed_fidelity"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        values = [fidelity(im, p) for im, p in zip(to_world(images), prompts, strict=True)]
        return torch.tensor(values, dtype=torch.float32, device=images.device)


@register("testbed_gold")
def _gold(spec, device):
    return Gold()


@register("testbed_fidelity")
def _fidelity(spec, device):
    return Fidelity()
