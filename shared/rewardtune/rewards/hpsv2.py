"""HPSv2 / v2.1 (Wu et al. 2023): upstream open_clip ViT-H-14 with the HPS checkpoint, score = image . text
of L2-normalized features (no logit scale).

Source: a directory / hub repo holding the `{"state_dict": ...}` checkpoint (default xswu/HPSv2, file
HPS_v2.1_compressed.pt; `options.version: "2.0"` picks HPS_v2_compressed.pt, the one the official TDPO
code loads for its reward and critic tower; `options.checkpoint` names any other file). The
architecture is `options.arch` (default ViT-H-14), or `open_clip_model.json` next to the checkpoint
(`{"arch": name, "model_cfg": {...}}`, how tiny stand-ins describe themselves). Loaded with
weights_only=True; the hpsv2 PyPI package is deliberately not used (see field notes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rewardtune.cache import ModelRef, resolve_local
from rewardtune.rewards import register, register_sources, register_tower, register_tower_checkpoint
from rewardtune.rewards.open_clip_files import DEFAULT_CHECKPOINT, chosen_checkpoint, load_open_clip
from rewardtune.rewards.towers import ClipImageTower, open_clip_tower

DEFAULT_SOURCE = "xswu/HPSv2"


class HPSv2:
    name = "hpsv2"

    def __init__(self, model, tokenizer, tower: ClipImageTower) -> None:
        self.model, self.tokenizer, self.tower = model, tokenizer, tower

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self.tower.embed(images)
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.tower.device))
        return (image * F.normalize(text.float(), dim=-1)).sum(-1)


def _ref(spec) -> ModelRef:
    files = spec.options.get("files") or (
        [chosen_checkpoint(spec.options) or DEFAULT_CHECKPOINT] if not spec.source else None
    )
    return ModelRef(spec.source or DEFAULT_SOURCE, spec.options.get("revision"), tuple(files) if files else None)


@register_sources("hpsv2")
def _sources(spec) -> list[ModelRef]:
    return [_ref(spec)]


@register_tower("hpsv2")
def _tower(spec) -> str:
    return spec.source or DEFAULT_SOURCE


@register_tower_checkpoint("hpsv2")
def _tower_checkpoint(spec) -> str | None:
    """The critic's tower is the reward's own checkpoint (v2.0 for the official TDPO presets)."""
    return chosen_checkpoint(spec.options)


@register("hpsv2", options=("revision", "dtype", "files", "checkpoint", "version", "arch"), check=chosen_checkpoint)
def _build(spec, device: torch.device) -> HPSv2:
    dtype = getattr(torch, spec.options.get("dtype", "float32"))
    ref = _ref(spec)
    directory = resolve_local(ref.source, ref.revision, ref.files)
    model, tokenizer = load_open_clip(directory, spec.options, device, dtype)
    return HPSv2(model, tokenizer, open_clip_tower(model, device, dtype))
