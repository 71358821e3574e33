"""Frozen CLIP image towers: one implementation shared by the aesthetic/PickScore/CLIPScore/HPSv2 rewards
and TDPO's critic (which embeds decoded x_t with the training reward's tower).

Preprocessing is done on the (GPU) tensor — no image ever leaves the device through PIL — in one of two ways:
`float` (torch ops on the float image: shortest-side bicubic resize with antialias, center crop, mean/std
normalization) or `clip_processor`, the official TDPO critic's input: the image quantized to uint8, then
transformers' CLIPImageProcessor (its torchvision backend, batched: uint8 bicubic antialiased resize of the
shortest side, center crop, rescale, CLIP mean/std).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardtune.cache import ModelRef, resolve_local, source_kind
from rewardtune.errors import RewardError
from rewardtune.rewards.open_clip_files import OPEN_CLIP_CONFIG, load_open_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = "openai/clip-vit-large-patch14"
# Only what a PyTorch CLIP needs from a hub repo (the openai repos also hold TF/Flax copies of the weights).
CLIP_FILES = ("*.json", "*.txt", "*.safetensors")
# Hub repos whose tower is not a transformers CLIP: the files to take instead of CLIP_FILES.
HUB_TOWER_FILES = {"xswu/HPSv2": ("HPS_v2.1_compressed.pt",)}


def preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> CLIP input: resize shortest side to `size` (bicubic), center crop, normalize."""
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


PREPROCESSING = ("float", "clip_processor")


@functools.lru_cache(maxsize=8)
def _clip_processor(size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(mean), image_std=list(std))


def clip_processor_preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                              dtype: torch.dtype) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> the official TDPO critic's input: round to uint8, then CLIPImageProcessor
    (openai/clip-vit-large-patch14's settings at `size`: shortest side bicubic, center crop, mean/std)."""
    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    out = _clip_processor(size, tuple(mean), tuple(std))(images=pixels, return_tensors="pt", device=pixels.device)
    return out["pixel_values"].to(dtype)


class ClipImageTower:
    """A frozen image encoder: `embed(images in [0,1]) -> [B, dim]` float32, L2-normalized, no grad."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], dim: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype,
                 module: torch.nn.Module | None = None, preprocessing: str = "float") -> None:
        self._encode, self.dim, self.image_size = encode, dim, image_size
        self.mean, self.std, self.device, self.dtype = mean, std, device, dtype
        self.module = module  # kept so callers can inspect/move it; always eval() and requires_grad False
        self.preprocessing = preprocessing  # one of PREPROCESSING

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's input for images in [0,1], by `self.preprocessing`."""
        if self.preprocessing == "clip_processor":
            return clip_processor_preprocess(images.to(self.device), self.image_size, self.mean, self.std, self.dtype)
        if self.preprocessing != "float":
            raise ValueError(f"unknown tower preprocessing {self.preprocessing!r}; use one of {', '.join(PREPROCESSING)}")
        return preprocess(images.to(self.device), self.image_size, self.mean, self.std, self.dtype)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode(self.pixel_values(images)).float(), dim=-1)


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return module


def hf_preprocess_cfg(directory: Path, image_size: int) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Crop size and normalization from a transformers preprocessor_config.json, CLIP's if there is none."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return image_size, CLIP_MEAN, CLIP_STD
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    return crop, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def tower_from_clip_model(model: torch.nn.Module, directory: Path, device: torch.device, dtype: torch.dtype) -> ClipImageTower:
    """Wrap a loaded transformers CLIPModel's image side (used by PickScore/CLIPScore for their images)."""
    vision = model.config.vision_config
    size, mean, std = hf_preprocess_cfg(directory, vision.image_size)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=x).pooler_output  # transformers 5: an output object

    return ClipImageTower(encode, model.config.projection_dim, size, mean, std, device, dtype, model)


def _hf_tower(directory: Path, device: torch.device, dtype: torch.dtype) -> ClipImageTower:
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type == "clip":  # a full CLIPModel checkpoint (openai/clip-vit-large-patch14, PickScore_v1)
        model = _freeze(CLIPModel.from_pretrained(directory, local_files_only=True), device, dtype)
        return tower_from_clip_model(model, directory, device, dtype)
    model = _freeze(CLIPVisionModelWithProjection.from_pretrained(directory, local_files_only=True), device, dtype)
    size, mean, std = hf_preprocess_cfg(directory, model.config.image_size)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).image_embeds

    return ClipImageTower(encode, model.config.projection_dim, size, mean, std, device, dtype, model)


def open_clip_tower(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> ClipImageTower:
    """Wrap an open_clip model's `encode_image` (HPSv2's ViT-H-14)."""
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple | list) else int(visual.image_size)
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
    return ClipImageTower(model.encode_image, dim, size, mean, std, device, dtype, model)


def find_tower_dir(directory: Path) -> tuple[str, Path]:
    """Which kind of tower a resolved source holds: ('hf', dir) or ('open_clip', dir)."""
    for candidate in (directory / "clip", directory):
        if (candidate / "config.json").is_file():
            return "hf", candidate
    if (directory / OPEN_CLIP_CONFIG).is_file() or any(directory.glob("*.pt")):
        return "open_clip", directory
    raise RewardError(f"{directory} holds no CLIP image tower (no config.json, clip/ subfolder or open_clip checkpoint)")


def tower_ref(source: str, checkpoint: str | None = None) -> ModelRef:
    """The cache entry a tower source needs (hub CLIP repos: only the PyTorch files; `checkpoint`: that file only)."""
    if source_kind(source) != "hub":
        return ModelRef(source, None, None)
    return ModelRef(source, None, (checkpoint,) if checkpoint else HUB_TOWER_FILES.get(source, CLIP_FILES))


def load_clip_image_tower(source: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                          checkpoint: str | None = None, preprocessing: str = "float") -> ClipImageTower:
    """Load a frozen CLIP image tower from a source: hub id, local dir, or cache URI.

    Accepts a transformers CLIP directory (CLIPModel or CLIPVisionModelWithProjection), a reward directory
    bundling one under `clip/` (aesthetic, ImageReward), or an HPSv2 open_clip checkpoint directory
    (`checkpoint` names the file, e.g. HPS_v2_compressed.pt). `preprocessing`: one of PREPROCESSING.
    """
    from rewardtune.errors import RewardtuneError

    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown tower preprocessing {preprocessing!r}; use one of {', '.join(PREPROCESSING)}")
    try:
        tower = _load_tower(source, torch.device(device), dtype, checkpoint)
    except RewardtuneError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged model files fail in many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RewardError(f"image tower {source} could not be loaded ({type(err).__name__}: {first}); check the "
                          "source and its files") from None
    tower.preprocessing = preprocessing
    return tower


def _load_tower(source: str, device: torch.device, dtype: torch.dtype, checkpoint: str | None) -> ClipImageTower:
    ref = tower_ref(source, checkpoint)
    directory = resolve_local(ref.source, ref.revision, ref.files)
    if directory.is_file():
        directory = directory.parent
    from rewardtune.rewards import tower_loader

    plugin = tower_loader(directory)  # a reward plugin's own tower (the testbed proxy's conv features)
    if plugin is not None:
        return plugin(directory, device, dtype)
    kind, where = find_tower_dir(directory)
    if kind == "hf":
        return _hf_tower(where, device, dtype)
    model, _ = load_open_clip(where, {"checkpoint": checkpoint} if checkpoint else {}, device, dtype)
    return open_clip_tower(model, device, dtype)
