"""Pretrain the testbed's base model: a tiny Stable-Diffusion-shaped text-to-image model of the world.

Same classes as SD v1.x (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, SD's DDIM
schedule), trained from scratch on CPU in a few minutes: first the VAE (reconstruction + a tiny KL term),
then the UNet and the text encoder together with the standard noise-prediction loss on the VAE latents,
with 10% empty prompts so classifier-free guidance works. Saved with `save_pretrained`, so every stage
loads it exactly like SD v1.5. Seeded: the same seed and thread count give the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rewardtune.safe_paths import apply_umask
from rewardtune.testbed.world import RESOLUTION, WORDS, Spec, render_batch, split_specs
from rewardtune.tiny import _SPECIAL_BOS, _SPECIAL_EOS, bytes_to_unicode, sd_scheduler

log = logging.getLogger(__name__)
SUMMARY_FILE = "testbed_pretrain.json"
LATENT_FACTOR = 4  # 32x32 images, 8x8x4 latents: the UNet is cheap enough to train on a CPU


@dataclass
class PretrainSettings:
    """Sizes and budgets of the pretraining run (defaults: ~5 minutes on 2 CPU cores)."""

    seed: int = 0
    images_per_spec: int = 12
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 5e-3
    unet_steps: int = 560
    unet_batch: int = 64
    unet_lr: float = 2e-3
    uncond_prob: float = 0.1
    eval_images: int = 96
    eval_steps: int = 10
    guidance_scale: float = 4.0
    # Safety caps only (step counts define the schedules, so a run is reproducible): a machine so slow that a
    # cap is hit stops early, with a warning, and stays under ~10 minutes.
    vae_seconds: float = 240.0
    max_seconds: float = 540.0


# ------------------------------------------------------------------------------------------- components
def word_merges(words: tuple[str, ...]) -> list[str]:
    """BPE merges that make every world word a single token (each word's chain built left to right)."""
    merges: list[str] = []
    for word in words:
        symbols = list(word)
        symbols[-1] += "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = f"{current} {nxt}"
            if merge not in merges:
                merges.append(merge)
            current += nxt
    return merges


def build_world_tokenizer(directory: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE vocabulary plus whole-word tokens for the world's words."""
    merges = word_merges(tuple(w for w in WORDS if len(w) > 1))
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [_SPECIAL_BOS, _SPECIAL_EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77, pad_token=_SPECIAL_EOS)


def build_models(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION,
        block_out_channels=(8, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, layers_per_block=1,
        mid_block_add_attention=False,  # flat-color images need no attention; the saved steps buy training
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // LATENT_FACTOR, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )
    return vae, text, unet


def _tokens(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------- training
def train_vae(vae: AutoencoderKL, images: torch.Tensor, s: PretrainSettings, gen: torch.Generator) -> float:
    """Reconstruction (MSE) + 1e-6 KL, as a KL-f2 autoencoder; returns the final reconstruction MSE."""
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    x_all = images * 2 - 1
    loss_val = math.nan
    t_start = time.monotonic()
    for step in range(s.vae_steps):
        idx = torch.randint(len(x_all), (s.vae_batch,), generator=gen)
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = s.vae_lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / s.vae_steps))
        loss_val = mse.item()
        if step % 200 == 0:
            log.info("vae step %d mse %.4f", step, loss_val)
        if time.monotonic() - t_start > s.vae_seconds:
            log.warning("VAE time cap reached at step %d of %d: the result is not the reproducible one", step + 1, s.vae_steps)
            break
    return loss_val


def train_unet(unet: UNet2DConditionModel, text: CLIPTextModel, latents: torch.Tensor, tokens: torch.Tensor,
               empty: torch.Tensor, s: PretrainSettings, gen: torch.Generator, deadline: float) -> tuple[int, float]:
    """The SD noise-prediction loss (epsilon, SD's schedule); returns (steps done, final EMA loss)."""
    sched = sd_scheduler()
    alphas = sched.alphas_cumprod
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=1e-4)
    ema = math.nan
    step = 0
    for step in range(s.unet_steps):
        idx = torch.randint(len(latents), (s.unet_batch,), generator=gen)
        z0 = latents[idx]
        ids = tokens[idx].clone()
        drop = torch.rand(s.unet_batch, generator=gen) < s.uncond_prob
        ids[drop] = empty
        t = torch.randint(0, 1000, (s.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = s.unet_lr * warm * 0.5 * (1 + math.cos(math.pi * (step + 1) / s.unet_steps))
        now = time.monotonic()
        value = loss.item()
        ema = value if math.isnan(ema) else 0.98 * ema + 0.02 * value
        if step % 200 == 0:
            log.info("unet step %d loss %.4f", step, ema)
        if now > deadline:
            log.warning("time cap reached at UNet step %d of %d: the result is not the reproducible one", step + 1, s.unet_steps)
            break
    return step + 1, ema


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sample_images(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, steps: int = 10,
                  guidance: float = 4.0, batch: int = 32) -> torch.Tensor:
    """Images [N,3,32,32] in [0,1] from the pipeline (DDIM, eta 1, as the RL sampler uses)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gen = torch.Generator().manual_seed(seed + start)
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, generator=gen,
                      output_type="pt", height=RESOLUTION, width=RESOLUTION)
        out.append(result.images.float().clamp(0, 1))
    return torch.cat(out)


def fidelity_report(pipe: StableDiffusionPipeline, specs: list[Spec], n: int, seed: int, steps: int,
                    guidance: float) -> dict[str, Any]:
    """Per-attribute accuracy, mean fidelity and all-correct rate of `n` samples of `specs` (cycled)."""
    from rewardtune.testbed.gold import ATTRIBUTES, attribute_checks, gold_aesthetic

    rng = np.random.default_rng(seed)
    chosen = [specs[i] for i in rng.permutation(len(specs))[:n]] if n <= len(specs) else [specs[i % len(specs)] for i in range(n)]
    prompts = [s.prompt for s in chosen]
    images = sample_images(pipe, prompts, seed, steps, guidance).double().numpy()
    checks = [attribute_checks(im, p) for im, p in zip(images, prompts, strict=True)]
    per_attr = {a: float(np.mean([c[a] for c in checks])) for a in ATTRIBUTES}
    return {
        "n": len(prompts),
        "attribute_accuracy": per_attr,
        "fidelity": float(np.mean([np.mean(list(c.values())) for c in checks])),
        "all_correct": float(np.mean([all(c.values()) for c in checks])),
        "gold": float(np.mean([gold_aesthetic(im) for im in images])),
    }


# ------------------------------------------------------------------------------------------- entry point
def pretrain(out: str | Path, settings: PretrainSettings | None = None) -> dict[str, Any]:
    """Train and save the base pipeline to `out` (atomically); returns the summary also written beside it."""
    s = settings or PretrainSettings()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    start = time.monotonic()
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    train_specs, heldout_specs = split_specs(seed=s.seed)
    specs = [sp for sp in train_specs for _ in range(s.images_per_spec)]
    images = torch.from_numpy(render_batch(specs, s.seed))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_world_tokenizer(Path(tmp) / "tok")
    vae, text, unet = build_models(tokenizer)

    t0 = time.monotonic()
    vae_mse = train_vae(vae, images, s, gen)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        dists = [vae.encode(images[i:i + 256] * 2 - 1).latent_dist for i in range(0, len(images), 256)]
        means = torch.cat([d.mean for d in dists])
        stds = torch.cat([d.std for d in dists])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    latents = (means + stds * torch.randn(means.shape, generator=gen)) * scale
    vae_seconds = time.monotonic() - t0
    log.info("VAE: %.1f s, reconstruction MSE %.5f, latent scale %.3f", vae_seconds, vae_mse, scale)

    t0 = time.monotonic()
    tokens = _tokens(tokenizer, [sp.prompt for sp in specs])
    empty = _tokens(tokenizer, [""])[0]
    steps, loss = train_unet(unet, text, latents, tokens, empty, s, gen, start + s.max_seconds)
    unet_seconds = time.monotonic() - t0
    log.info("UNet: %d steps in %.1f s, loss %.4f", steps, unet_seconds, loss)

    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.monotonic()
    evaluation = {
        "train_prompts": fidelity_report(pipe, train_specs, s.eval_images, s.seed + 1, s.eval_steps, s.guidance_scale),
        "heldout_prompts": fidelity_report(pipe, heldout_specs, s.eval_images, s.seed + 2, s.eval_steps, s.guidance_scale),
    }
    summary = {
        "settings": asdict(s),
        "seconds": {"vae": vae_seconds, "unet": unet_seconds, "eval": time.monotonic() - t0,
                    "total": time.monotonic() - start},
        "vae_reconstruction_mse": vae_mse,
        "latent_scaling_factor": scale,
        "unet_steps": steps,
        "unet_final_loss": loss,
        "threads": torch.get_num_threads(),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       (("vae", vae), ("text_encoder", text), ("unet", unet))},
        "evaluation": evaluation,
        "heldout_combinations": [sp.prompt for sp in heldout_specs],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        apply_umask(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
