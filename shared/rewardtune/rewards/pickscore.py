"""PickScore (Kirstain et al. 2023): transformers CLIPModel, score = logit_scale.exp() * cos(image, text).

Source: a CLIPModel directory / hub id (default yuvalkirstain/PickScore_v1). PickScore_v1 ships no
tokenizer; it is read from the source if present, else from `options.tokenizer_source` (default the
CLIP-ViT-H-14 processor repo, as the official scorer does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardtune.cache import ModelRef, resolve_local, source_kind
from rewardtune.rewards import register, register_sources, register_tower
from rewardtune.rewards.towers import CLIP_FILES, ClipImageTower, tower_from_clip_model
from rewardtune.tokenizer_fit import tokenizer_misfit

DEFAULT_SOURCE = "yuvalkirstain/PickScore_v1"
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TOKENIZER_FILES = ("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "preprocessor_config.json")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()


class ClipTextImage:
    """Image-text cosine similarity of a transformers CLIPModel, mapped to a score by `transform`."""

    def __init__(self, name: str, model, tokenizer, tower: ClipImageTower, mode: str, w: float = 100.0) -> None:
        self.name, self.model, self.tokenizer, self.tower, self.mode, self.w = name, model, tokenizer, tower, mode, w

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self.tower.embed(images)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.tower.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        text = F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        return (image * text).sum(-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = self.cosine(images, prompts)
        if self.mode == "pickscore":
            return self.model.logit_scale.float().exp() * cos
        return self.w * cos.clamp(min=0)


def load_clip_text_image(name: str, spec, default_source: str, default_tokenizer: str, mode: str,
                         device: torch.device, w: float = 100.0) -> ClipTextImage:
    from transformers import AutoTokenizer, CLIPModel

    dtype = getattr(torch, spec.options.get("dtype", "float32"))
    source = spec.source or default_source
    directory = resolve_local(source, spec.options.get("revision"), _files(spec))
    model = CLIPModel.from_pretrained(directory, local_files_only=True).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    tok_dir = directory if _has_tokenizer(directory) else resolve_local(
        spec.options.get("tokenizer_source", default_tokenizer), None, TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    misfit = tokenizer_misfit(tokenizer, model.config.text_config)
    if misfit:
        raise ValueError(f"{misfit} (tokenizer files in {tok_dir} damaged?)")
    return ClipTextImage(name, model, tokenizer, tower_from_clip_model(model, directory, device, dtype), mode, w)


def _files(spec) -> tuple[str, ...] | None:
    files = spec.options.get("files")
    return tuple(files) if files else (CLIP_FILES if not spec.source or source_kind(spec.source) == "hub" else None)


def clip_text_image_refs(spec, default_source: str, default_tokenizer: str) -> list[ModelRef]:
    refs = [ModelRef(spec.source or default_source, spec.options.get("revision"), _files(spec))]
    bundled = spec.source and source_kind(spec.source) == "local" and _has_tokenizer(resolve_local(spec.source))
    if spec.options.get("tokenizer_source") or not bundled:
        refs.append(ModelRef(spec.options.get("tokenizer_source", default_tokenizer), None, TOKENIZER_FILES))
    return refs


@register_sources("pickscore")
def _sources(spec) -> list[ModelRef]:
    return clip_text_image_refs(spec, DEFAULT_SOURCE, DEFAULT_TOKENIZER)


@register_tower("pickscore")
def _tower(spec) -> str:
    return spec.source or DEFAULT_SOURCE


@register("pickscore", options=("revision", "dtype", "files", "tokenizer_source"))
def _build(spec, device: torch.device) -> ClipTextImage:
    return load_clip_text_image("pickscore", spec, DEFAULT_SOURCE, DEFAULT_TOKENIZER, "pickscore", device)
