"""Time RL epochs split into sampling, reward and training; print images/s.

CPU: the tiny model. GPU: an SD-1.5-shaped pipeline with random weights (same FLOPs as the real
model, nothing to download). Medians over the timed epochs; the first epoch is warm-up.

    python benchmarks/rl_epoch.py                                  # tiny, CPU
    python benchmarks/rl_epoch.py --preset sd15 --device cuda --mixed-precision bf16
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
        "algorithm": {"name": args.algorithm},
        "training": {"epochs": args.epochs + 1, "batch_size": args.train_batch,
                     "gradient_accumulation_steps": args.images_per_epoch // args.train_batch // 2 or 1,
                     "timestep_fraction": 1.0, "mixed_precision": args.mixed_precision, "learning_rate": 3e-4,
                     "stat_tracking": {"enabled": False}},
        "logging": {"progress_bars": False},
        "device": args.device,
    }


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
        total = time.perf_counter() - start
        if epoch:  # the first epoch warms up kernels and allocators
            rows.append({"sampling_s": times.sampling, "reward_s": times.reward, "training_s": times.training,
                         "total_s": total, "images_per_s": len(samples) / total})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--algorithm", default="ddpo", choices=["ddpo", "tdpo", "tdpo_r", "cdpo"])
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 8 tiny, 50 sd15)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--images-per-epoch", type=int, default=None)
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    big = args.preset == "sd15"
    args.steps = args.steps or (50 if big else 8)
    args.images_per_epoch = args.images_per_epoch or (32 if big else 16)
    args.sample_batch = args.sample_batch or (8 if big else 4)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_tiny(Path(tmp) / args.preset, preset=args.preset)
        trainer = Trainer(parse_config(build_config(args, model_dir)), Path(tmp) / "run")
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows = time_epochs(trainer, args.epochs)
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    result = {"preset": args.preset, "algorithm": args.algorithm, "device": str(trainer.device),
              "gpu": torch.cuda.get_device_name() if trainer.device.type == "cuda" else None,
              "steps": args.steps, "images_per_epoch": args.images_per_epoch, "mixed_precision": args.mixed_precision,
              "torch": torch.__version__, **{f"median_{k}": round(v, 4) for k, v in median.items()},
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if trainer.device.type == "cuda" else None}
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
