"""Tiny stand-ins for every learned reward: the real architecture classes at toy sizes, saved in exactly
the file layout the real loaders read (so tests exercise the real loading code). Built offline in seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from rewardtune.safe_paths import apply_umask

TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
TINY_BLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, layer_norm_eps=1e-6)
_WORDS = ["a", "an", "the", "of", "photo", "cat", "dog", "horse", "in", "on", "with", "and", "painting"]


def save_tiny_clip(directory: Path, seed: int) -> None:
    """A tiny transformers CLIPModel + byte-level CLIP tokenizer (loadable with from_pretrained)."""
    from transformers import CLIPConfig, CLIPModel

    from rewardtune.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, **ids)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=32))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _aesthetic(directory: Path, seed: int) -> None:
    from rewardtune.rewards.aesthetic import HEAD_FILE, RewardMLP

    save_tiny_clip(directory / "clip", seed)
    torch.manual_seed(seed + 1)
    torch.save(RewardMLP(32).state_dict(), directory / HEAD_FILE)  # the official .pth layout


def _hpsv2(directory: Path, seed: int) -> None:
    import open_clip

    from rewardtune.rewards.open_clip_files import DEFAULT_CHECKPOINT, OPEN_CLIP_CONFIG, create_open_clip

    arch = "rt-tiny-ViT-H-14"
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps({"arch": arch, "model_cfg": TINY_OPEN_CLIP}))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / f"{arch}.json"
        cfg.write_text(json.dumps(TINY_OPEN_CLIP))
        open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = create_open_clip(arch)
    torch.save({"state_dict": model.state_dict()}, directory / DEFAULT_CHECKPOINT)  # HPS's released layout


def write_bert_vocab(directory: Path) -> None:
    """A WordPiece vocabulary covering lowercase text (characters + ## pieces + a few words)."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *chars, *("##" + c for c in chars)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))


def _imagereward(directory: Path, seed: int) -> None:
    from rewardtune.rewards.imagereward import ImageRewardModel, load_tokenizer, text_config, to_official_keys

    write_bert_vocab(directory / "tokenizer")
    vocab_size = len(load_tokenizer(directory / "tokenizer"))  # + [DEC], [ENC] as in ImageReward
    med = {"architectures": ["BertModel"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": vocab_size, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "model_type": "bert", "pad_token_id": 0, "add_cross_attention": True,
           "encoder_width": TINY_BLIP_VISION["hidden_size"]}
    (directory / "med_config.json").write_text(json.dumps(med, indent=1))
    (directory / "vision_config.json").write_text(json.dumps(TINY_BLIP_VISION, indent=1))
    torch.manual_seed(seed)
    model = ImageRewardModel(TINY_BLIP_VISION, text_config(med))
    torch.save(to_official_keys(model.state_dict()), directory / "ImageReward.pt")  # official key names
    save_tiny_clip(directory / "clip", seed + 1)  # the critic's CLIP ViT-L/14 stand-in


BUILDERS = {"aesthetic": _aesthetic, "pickscore": save_tiny_clip, "clipscore": save_tiny_clip,
            "hpsv2": _hpsv2, "imagereward": _imagereward}


def init_tiny_rewards(out_dir: str | Path, seed: int = 0, names: list[str] | None = None) -> dict[str, str]:
    """Build one tiny source directory per learned reward under `out_dir`; returns {reward name: source path}.

    Existing complete directories are kept (each is built in a temp dir and renamed into place).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for i, name in enumerate(names or list(BUILDERS)):
        target = out / name
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
            try:
                BUILDERS[name](tmp, seed + 10 * i)
                apply_umask(tmp)  # mkdtemp's 0700 would hide it from other users
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        sources[name] = str(target)
    return sources
