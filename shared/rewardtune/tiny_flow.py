"""Tiny SD3- and FLUX-shaped pipelines (rectified-flow transformers), built offline in about a second.

Same classes as the real models (SD3Transformer2DModel / FluxTransformer2DModel, a 16-channel
AutoencoderKL with shift and scaling factors, CLIP encoders, a T5 encoder, FlowMatchEulerDiscreteScheduler),
saved with `save_pretrained`, so tests load them through `StableDiffusion3Pipeline.from_pretrained(dir)` /
`FluxPipeline.from_pretrained(dir)` exactly as users load the real ones. The T5 tokenizer is an in-memory
unigram vocabulary (`T5Tokenizer(vocab=..., extra_ids=0)`): no sentencepiece model, no download.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from rewardtune.tiny import build_tokenizer

FAMILIES = ("sd3", "flux")
_T5_DIM = 32
_CLIP_DIM = 16  # hidden size of each tiny CLIP; SD3 concatenates two of them (<= T5 dim, padded up to it)
RESOLUTION = 32  # pixels; latents 8x8 with the 4x VAE below


def build_t5_tokenizer(max_length: int = 32) -> T5Tokenizer:
    """A unigram T5 tokenizer over letters, digits and a few words; covers any ASCII text (rest -> <unk>)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = ["▁a", "▁the", "▁of", "▁photo", "▁cat", "▁dog"]
    pieces += [(w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "▁" + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=_T5_DIM, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _clip_config(tokenizer, projection_dim: int) -> CLIPTextConfig:
    # >= 2 layers: SD3 reads hidden_states[-2]
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_CLIP_DIM, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, projection_dim=projection_dim, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, layers_per_block=1, sample_size=RESOLUTION,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3/SD3.5-shaped: joint transformer over [CLIP-L ++ CLIP-G padded to T5 ; T5] tokens, pooled CLIP input."""
    torch.manual_seed(seed)
    clip_tok = build_tokenizer()
    t5_tok = build_t5_tokenizer()
    heads, head_dim = 2, 16
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 4, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=_T5_DIM,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * _CLIP_DIM, pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_tok, _CLIP_DIM)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tok, _CLIP_DIM)),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_t5(t5_tok),
        tokenizer_3=t5_tok,
    )


# SD3.5-Medium's architecture (stabilityai/stable-diffusion-3.5-medium: MMDiT-X, 24 blocks, dual attention in
# blocks 0-12, QK RMS-norm; CLIP-L, CLIP-G and T5-XXL encoders; SD3's 16-channel VAE), random weights: for
# timing on a GPU (`benchmarks/rl_epoch.py --preset sd35m`), never for images.
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
SD35M_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
SD35M_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu")
SD35M_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    projection_dim=1280, hidden_act="gelu")
SD35M_T5 = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", dropout_rate=0.0)


def build_sd35m(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3.5-Medium-shaped pipeline with random weights (2.24B transformer, 4.76B T5): build it under
    `torch.device("cuda")` to time it, or `torch.device("meta")` to check its shapes."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_tokenizer(), build_t5_tokenizer(max_length=512)

    def clip(shape: dict) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, **shape))

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**SD35M_VAE),
        text_encoder=clip(SD35M_CLIP_L),
        tokenizer=clip_tok,
        text_encoder_2=clip(SD35M_CLIP_G),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=T5EncoderModel(T5Config(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                                               decoder_start_token_id=t5_tok.pad_token_id, **SD35M_T5)),
        tokenizer_3=t5_tok,
    )


def build_flux(seed: int = 0) -> FluxPipeline:
    """FLUX.1-shaped: packed 2x2 latents, rotary axes summing to the head dim, distilled guidance input."""
    torch.manual_seed(seed)
    clip_tok = build_tokenizer()
    t5_tok = build_t5_tokenizer()
    heads, head_dim = 2, 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=_T5_DIM, pooled_projection_dim=_CLIP_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_clip_config(clip_tok, _CLIP_DIM)),
        tokenizer=clip_tok,
        text_encoder_2=_t5(t5_tok),
        tokenizer_2=t5_tok,
    )


def build_flow_pipeline(family: str, seed: int = 0):
    if family not in FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; choose one of {', '.join(FAMILIES)}")
    return build_sd3(seed) if family == "sd3" else build_flux(seed)


def init_tiny_flow(out: str | Path, family: str, seed: int = 0, preset: str = "tiny", device: str = "cpu") -> Path:
    """Build and save a flow pipeline directory; written to a temporary directory and renamed into place.

    `preset` sd35m (family sd3 only) builds SD3.5-Medium's shapes on `device` and saves them in bfloat16.
    """
    out = Path(out)
    if preset == "sd35m":
        if family != "sd3":
            raise ValueError(f"preset sd35m is an SD3.5 model: family must be sd3, not {family!r}")
        with torch.device(device):
            pipe = build_sd35m(seed).to(dtype=torch.bfloat16)
    elif preset == "tiny":
        pipe = build_flow_pipeline(family, seed)
    else:
        raise ValueError(f"unknown flow preset {preset!r}; choose tiny or sd35m")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            raise FileExistsError(f"{out} already exists; remove it or choose another --out")
        Path(tmp).rename(out)
        Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds what it expects
    return out
