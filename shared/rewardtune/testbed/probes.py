"""Measurements of the overoptimization benchmark that need the model: path KL of a checkpoint from the base
model, best-of-n with the proxy on base samples, and the proxy's error table on perturbed world renders.

The arithmetic lives in `rewardtune.testbed.stats`; this module only produces the arrays it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardtune.config import RunConfig
from rewardtune.testbed.stats import best_of_n, best_of_n_kl, path_kl

PATH_KL_SEED_OFFSET = 7  # path-KL noise is independent of the evaluation images' noise
BON_SEED_OFFSET = 11


def _evaluator(cfg: RunConfig, run_dir: Path, prompts_dir: Path, prompts: int, images: int, seed_offset: int):
    from rewardtune.evaluate import Evaluator, PixelEmbedder

    data = cfg.model_dump(mode="json")
    data["evaluation"] |= {"num_heldout_prompts": prompts, "num_train_prompts": 0, "images_per_prompt": images,
                           "seed": cfg.evaluation.seed + seed_offset}
    return Evaluator(RunConfig.model_validate(data), run_dir, prompts_dir, embedder=PixelEmbedder())


@torch.no_grad()
def checkpoint_path_kl(cfg: RunConfig, run_dir: Path, prompts_dir: Path, checkpoints: list[str], prompts: int,
                       images: int) -> dict[str, float]:
    """Mean over a fixed subset of Σ_t ‖μ_θ − μ_base‖² / 2σ_t², sampling from the policy and evaluating the
    base mean at the same x_t (LoRA: adapters off; full fine-tune: a frozen copy of the base UNet, taken
    before any checkpoint is loaded); base itself is 0 by definition.

    Summed over latent dimensions (not averaged, unlike the PPO log-probs), so it is the chain's KL; the
    steps with the smallest σ_t dominate it (on a 4-epoch LoRA pilot, the 9th of 10 steps gave 90%)."""
    import copy

    from diffusers.utils.torch_utils import randn_tensor

    from rewardtune.diffusion import ddim_posterior, encode_prompts, guided_noise_pred
    from rewardtune.evaluate import BASE

    ev = _evaluator(cfg, run_dir, prompts_dir, prompts, images, PATH_KL_SEED_OFFSET)
    unet, s = ev.pipe.unet, cfg.sampling
    lora = cfg.model.finetune == "lora"
    base_unet = None if lora else copy.deepcopy(unet).eval()  # the evaluator has loaded no checkpoint yet
    scheduler = ev.pipe.scheduler
    vae_factor = 2 ** (len(ev.pipe.vae.config.block_out_channels) - 1)
    items = ev.items
    embeds = encode_prompts(ev.pipe.tokenizer, ev.pipe.text_encoder, [it.prompt for it in items])
    negative = ev.negative.expand(len(items), -1, -1)
    out: dict[str, float] = {}
    for name in checkpoints:
        if name == BASE:
            out[name] = 0.0
            continue
        ev.load(name)
        generators = [torch.Generator().manual_seed(it.seed) for it in items]
        scheduler.set_timesteps(s.num_steps, device=ev.device)
        shape = (len(items), unet.config.in_channels, s.resolution // vae_factor, s.resolution // vae_factor)
        latents = randn_tensor(shape, generator=generators, device=ev.device, dtype=torch.float32) * scheduler.init_noise_sigma
        mean_p, mean_b, stds = [], [], []
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(latents, t)
            if lora:
                unet.enable_adapters()
                eps_p = guided_noise_pred(unet, x_in, t, embeds, negative, s.guidance_scale)
                unet.disable_adapters()
                eps_b = guided_noise_pred(unet, x_in, t, embeds, negative, s.guidance_scale)
                unet.enable_adapters()
            else:
                eps_p = guided_noise_pred(unet, x_in, t, embeds, negative, s.guidance_scale)
                eps_b = guided_noise_pred(base_unet, x_in, t, embeds, negative, s.guidance_scale)
            mu_p, std = ddim_posterior(scheduler, eps_p, t, latents, s.eta)
            mu_b, _ = ddim_posterior(scheduler, eps_b, t, latents, s.eta)
            mean_p.append(mu_p.cpu().numpy())
            mean_b.append(mu_b.cpu().numpy())
            stds.append(std.reshape(len(items), -1)[:, 0].cpu().numpy())
            noise = randn_tensor(mu_p.shape, generator=generators, device=ev.device, dtype=mu_p.dtype)
            latents = mu_p + std * noise
        kl = path_kl(np.stack(mean_p, 1), np.stack(mean_b, 1), np.stack(stds, 1))
        out[name] = float(kl.mean())
    return out


@torch.no_grad()
def best_of_n_table(cfg: RunConfig, run_dir: Path, prompts_dir: Path, prompts: int, max_n: int) -> list[dict[str, Any]]:
    """Best-of-n by the proxy on base-model samples (max_n per held-out prompt): proxy and gold of the pick
    for n = 1..max_n, with the analytic KL log n − (n−1)/n of best-of-n from the base."""
    from rewardtune.testbed.compare import GOLD, PROXY

    ev = _evaluator(cfg, run_dir, prompts_dir, prompts, max_n, BON_SEED_OFFSET)
    _, scores, _, _ = ev.generate()
    rows = len(ev.prompts["heldout"])
    proxy = scores[PROXY].numpy().reshape(rows, max_n)
    gold = scores[GOLD].numpy().reshape(rows, max_n)
    base_proxy, base_gold = float(proxy.mean()), float(gold.mean())
    table = []
    for n in range(1, max_n + 1):
        p, g = best_of_n(proxy, gold, n)
        table.append({"n": n, "kl": best_of_n_kl(n), "proxy_gain": p - base_proxy, "gold_gain": g - base_gold})
    return table


PERTURBATIONS: list[tuple[str, str, float]] = [
    ("noise", "pixel noise σ = 0.05", 0.05), ("noise", "pixel noise σ = 0.10", 0.10),
    ("noise", "pixel noise σ = 0.15", 0.15),
    ("size", "shape radius × 0.6", 0.6), ("size", "shape radius × 1.6", 1.6), ("size", "shape radius × 2.2", 2.2),
    ("contrast", "contrast × 0.5", 0.5), ("contrast", "contrast × 1.5", 1.5),
    ("position", "shifted 4 px right", 4.0), ("position", "shifted 8 px right", 8.0),
]


def perturbed(spec: Any, seed: int, kind: str, amount: float) -> np.ndarray:
    """A world render of `spec` with one attribute pushed off the pretraining distribution."""
    from rewardtune.testbed.world import render

    if kind == "size":
        return render(spec, seed, radius_scale=amount)
    if kind == "position":
        return render(spec, seed, shift=(amount, 0.0))
    image = render(spec, seed)
    if kind == "noise":
        rng = np.random.default_rng([seed, 17])
        return np.clip(image + amount * rng.standard_normal(image.shape), 0, 1).astype(np.float32)
    if kind == "contrast":
        return np.clip(0.5 + amount * (image - 0.5), 0, 1).astype(np.float32)
    raise ValueError(f"unknown perturbation {kind!r}")


@torch.no_grad()
def probe_table(proxy_source: str | None, renders: int) -> list[dict[str, Any]]:
    """Mean change of proxy and gold under each perturbation of held-out world renders, and how often the
    proxy moves in the same direction as gold (its error structure, documented before any training)."""
    from rewardtune.testbed.gold import gold_aesthetic
    from rewardtune.testbed.proxy import Proxy, default_source, load_proxy
    from rewardtune.testbed.world import render, split_specs

    proxy = Proxy(load_proxy(proxy_source or default_source()))
    _, heldout = split_specs()
    cases = [(spec, 1000 + r) for spec in heldout for r in range(renders)]

    def score(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.stack(images))
        return proxy(batch, [""] * len(images)).numpy(), np.array([gold_aesthetic(im.astype(np.float64)) for im in images])

    base_p, base_g = score([render(spec, seed) for spec, seed in cases])
    rows = []
    for kind, label, amount in PERTURBATIONS:
        p, g = score([perturbed(spec, seed, kind, amount) for spec, seed in cases])
        dp, dg = p - base_p, g - base_g
        rows.append({"kind": kind, "perturbation": label, "proxy_change": float(dp.mean()), "gold_change": float(dg.mean()),
                     "same_sign": float(np.mean(np.sign(dp) == np.sign(dg))), "images": len(cases)})
    return rows
