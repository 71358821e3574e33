"""Time RL epochs split into sampling, reward and training; print images/s.

CPU: the tiny model. GPU: an SD-1.5-shaped pipeline with random weights (same FLOPs as the real
model, nothing to download). Medians over the timed epochs; the first epoch is warm-up.

    python benchmarks/rl_epoch.py                                  # tiny, CPU
    python benchmarks/rl_epoch.py --preset sd15 --device cuda --mixed-precision bf16
    python benchmarks/rl_epoch.py --preset sd15 --device cuda --mixed-precision bf16 --compare-trl --fused-steps 1,4
    python benchmarks/rl_epoch.py --algorithm ddpo,tdpo,tdpo_r,cdpo --critic-input-strides 1,4   # overheads over DDPO

`--compare-trl` times TRL 0.23.1's DDPOTrainer (a benchmark-only extra: `pip install --no-deps trl==0.23.1`,
never a runtime dependency) in the same process on the same pipeline directory and settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewardtune.config import parse_config
from rewardtune.tiny import PRESETS, init_tiny
from rewardtune.trainer import EpochTimes, Trainer


def build_config(args: argparse.Namespace, model_dir: Path) -> dict:
    batches = args.images_per_epoch // args.sample_batch
    return {
        "model": {"source": str(model_dir), "finetune": "lora", "lora_rank": 4,
                  "dtype": "float32" if args.mixed_precision == "no" else {"bf16": "bfloat16", "fp16": "float16"}[args.mixed_precision]},
        "sampling": {"num_steps": args.steps, "eta": 1.0, "guidance_scale": 5.0, "batch_size": args.sample_batch,
                     "batches_per_epoch": batches, "resolution": args.resolution or PRESETS[args.preset]["resolution"]},
        "reward": {"name": args.reward},
        "algorithm": algorithm_section(args.algo, args.stride, args.tower),
        "training": {"epochs": args.epochs + 1, "batch_size": args.train_batch,
                     "gradient_accumulation_steps": args.grad_accum, "fused_steps": args.fused,
                     "timestep_fraction": 1.0, "mixed_precision": args.mixed_precision, "learning_rate": 3e-4,
                     "stat_tracking": {"enabled": False}},
        "logging": {"progress_bars": False},
        "device": args.device,
    }


def algorithm_section(name: str, stride: int, tower: str | None) -> dict:
    """The algorithm at its defaults; TDPO-R/CDPO reset every epoch so the reset cost lands in every timed epoch,
    and CDPO constrains JPEG compressibility (a cheap auxiliary reward) to stay at its epoch-0 mean."""
    if name == "ddpo":
        return {"name": name}
    section: dict = {"name": name, "critic": {"input_stride": stride, "image_encoder": tower}}
    if name in ("tdpo_r", "cdpo"):
        section["reset"] = {"every": 1}
    if name == "cdpo":
        section["constraints"] = [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}]
    return section


def save_critic_tower(directory: Path, preset: str) -> str:
    """A random-weight CLIP for the TDPO critic's image tower: ViT-L/14-shaped for sd15 (the paper's), tiny otherwise."""
    from transformers import CLIPConfig, CLIPModel

    from rewardtune.rewards.tiny import save_tiny_clip
    from rewardtune.tiny import build_tokenizer

    if preset != "sd15":
        save_tiny_clip(directory, seed=0)
        return str(directory)
    tokenizer = build_tokenizer()
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                  patch_size=14, hidden_act="quick_gelu")
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=len(tokenizer),
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def epoch_flops(trainer: Trainer, samples) -> float:
    """FLOPs of one epoch: one counted sampling UNet call and one counted training chunk, scaled by their counts."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = trainer.cfg
    batch = trainer._shuffled(samples, torch.Generator().manual_seed(0))
    chunks = trainer._micro_steps(len(samples))
    view = trainer._view(batch, chunks[0])
    with FlopCounterMode(display=False) as train_counter:
        trainer.log_prob_of(view).sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as sample_counter, torch.no_grad():
        rows = slice(0, cfg.sampling.batch_size)
        trainer.policy_log_prob(batch, rows, 0)
    sampling_calls = cfg.sampling.batches_per_epoch * cfg.sampling.num_steps
    return sampling_calls * sample_counter.get_total_flops() + len(chunks) * cfg.training.inner_epochs * train_counter.get_total_flops()


