"""The testbed world: deterministic 32x32 RGB images of one flat shape on a flat background.

A prompt names five attributes, "a {size} {color} {shape} on a {background} background, {position}";
`render` draws it (4x supersampled, so edges are anti-aliased like a decoded image) with small seeded
jitter of position, radius and colors, so one prompt has many images. Every prompt combination is in
`all_specs()`; `split_specs` holds a seeded share of the combinations out of pretraining, with every
single attribute value still present in the training side (so held-out prompts are new *combinations*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.27, 0.86),
    "yellow": (0.92, 0.82, 0.16),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.06),
    "white": (0.94, 0.94, 0.94),
    "gray": (0.50, 0.50, 0.50),
}
SIZES: dict[str, float] = {"small": 4.5, "large": 8.0}  # radius in pixels
OFFSET = 7.0
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the shape's center, y grows downwards
    "center": (16.0, 16.0),
    "top left": (16.0 - OFFSET, 16.0 - OFFSET),
    "top right": (16.0 + OFFSET, 16.0 - OFFSET),
    "bottom left": (16.0 - OFFSET, 16.0 + OFFSET),
    "bottom right": (16.0 + OFFSET, 16.0 + OFFSET),
}
SQUARE_HALF = 0.85  # a square's half side as a share of the radius (areas of circle and square stay close)
WORDS = ("a", "on", "background", ",", *SHAPES, *COLORS, *BACKGROUNDS, *SIZES, "center", "top", "bottom", "left", "right")
_PROMPT_RE = re.compile(r"^a (\w+) (\w+) (\w+) on a (\w+) background, ([\w ]+)$")


@dataclass(frozen=True, order=True)
class Spec:
    """One prompt combination."""

    size: str
    color: str
    shape: str
    background: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background, {self.position}"


def parse_prompt(prompt: str) -> Spec | None:
    """The Spec a world prompt names, or None for text that is not a world prompt."""
    match = _PROMPT_RE.match(prompt.strip().lower())
    if not match:
        return None
    size, color, shape, background, position = match.groups()
    if size not in SIZES or color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        return None
    if position not in POSITIONS:
        return None
    return Spec(size, color, shape, background, position)


def all_specs() -> list[Spec]:
    """Every combination, in a fixed order."""
    return [
        Spec(size, color, shape, bg, pos)
        for shape in SHAPES for color in COLORS for bg in BACKGROUNDS for size in SIZES for pos in POSITIONS
    ]


def split_specs(heldout_fraction: float = 0.15, seed: int = 0) -> tuple[list[Spec], list[Spec]]:
    """(train, held-out) combinations; a combination is only held out if all its values stay in train."""
    specs = all_specs()
    order = np.random.default_rng(seed).permutation(len(specs))
    target = round(heldout_fraction * len(specs))
    held: set[Spec] = set()
    for i in order:
        if len(held) >= target:
            break
        candidate = specs[i]
        rest = [s for s in specs if s not in held and s != candidate]
        covered = all(any(getattr(s, f) == getattr(candidate, f) for s in rest) for f in Spec.__dataclass_fields__)
        if covered:
            held.add(candidate)
    train = [s for s in specs if s not in held]
    return train, sorted(held, key=specs.index)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = RESOLUTION, supersample: int = 4) -> np.ndarray:
    """Coverage in [0,1] of each pixel by the shape (supersampled, so edges are anti-aliased)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        half = SQUARE_HALF * radius
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":  # apex up; the base is the bottom edge
        top, bottom = cy - radius, cy + radius
        frac = np.clip((y - top) / (bottom - top), 0, 1)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(spec: Spec, seed: int, jitter: bool = True, radius_scale: float = 1.0,
           shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The image [3, 32, 32] float32 in [0,1] of `spec`; the same (spec, seed) always gives the same image.

    `radius_scale` and `shift` (pixels) push size and position off the world's values (the proxy probes)."""
    rng = np.random.default_rng([seed, *map(ord, spec.prompt)])
    cx, cy = POSITIONS[spec.position]
    cx, cy = cx + shift[0], cy + shift[1]
    radius = SIZES[spec.size] * radius_scale
    fg, bg = np.array(COLORS[spec.color]), np.array(BACKGROUNDS[spec.background])
    if jitter:
        cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
        radius *= rng.uniform(0.9, 1.1)
        fg = np.clip(fg + rng.uniform(-0.05, 0.05, 3), 0, 1)
        bg = np.clip(bg + rng.uniform(-0.04, 0.04, 3), 0, 1)
    cover = shape_mask(spec.shape, cx, cy, radius)[None]
    image = cover * fg[:, None, None] + (1 - cover) * bg[:, None, None]
    return image.astype(np.float32)


def render_batch(specs: list[Spec], seed: int, jitter: bool = True) -> np.ndarray:
    """[N,3,32,32]; image i uses seed (seed, i) so a batch is reproducible as a whole."""
    return np.stack([render(s, seed * 1_000_003 + i, jitter) for i, s in enumerate(specs)])
