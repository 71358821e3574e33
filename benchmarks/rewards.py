"""Images/s of each reward at its real size, with random weights built from the real configs.

GPU: CLIP ViT-L/14 (aesthetic), CLIP ViT-H-14 (PickScore), open_clip ViT-H-14 (HPSv2), BLIP ViT-L/16 +
BERT-base (ImageReward), CLIP ViT-B/32 (CLIPScore), JPEG at 512 px — nothing to download. CPU: the
tiny stand-ins. The reward objects are the ones `build_reward` returns, wrapped around in-memory models;
inputs are SD-sized images in [0,1] on the device, so on-device preprocessing is included.

    python benchmarks/rewards.py                              # tiny, CPU
    python benchmarks/rewards.py --device cuda --dtype bfloat16 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewardtune.rewards.aesthetic import Aesthetic, RewardMLP
from rewardtune.rewards.hpsv2 import HPSv2, create_open_clip
from rewardtune.rewards.imagereward import VIT_L16, ImageReward, ImageRewardModel, load_tokenizer, text_config
from rewardtune.rewards.pickscore import ClipTextImage
from rewardtune.rewards.simple import JpegSize
from rewardtune.rewards.tiny import TINY_BLIP_VISION, TINY_CLIP_VISION, TINY_OPEN_CLIP, write_bert_vocab
from rewardtune.rewards.towers import open_clip_tower, tower_from_clip_model
from rewardtune.tiny import build_tokenizer

_DIR = Path(tempfile.mkdtemp(prefix="rt-bench-"))
CLIP_CONFIGS = {  # (vision, text, projection_dim, hidden_act) of the real checkpoints
    "vit-l-14": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14), dict(hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12), 768, "quick_gelu"),
    "vit-h-14": (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14), dict(hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16), 1024, "gelu"),
    "vit-b-32": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32), dict(hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8), 512, "quick_gelu"),
    "tiny": (TINY_CLIP_VISION, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), 32,
             "quick_gelu"),
}


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def clip_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tokenizer()
    vision, text, proj, act = CLIP_CONFIGS[name]
    text = dict(text, vocab_size=49408, max_position_embeddings=77, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision, hidden_act=act), projection_dim=proj))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer


def build(name: str, real: bool, device: torch.device, dtype: torch.dtype):
    """(reward, description, params in M)."""
    if name == "aesthetic":
        model, _ = clip_model("vit-l-14" if real else "tiny", device, dtype)
        tower = tower_from_clip_model(model, _DIR, device, dtype)
        head = RewardMLP(tower.dim).to(device).eval().requires_grad_(False)
        return Aesthetic(tower, head), f"CLIP {'ViT-L/14' if real else 'tiny'} image + MLP", _params(model.vision_model) + _params(head)
    if name in ("pickscore", "clipscore"):
        arch = ("vit-h-14" if name == "pickscore" else "vit-b-32") if real else "tiny"
        model, tok = clip_model(arch, device, dtype)
        tower = tower_from_clip_model(model, _DIR, device, dtype)
        return ClipTextImage(name, model, tok, tower, name), f"CLIP {arch} (transformers)", _params(model)
    if name == "hpsv2":
        import open_clip

        arch = "ViT-H-14"
        if not real:
            arch = "rt-tiny-ViT-H-14"
            (_DIR / f"{arch}.json").write_text(json.dumps(TINY_OPEN_CLIP))
            open_clip.add_model_config(_DIR / f"{arch}.json")
        model = create_open_clip(arch).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return HPSv2(model, open_clip.get_tokenizer(arch), open_clip_tower(model, device, dtype)), f"open_clip {arch}", _params(model)
    if name == "imagereward":
        write_bert_vocab(_DIR / "bert")
        tok = load_tokenizer(_DIR / "bert")
        med = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=512) if real else dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
        model = ImageRewardModel(VIT_L16 if real else TINY_BLIP_VISION, text_config(med))
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        model.mlp.float()
        return ImageReward(model, tok, device, dtype), "BLIP ViT-L/16 + BERT-base" if real else "tiny BLIP", _params(model)
    if name == "jpeg_compressibility":
        return JpegSize(name, -1.0), "PIL JPEG q95 (CPU)", 0.0
    raise ValueError(name)


def time_reward(reward, images: torch.Tensor, prompts: list[str], device: torch.device, iters: int) -> float:
    """Median seconds per batch after one warm-up call."""
    reward(images, prompts)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        reward(images, prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=["real", "tiny"], help="default: real on cuda, tiny on cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="input image size (SD output: 512)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--rewards", default="aesthetic,pickscore,hpsv2,imagereward,clipscore,jpeg_compressibility")
    args = parser.parse_args()
    device = torch.device(args.device)
    real = (args.preset or ("real" if device.type == "cuda" else "tiny")) == "real"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (32 if device.type == "cuda" else 4)
    size = args.resolution or (512 if real else 64)
    iters = args.iters or (10 if device.type == "cuda" else 3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = [f"a photo of a cat number {i}" for i in range(batch)]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{'real' if real else 'tiny'} sizes, {dtype}, batch {batch}, {size}px inputs, median of {iters}")
    print(f"{'reward':22s} {'model':30s} {'params(M)':>9s} {'images/s':>10s} {'ms/image':>9s}")
    for name in args.rewards.split(","):
        torch.manual_seed(0)
        reward, desc, params = build(name, real, device, dtype)
        seconds = time_reward(reward, images, prompts, device, iters)
        print(f"{name:22s} {desc:30s} {params:9.1f} {batch / seconds:10.1f} {1000 * seconds / batch:9.2f}", flush=True)
        del reward
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