def time_trl(args: argparse.Namespace, model_dir: Path, workdir: Path) -> list[dict]:
    """TRL's DDPOTrainer at the same setting (its default fp16 mixed precision, LoRA rank 4)."""
    import random

    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from rewardtune.prompts import builtin_prompts

    prompts = builtin_prompts("simple_animals")
    config = DDPOConfig(
        num_epochs=args.epochs + 1, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0,
        sample_batch_size=args.sample_batch, sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch,
        train_batch_size=args.train_batch, train_gradient_accumulation_steps=args.grad_accum, train_timestep_fraction=1.0,
        train_learning_rate=3e-4, mixed_precision=args.trl_mixed_precision, per_prompt_stat_tracking=False,
        async_reward_computation=False, log_with=None, save_freq=10**6, allow_tf32=True,
        project_kwargs={"project_dir": str(workdir), "logging_dir": str(workdir / "logs")},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(str(model_dir), use_lora=True)
    trainer = DDPOTrainer(
        config,
        lambda images, prompts_, metadata: (images.float().mean(dim=(1, 2, 3)), {}),
        lambda: (random.choice(prompts), {}),
        pipeline,
    )
    rows, global_step = [], 0
    for epoch in range(args.epochs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        if epoch:
            rows.append({"total_s": total, "images_per_s": args.images_per_epoch / total})
    return rows


def time_epochs(trainer: Trainer, epochs: int) -> list[dict]:
    rows = []
    for epoch in range(epochs + 1):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        times = EpochTimes()
        samples = trainer.sample_epoch(epoch, times)
        trainer.compute_advantages(samples)
        t0 = time.perf_counter()
        trainer.train_epoch(samples, epoch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.training = time.perf_counter() - t0
        t0 = time.perf_counter()
        if trainer.constraints:
            trainer.update_multipliers(samples, epoch)
        if trainer.cfg.algorithm.uses_reset:  # measured and reset every epoch (reset.every = 1 here)
            trainer.measure_and_reset(epoch, reset=True)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        reset_s = time.perf_counter() - t0
        total = time.perf_counter() - start
        if epoch:  # the first epoch warms up kernels and allocators
            rows.append({"sampling_s": times.sampling, "reward_s": times.reward, "training_s": times.training,
                         "reset_and_dual_s": reset_s, "total_s": total, "images_per_s": len(samples) / total})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--algorithm", default="ddpo",
                        help="comma-separated among ddpo, tdpo, tdpo_r, cdpo; ratios are against the first row")
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 8 tiny, 50 sd15)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--images-per-epoch", type=int, default=None)
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (x timesteps)")
    parser.add_argument("--fused-steps", default="1", help="comma-separated training.fused_steps values to time")
    parser.add_argument("--critic-input-strides", default="1",
                        help="comma-separated algorithm.critic.input_stride values to time (TDPO family)")
    parser.add_argument("--compare-trl", action="store_true", help="also time TRL's DDPOTrainer in this process")
    parser.add_argument("--trl-mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    big = args.preset == "sd15"
    args.steps = args.steps or (50 if big else 8)
    args.images_per_epoch = args.images_per_epoch or (32 if big else 16)
    args.sample_batch = args.sample_batch or (8 if big else 4)

    on_gpu = args.device == "cuda"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_tiny(Path(tmp) / args.preset, preset=args.preset)
        algorithms = args.algorithm.split(",")
        unknown = set(algorithms) - {"ddpo", "tdpo", "tdpo_r", "cdpo"}
        if unknown:
            parser.error(f"--algorithm: unknown {sorted(unknown)}; choose among ddpo, tdpo, tdpo_r, cdpo")
        args.tower = save_critic_tower(Path(tmp) / "critic-tower", args.preset) if algorithms != ["ddpo"] else None
        if args.compare_trl:
            torch.cuda.reset_peak_memory_stats()
            rows = time_trl(args, model_dir, Path(tmp) / "trl")
            results.append(summarize("trl-0.23.1-ddpo", rows, None, args))
            torch.cuda.empty_cache()
        strides = [int(k) for k in str(args.critic_input_strides).split(",")]
        variants = [(a, int(f), k) for a in algorithms for f in str(args.fused_steps).split(",")
                    for k in (strides if a != "ddpo" else [1])]
        for algo, fused, stride in variants:
            args.algo, args.fused, args.stride = algo, fused, stride
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(parse_config(build_config(args, model_dir)), Path(tmp) / f"run-{algo}-{fused}-{stride}")
            rows = time_epochs(trainer, args.epochs)
            flops = epoch_flops(trainer, trainer.sample_epoch(0, EpochTimes())) if on_gpu else None
            name = f"rewardtune-{algo}-fused{fused}" + (f"-stride{stride}" if algo != "ddpo" else "")
            results.append(summarize(name, rows, flops, args))
            del trainer
            if on_gpu:
                torch.cuda.empty_cache()
    base = results[0]["median_images_per_s"]
    header = ["name", "median_sampling_s", "median_reward_s", "median_training_s", "median_reset_and_dual_s", "median_total_s",
              "median_images_per_s", "ratio", "tflops", "peak_memory_gb"]
    print(" | ".join(header))
    for row in results:
        row["ratio"] = round(row["median_images_per_s"] / base, 2)
        print(" | ".join(str(row.get(h, "")) for h in header))
    meta = {"gpu": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__, "preset": args.preset,
            "steps": args.steps, "images_per_epoch": args.images_per_epoch, "sample_batch": args.sample_batch,
            "train_batch": args.train_batch, "grad_accum": args.grad_accum, "mixed_precision": args.mixed_precision}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def summarize(name: str, rows: list[dict], flops: float | None, args: argparse.Namespace) -> dict:
    median = {f"median_{k}": round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    out = {"name": name, **median}
    if flops is not None:
        out["tflops"] = round(flops / median["median_total_s"] / 1e12, 1)
    if args.device == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


if __name__ == "__main__":
    main()
