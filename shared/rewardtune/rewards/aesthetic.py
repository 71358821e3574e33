"""LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding (L2-normalized) -> 5-Linear MLP.

Source layout: a directory (or cache entry) holding the head (`sac+logos+ava1-l14-linearMSE.pth`, or any
`.pth`/`.safetensors` with keys layers.0/2/4/6/7) and optionally the CLIP tower under `clip/`; otherwise
the tower comes from `options.clip_source` (default openai/clip-vit-large-patch14). The default source
is the official head file on GitHub.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rewardtune.cache import ModelRef, resolve_local, source_kind
from rewardtune.errors import RewardError
from rewardtune.rewards import register, register_sources, register_tower
from rewardtune.rewards.towers import CLIP_L14, ClipImageTower, load_clip_image_tower, tower_ref

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_SOURCE = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"


class RewardMLP(nn.Module):
    """The aesthetic predictor's head (also ImageReward's and TDPO's critic): no nonlinearity, as upstream."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file — never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardError(f"cannot read {path} as a weights-only torch file: {str(err).splitlines()[0]}") from None


def find_head(directory: Path) -> Path:
    if directory.is_file():
        return directory
    candidates = [directory / HEAD_FILE, *sorted(directory.glob("*.safetensors")), *sorted(directory.glob("*.pth"))]
    for path in candidates:
        if path.is_file():
            return path
    raise RewardError(f"no aesthetic head ({HEAD_FILE} or *.safetensors) in {directory}")


def load_head(path: Path, device: torch.device) -> RewardMLP:
    state = load_state(path)
    if "layers.0.weight" not in state:
        raise RewardError(f"{path} is not an aesthetic-predictor head (no layers.0.weight; keys {sorted(state)[:4]})")
    head = RewardMLP(state["layers.0.weight"].shape[1])
    head.load_state_dict(state, strict=True)
    return head.to(device).eval().requires_grad_(False)


class Aesthetic:
    name = "aesthetic"

    def __init__(self, tower: ClipImageTower, head: RewardMLP) -> None:
        if tower.dim != head.layers[0].in_features:
            raise RewardError(f"aesthetic head expects {head.layers[0].in_features}-d embeddings, tower gives {tower.dim}")
        self.tower, self.head = tower, head

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.tower.embed(images)).squeeze(-1)


def clip_source(spec) -> str:
    """The tower: options.clip_source, else a `clip/` folder bundled with a local source, else ViT-L/14."""
    if spec.options.get("clip_source"):
        return str(spec.options["clip_source"])
    source = spec.source or DEFAULT_SOURCE
    if source_kind(source) in ("local", "cache"):
        directory = resolve_local(source)
        if (directory / "clip").is_dir():
            return source
    return CLIP_L14


@register_sources("aesthetic")
def _sources(spec) -> list[ModelRef]:
    refs = [ModelRef(spec.source or DEFAULT_SOURCE, spec.options.get("revision"))]
    tower = clip_source(spec)
    if tower != refs[0].source:
        refs.append(tower_ref(tower))
    return refs


@register("aesthetic", options=("clip_source", "revision", "dtype"))
def _build(spec, device: torch.device) -> Aesthetic:
    dtype = getattr(torch, spec.options.get("dtype", "float32"))
    head = load_head(find_head(resolve_local(spec.source or DEFAULT_SOURCE, spec.options.get("revision"))), device)
    return Aesthetic(load_clip_image_tower(clip_source(spec), device, dtype), head)


@register_tower("aesthetic")
def _tower(spec) -> str:
    return clip_source(spec)
