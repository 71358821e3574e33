"""Tiny Stable-Diffusion-shaped pipelines, built offline in seconds.

Same classes as SD v1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIMScheduler with SD's betas), saved with `save_pretrained` so tests and the demo load them through
exactly the path users take for the real model. The `sd15` preset has SD v1.5's shapes (and FLOPs)
with random weights, for GPU benchmarks without downloads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rewardtune.safe_paths import apply_umask

_SPECIAL_BOS, _SPECIAL_EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges so that common words become single tokens, as in the real CLIP vocabulary.
_MERGES = ["t h", "th e</w>", "a n", "o n</w>", "i n", "a t</w>", "o f</w>", "r e", "e r</w>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_byte_bpe_vocab(directory: Path) -> None:
    """Write a byte-level CLIP BPE vocabulary (vocab.json + merges.txt) that covers any text."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split()) for m in _MERGES]
    vocab_list += [_SPECIAL_BOS, _SPECIAL_EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")


def build_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Load through `from_pretrained(dir)`: in transformers 5 the vocab_file= constructor ignores the files."""
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_bpe_vocab(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token=_SPECIAL_EOS)


PRESETS: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
            layers_per_block=1,
        ),
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32),
        "resolution": 32,
    },
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            norm_num_groups=32,
            attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
            layers_per_block=2,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768),
        "resolution": 512,
    },
}


def sd_scheduler() -> DDIMScheduler:
    """SD v1.x's DDIM configuration; `set_alpha_to_one=False` keeps the last step's std > 0."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_pipeline(preset: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialized SD-shaped pipeline; deterministic for a given seed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=spec["resolution"], **spec["vae"])
    vae_factor = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(
        sample_size=spec["resolution"] // vae_factor, in_channels=4, out_channels=4, **spec["unet"]
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec["text"],
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def init_tiny(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Build and save a pipeline directory loadable with `from_pretrained(out, local_files_only=True)`."""
    out = Path(out)
    pipe = build_pipeline(preset, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            raise FileExistsError(f"{out} already exists; remove it or choose another --out")
        apply_umask(Path(tmp))  # mkdtemp's 0700 and safetensors' 0600 would hide it from other users
        Path(tmp).rename(out)
        Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds what it expects
    return out
