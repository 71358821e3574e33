"""How much the official critic-input preprocessing changes the critic's state (the image embedding).

The critic sees every decoded x_t of a trajectory. `float` resizes the float image with torch ops;
`clip_processor` (the official TDPO code) quantizes it to uint8 first and runs CLIPImageProcessor. This
samples testbed-model trajectories (the committed tiny text-to-image model of the testbed world), decodes
x_t at every step, embeds each image with both paths and prints the cosine similarity per tower: the
testbed proxy's tower and the tiny stand-ins of the CLIP ViT-L/14 (aesthetic) and HPSv2 ViT-H-14 towers.
At resolution 32 the towers' own size (32) needs no resize (quantization only); at 64 both paths resize.

    python benchmarks/critic_preprocessing.py                  # resolutions 32 and 64, 16 trajectories each
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from rewardtune.config import RewardSpec, load_config
from rewardtune.diffusion import decode_latents, encode_prompts, sample_trajectories
from rewardtune.models import load_pipeline
from rewardtune.prompts import load_prompts
from rewardtune.rewards import critic_tower_source
from rewardtune.rewards.tiny import init_tiny_rewards
from rewardtune.rewards.towers import load_clip_image_tower


@torch.no_grad()
def decoded_states(resolution: int, n: int, steps: int, seed: int) -> torch.Tensor:
    """[n * steps, 3, r, r]: the decoded x_t before every step of n testbed trajectories."""
    cfg = load_config("configs/testbed.yaml")
    pipe = load_pipeline(cfg.model)
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.template)[:n]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand(n, -1, -1)
    states: list[torch.Tensor] = []
    sample_trajectories(pipe.unet, pipe.vae, pipe.scheduler, embeds, negative, num_steps=steps,
                        guidance_scale=cfg.sampling.guidance_scale, eta=1.0, resolution=resolution,
                        generator=torch.Generator().manual_seed(seed),
                        before_step=lambda k, x_t: states.append(decode_latents(pipe.vae, x_t)))
    return torch.cat(states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="32,64")
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = init_tiny_rewards(tmp, names=["aesthetic", "hpsv2"])
        towers = {"testbed_proxy": critic_tower_source(RewardSpec(name="testbed_proxy")),
                  "tiny CLIP ViT-L/14 (aesthetic)": critic_tower_source(RewardSpec(name="aesthetic", source=tiny["aesthetic"])),
                  "tiny open_clip ViT-H-14 (hpsv2)": critic_tower_source(RewardSpec(name="hpsv2", source=tiny["hpsv2"]))}
        for resolution in (int(r) for r in args.resolutions.split(",")):
            images = decoded_states(resolution, args.trajectories, args.steps, args.seed)
            for name, source in towers.items():
                plain = load_clip_image_tower(source, "cpu")
                official = load_clip_image_tower(source, "cpu", preprocessing="clip_processor")
                # the towers' inputs, in uint8 levels of the un-normalized image
                std = torch.tensor(plain.std).view(1, 3, 1, 1)
                levels = (plain.pixel_values(images) - official.pixel_values(images)).abs() * std * 255
                cos = torch.nn.functional.cosine_similarity(plain.embed(images), official.embed(images))
                print(json.dumps({"resolution": resolution, "tower": name, "images": len(images),
                                  "input_levels_mean": round(levels.mean().item(), 4),
                                  "input_levels_max": round(levels.max().item(), 3),
                                  "cos_mean": round(cos.mean().item(), 6), "cos_min": round(cos.min().item(), 6),
                                  "one_minus_cos_median": float(f"{(1 - cos).median().item():.3g}")}))


if __name__ == "__main__":
    main()
