"""Build the whole testbed: the base model (pretrain) and then its proxy reward (fitted to its samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardtune.testbed.pretrain import PretrainSettings, pretrain

QUICK = PretrainSettings(images_per_spec=1, vae_steps=3, unet_steps=3, vae_batch=8, unet_batch=8, eval_images=8)


def build_testbed(out: str | Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """OUT/model and OUT/proxy; `quick` only exercises the code path (the model learns nothing)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from rewardtune.testbed.assets import model_dir, proxy_dir
    from rewardtune.testbed.proxy import build_proxy

    out = Path(out)
    settings = PretrainSettings(**{**QUICK.__dict__, "seed": seed}) if quick else PretrainSettings(seed=seed)
    summary = {"model": pretrain(model_dir(out), settings)}
    pipe = StableDiffusionPipeline.from_pretrained(model_dir(out), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw: dict[str, Any] = dict(num_samples=16, num_renders=8, eval_samples=16, epochs=2) if quick else {}
    summary["proxy"] = build_proxy(pipe, proxy_dir(out), seed=seed, **kw)
    summary["model"].pop("heldout_combinations", None)
    return summary
