"""ImageReward (Xu et al. 2023) rebuilt on transformers' BLIP classes.

BLIP ViT-L/16 (BlipVisionModel, layer_norm_eps 1e-6) -> BERT-base with cross-attention (BlipTextModel) ->
[CLS] -> the 5-Linear MLP -> (r - mean) / std with ImageReward's published constants. The official
`ImageReward.pt` is loaded through `map_official_keys` (timm ViT names -> transformers names) with
strict=True; the `image-reward` PyPI package is deliberately not used (it breaks on transformers 5).

Source: a directory / hub repo (default THUDM/ImageReward) with `ImageReward.pt` and `med_config.json`;
optional `vision_config.json` (BlipVisionConfig kwargs; ViT-L/16 at 224 px when absent), `tokenizer/`
(else `options.tokenizer_source`, default bert-base-uncased) and `clip/` (the critic's tower).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rewardtune.cache import ModelRef, resolve_local, source_kind
from rewardtune.errors import RewardError
from rewardtune.rewards import register, register_sources, register_tower
from rewardtune.rewards.aesthetic import RewardMLP
from rewardtune.rewards.towers import CLIP_L14, CLIP_MEAN, CLIP_STD, preprocess

DEFAULT_SOURCE = "THUDM/ImageReward"
DEFAULT_FILES = ("ImageReward.pt", "med_config.json")
DEFAULT_TOKENIZER = "bert-base-uncased"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
VIT_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=16, layer_norm_eps=1e-6)
# Official weights the scorer never uses (BLIP pretraining heads); anything else unmapped is an error.
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.", "blip.text_decoder.", "blip.temp")
_VISION_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _map_vision(key: str) -> str:
    for pattern, repl in _VISION_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise RewardError(f"ImageReward checkpoint: unknown vision key 'blip.visual_encoder.{key}'")


def map_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ImageReward.pt names -> `ImageRewardModel` names (vision./text./mlp.)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES) or key.endswith("position_ids"):
            continue
        if key.startswith("blip.visual_encoder."):
            out["vision." + _map_vision(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out[key] = value
        else:
            raise RewardError(f"ImageReward checkpoint: unexpected key '{key}'")
    return out


def to_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `map_official_keys` (writes tiny stand-ins in the official layout)."""
    inverse = [
        (r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm."),
    ]
    out = {}
    for key, value in state.items():
        if key.startswith("vision."):
            sub = key.removeprefix("vision.")
            for pattern, repl in inverse:
                sub, n = re.subn(pattern, repl, sub)
                if n:
                    break
            out["blip.visual_encoder." + sub] = value
        elif key.startswith("text."):
            out["blip.text_encoder." + key.removeprefix("text.")] = value
        else:
            out[key] = value
    return out


def text_config(med: dict) -> dict:
    """BlipTextConfig kwargs from BLIP's med_config.json (BERT-base + cross-attention)."""
    return dict(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"), encoder_hidden_size=med.get("encoder_width", 768),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, eos_token_id=None,
    )


class ImageRewardModel(nn.Module):
    def __init__(self, vision_kwargs: dict, text_kwargs: dict) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(BlipVisionConfig(**vision_kwargs))
        text_kwargs = {**text_kwargs, "encoder_hidden_size": self.vision.config.hidden_size}
        self.text = BlipTextModel(BlipTextConfig(**text_kwargs), add_pooling_layer=False)
        self.mlp = RewardMLP(self.text.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts)
        return self.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)


def load_imagereward_model(directory: Path) -> ImageRewardModel:
    ckpt, med = directory / "ImageReward.pt", directory / "med_config.json"
    if not ckpt.is_file() or not med.is_file():
        raise RewardError(f"{directory} lacks ImageReward.pt or med_config.json")
    vision_file = directory / "vision_config.json"
    vision = json.loads(vision_file.read_text()) if vision_file.is_file() else VIT_L16
    model = ImageRewardModel(vision, text_config(json.loads(med.read_text())))
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardError(f"cannot read {ckpt} as a weights-only torch file: {str(err).splitlines()[0]}") from None
    model.load_state_dict(map_official_keys(state), strict=True)
    return model


def load_tokenizer(path: Path):
    """bert-base-uncased plus BLIP's [DEC] (bos) and [ENC] tokens, as ImageReward's init_tokenizer."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward:
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.size = model.vision.config.image_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = preprocess(images.to(self.device), self.size, CLIP_MEAN, CLIP_STD, self.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        raw = self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return (raw.float() - MEAN) / STD


def _ref(spec) -> ModelRef:
    files = spec.options.get("files") or (DEFAULT_FILES if not spec.source else None)
    return ModelRef(spec.source or DEFAULT_SOURCE, spec.options.get("revision"), tuple(files) if files else None)


def _bundled(spec, sub: str) -> bool:
    return bool(spec.source) and source_kind(spec.source) in ("local", "cache") and (resolve_local(spec.source) / sub).is_dir()


@register_sources("imagereward")
def _sources(spec) -> list[ModelRef]:
    refs = [_ref(spec)]
    if not _bundled(spec, "tokenizer"):
        refs.append(ModelRef(spec.options.get("tokenizer_source", DEFAULT_TOKENIZER), None, TOKENIZER_FILES))
    return refs


@register_tower("imagereward")
def _tower(spec) -> str:
    if spec.options.get("clip_source"):
        return str(spec.options["clip_source"])
    return spec.source if _bundled(spec, "clip") else CLIP_L14


@register("imagereward", options=("revision", "dtype", "files", "tokenizer_source", "clip_source"))
def _build(spec, device: torch.device) -> ImageReward:
    dtype = getattr(torch, spec.options.get("dtype", "float32"))
    ref = _ref(spec)
    directory = resolve_local(ref.source, ref.revision, ref.files)
    model = load_imagereward_model(directory).to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.mlp.float()  # the head runs in float32 on the [CLS] feature, as upstream's .float()
    tok = directory / "tokenizer" if (directory / "tokenizer").is_dir() else resolve_local(
        spec.options.get("tokenizer_source", DEFAULT_TOKENIZER), None, TOKENIZER_FILES)
    return ImageReward(model, load_tokenizer(tok), device, dtype)

