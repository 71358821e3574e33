"""Time RL epochs split into sampling, reward and training; print images/s beside the epoch's cost model.

CPU: the tiny model. GPU: an SD-1.5-shaped pipeline with random weights (same FLOPs as the real
model, nothing to download). Every contender (TRL's trainer, our variants) lives in this one process
and they take turns epoch by epoch (the first round is warm-up, and the order rotates every round),
so a slow spell on a shared machine hits all of them alike: quote the medians and ratios.

    python benchmarks/rl_epoch.py                                  # tiny, CPU
    python benchmarks/rl_epoch.py --compare-trl --epochs 3         # TRL 0.23.1's DDPOTrainer vs ours, same weights
    python benchmarks/rl_epoch.py --speedups                       # each performance switch alone vs the baseline
    python benchmarks/rl_epoch.py --preset sd15 --device cuda --mixed-precision bf16 --compare-trl
    python benchmarks/rl_epoch.py --algorithm ddpo,tdpo_r --critic-input-strides 1,5,10   # critic overheads
    python benchmarks/rl_epoch.py --preset sd35m --device cuda --mixed-precision bf16 --algorithm grpo,tdpo_r

`--preset sd35m` is SD3.5-Medium's shape with random weights (`tiny_flow.build_sd35m`, built on the device
and saved in bfloat16, ~16 GB) in Flow-GRPO's setting: 512 px, 10 steps, CFG 4.5, LoRA r 32; the cost
model covers the sd family only and TRL has no flow trainer, so both are left out there.

`--compare-trl` needs the benchmark extra (`pip install -e '.[bench]'`: trl 0.23.1, pandas), never a
runtime dependency. TRL's trainer gets the same pipeline directory, prompts, reward, steps, guidance,
eta, batch sizes, accumulation, timestep fraction, LoRA rank (TRL's is fixed at 4) and precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rewardtune import cost_model
from rewardtune.config import parse_config
from rewardtune.tiny import PRESETS, init_tiny
from rewardtune.tiny_flow import init_tiny_flow
from rewardtune.trainer import EpochTimes, Trainer

# SD3.5-Medium-shaped random weights in Flow-GRPO's pickscore_sd3 setting (configs/sd35m-pickscore-grpo.yaml)
FLOW_PRESETS = {"sd35m": {"family": "sd3", "resolution": 512, "guidance_scale": 4.5, "lora_rank": 32, "lora_alpha": 64}}

# The speed switches timed alone by --speedups, each on top of BASELINE (all of them off).
BASELINE = ["performance.cache_prompt_embeds=false", "performance.sync_free_steps=false"]
SPEEDUPS = {
    "channels_last": ["performance.channels_last=true"],
    "eager_attention": ["performance.attention=eager"],  # what SDPA (the default processor) saves, read inversely
    "prompt_cache": ["performance.cache_prompt_embeds=true"],
    "sync_free": ["performance.sync_free_steps=true"],
    "fused2": ["training.fused_steps=2"],
    "fused4": ["training.fused_steps=4"],
    "compile": ["performance.compile=true"],
}
DTYPE = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_config(args: argparse.Namespace, model_dir: Path, algo: str = "ddpo", fused: int = 1, stride: int = 1) -> dict:
    batches = args.images_per_epoch // args.sample_batch
    flow = FLOW_PRESETS.get(args.preset)
    model = {"source": str(model_dir), "finetune": "lora", "lora_rank": 4, "dtype": DTYPE[args.mixed_precision]}
    sampling = {"num_steps": args.steps, "eta": 1.0, "guidance_scale": 5.0, "batch_size": args.sample_batch,
                "batches_per_epoch": batches, "resolution": args.resolution or (flow or PRESETS[args.preset])["resolution"]}
    if flow:
        model |= {"family": flow["family"], "lora_rank": flow["lora_rank"], "lora_alpha": flow["lora_alpha"]}
        sampling |= {"guidance_scale": flow["guidance_scale"], "flow": {"noise_level": 0.7}}
    return {
        "model": model,
        "sampling": sampling,
        "reward": {"name": args.reward},
        "algorithm": algorithm_section(algo, stride, args.tower),
        "training": {"epochs": args.epochs + 1, "batch_size": args.train_batch,
                     "gradient_accumulation_steps": args.grad_accum, "fused_steps": fused,
                     "timestep_fraction": args.timestep_fraction, "mixed_precision": args.mixed_precision,
                     "learning_rate": 3e-4, "stat_tracking": {"enabled": False}},
        "logging": {"progress_bars": False},
        "device": args.device,
    }


def algorithm_section(name: str, stride: int, tower: str | None) -> dict:
    """The algorithm at its defaults; TDPO-R/CDPO reset every epoch so the reset cost lands in every timed epoch,
    and CDPO constrains JPEG compressibility (a cheap auxiliary reward) to stay at its epoch-0 mean."""
    if name == "ddpo":
        return {"name": name}
    if name == "grpo":  # one group per sampling batch
        return {"name": name, "group": {"group_size": 4}}
    section: dict = {"name": name, "critic": {"input_stride": stride, "image_encoder": tower}}
    if name in ("tdpo_r", "cdpo"):
        section["reset"] = {"every": 1}
    if name == "cdpo":
        section["constraints"] = [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}]
    return section


def save_critic_tower(directory: Path, preset: str) -> str:
    """A random-weight CLIP for the TDPO critic's image tower: ViT-L/14-shaped for sd15/sd35m (the paper's), tiny otherwise."""
    from transformers import CLIPConfig, CLIPModel

    from rewardtune.rewards.tiny import save_tiny_clip
    from rewardtune.tiny import build_tokenizer

    if preset not in ("sd15", "sd35m"):
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Contender:
    """One trainer under test: `epoch(k, warmup)` runs and times one epoch and returns its phase times."""

    name: str
    gradient_plugin: dict  # accelerate's GradientState is a process-wide singleton: each contender restores its own

    def restore_gradient_state(self, accelerator) -> None:
        accelerator.gradient_state.plugin_kwargs = dict(self.gradient_plugin)


class Ours(Contender):
    def __init__(self, name: str, cfg: dict, out: Path, overrides: list[str]) -> None:
        self.name = name
        self.trainer = Trainer(parse_config(cfg, overrides), out)
        self.gradient_plugin = dict(self.trainer.accelerator.gradient_state.plugin_kwargs)
        self.batches = self.trainer.cfg.sampling.batches_per_epoch

    def epoch(self, k: int, warmup_batches: int | None, device: str) -> dict:
        trainer = self.trainer
        self.restore_gradient_state(trainer.accelerator)
        trainer.cfg.sampling.batches_per_epoch = warmup_batches or self.batches
        try:
            sync(device)
            start = time.perf_counter()
            times = EpochTimes()
            samples = trainer.sample_epoch(k, times)
            trainer.compute_advantages(samples)
            t0 = time.perf_counter()
            trainer.train_epoch(samples, k)
            sync(device)
            times.training = time.perf_counter() - t0
            t0 = time.perf_counter()
            if trainer.constraints:
                trainer.update_multipliers(samples, k)
            if trainer.cfg.algorithm.uses_reset:  # measured and reset every epoch (reset.every = 1 here)
                trainer.measure_and_reset(k, reset=True)
            sync(device)
            reset_s = time.perf_counter() - t0
            total = time.perf_counter() - start
        finally:
            trainer.cfg.sampling.batches_per_epoch = self.batches
        return {"sampling_s": times.sampling, "reward_s": times.reward, "training_s": times.training,
                "reset_and_dual_s": reset_s, "total_s": total, "images_per_s": len(samples) / total}


class TRL(Contender):
    """TRL 0.23.1's DDPOTrainer, its sampling / reward / training phases timed by wrapping its own methods."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, workdir: Path, prompts: list[str], reward) -> None:
        import random

        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

        self.name = "trl-0.23.1"
        self.device = args.device
        rng = random.Random(0)
        config = DDPOConfig(
            num_epochs=args.epochs + 1, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0,
            sample_batch_size=args.sample_batch, sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch,
            train_batch_size=args.train_batch, train_gradient_accumulation_steps=args.grad_accum,
            train_timestep_fraction=args.timestep_fraction, train_learning_rate=3e-4, train_clip_range=1e-4,
            mixed_precision=args.mixed_precision, per_prompt_stat_tracking=False, async_reward_computation=False,
            log_with=None, save_freq=10**6, allow_tf32=True,
            project_kwargs={"project_dir": str(workdir), "logging_dir": str(workdir / "logs")},
        )
        pipeline = DefaultDDPOStableDiffusionPipeline(str(model_dir), use_lora=True)
        self.trainer = DDPOTrainer(
            config,
            lambda images, prompts_, metadata: (reward(images, list(prompts_)).float(), {}),
            lambda: (rng.choice(prompts), {}),
            pipeline,
        )
        pipeline.set_progress_bar_config(disable=True)  # as ours: no per-step bars in a benchmark's output
        self.gradient_plugin = dict(self.trainer.accelerator.gradient_state.plugin_kwargs)
        self.batches = config.sample_num_batches_per_epoch
        self.global_step = 0
        self.phases: dict[str, float] = {}
        for method, phase in (("_generate_samples", "sampling_s"), ("compute_rewards", "reward_s"),
                              ("_train_batched_samples", "training_s")):
            setattr(self.trainer, method, self._timed(getattr(self.trainer, method), phase))

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def wrapper(*a, **kw):
            sync(self.device)
            start = time.perf_counter()
            out = fn(*a, **kw)
            if phase == "reward_s":
                out = tuple(list(x) for x in out)  # TRL returns a lazy zip: evaluate it inside the timing
            sync(self.device)
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    def epoch(self, k: int, warmup_batches: int | None, device: str) -> dict:
        self.restore_gradient_state(self.trainer.accelerator)
        self.trainer.config.sample_num_batches_per_epoch = warmup_batches or self.batches
        self.phases = {}
        try:
            sync(device)
            start = time.perf_counter()
            self.global_step = self.trainer.step(k, self.global_step)
            sync(device)
            total = time.perf_counter() - start
        finally:
            self.trainer.config.sample_num_batches_per_epoch = self.batches
        images = (warmup_batches or self.batches) * self.trainer.config.sample_batch_size
        return {**{p: self.phases.get(p, 0.0) for p in ("sampling_s", "reward_s", "training_s")},
                "reset_and_dual_s": 0.0, "total_s": total, "images_per_s": images / total}


def epoch_cost_of(trainer: Trainer, args: argparse.Namespace) -> dict[str, cost_model.Cost]:
    """The cost model of one epoch of this trainer's config, from its loaded models' configs."""
    from rewardtune.critic import embedded_steps

    cfg = trainer.cfg
    vision = None
    critic_steps = 0
    if trainer.critics is not None:
        tower_cfg = trainer.tower.module.config
        vision = getattr(tower_cfg, "vision_config", tower_cfg).to_dict()
        critic_steps = len(embedded_steps(cfg.sampling.num_steps, cfg.algorithm.critic.input_stride))
    vae_factor = 2 ** (len(trainer.pipe.vae.config.block_out_channels) - 1)
    shape = cost_model.EpochShape(
        images=cfg.sampling.batch_size * cfg.sampling.batches_per_epoch, sample_batch=cfg.sampling.batch_size,
        steps=cfg.sampling.num_steps, trained_steps=trainer.num_train_steps, guidance=cfg.sampling.guidance_scale != 1.0,
        latent_size=cfg.sampling.resolution // vae_factor, inner_epochs=cfg.training.inner_epochs,
        train_batch=cfg.training.batch_size, fused_steps=cfg.training.fused_steps, finetune=cfg.model.finetune,
        lora_rank=cfg.model.lora_rank, lora_targets=tuple(cfg.model.lora_target_modules), critic_steps=critic_steps,
    )
    return cost_model.epoch_cost(shape, dict(trainer.pipe.unet.config), dict(trainer.pipe.vae.config),
                                 trainer.pipe.text_encoder.config.to_dict(), vision,
                                 bytes_per_element=4 if args.mixed_precision == "no" else 2)


# measured phase -> the cost-model phases it contains
PHASES = {"sampling_s": ("text_encode", "sampling_unet", "vae_decode", "critic_decode_embed"),
          "reward_s": ("reward",), "training_s": ("training",)}


def cost_table(costs: dict[str, cost_model.Cost], medians: dict, peak_flops: float | None, peak_bw: float | None) -> list[dict]:
    rows = []
    for measured, parts in PHASES.items():
        cost = sum((costs[p] for p in parts), cost_model.Cost(0.0, 0.0))
        seconds = medians.get(f"median_{measured}")
        row = {"phase": measured.removesuffix("_s"), "tflop": round(cost.flops / 1e12, 4), "gb": round(cost.bytes / 1e9, 3),
               "measured_s": seconds, "achieved_tflops": round(cost.flops / seconds / 1e12, 4) if seconds else None}
        if peak_flops and peak_bw:
            bound = cost_model.roofline_seconds(cost, peak_flops, peak_bw)
            row |= {"roofline_s": round(bound, 4), "fraction_of_limit": round(bound / seconds, 3) if seconds else None}
        rows.append(row)
    return rows


def device_peaks(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """Dense bf16 matmul rate and memory bandwidth: given, or the measured H100/H200 figures for those GPUs."""
    if args.peak_tflops and args.peak_tbps:
        return args.peak_tflops * 1e12, args.peak_tbps * 1e12
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        bandwidth = 4.3e12 if "H200" in name else 3.35e12 if "H100" in name else None
        return (790e12, bandwidth) if bandwidth else (None, None)
    return None, None


def contenders_for(args: argparse.Namespace, model_dir: Path, tmp: Path) -> list[Contender]:
    out: list[Contender] = []
    common = list(args.set or [])
    if args.compare_trl:
        from accelerate import PartialState

        from rewardtune.config import RewardSpec
        from rewardtune.prompts import builtin_prompts
        from rewardtune.rewards import build_reward

        # TRL's pipeline constructor logs through accelerate before it creates its Accelerator
        PartialState(cpu=args.device == "cpu")
        reward = build_reward(RewardSpec(name=args.reward), torch.device(args.device))
        out.append(TRL(args, model_dir, tmp / "trl", builtin_prompts("simple_animals"), reward))
    if args.speedups:
        cfg = build_config(args, model_dir)
        out.append(Ours("baseline", cfg, tmp / "baseline", [*BASELINE, *common]))
        for name, overrides in SPEEDUPS.items():
            if name in args.skip:
                continue
            out.append(Ours(name, cfg, tmp / name, [*BASELINE, *overrides, *common]))
        return out
    strides = [int(k) for k in str(args.critic_input_strides).split(",")]
    for algo in args.algorithm.split(","):
        for fused in (int(f) for f in str(args.fused_steps).split(",")):
            for stride in strides if algo != "ddpo" else [1]:
                name = f"rewardtune-{algo}-fused{fused}" + (f"-stride{stride}" if algo != "ddpo" else "")
                out.append(Ours(name, build_config(args, model_dir, algo, fused, stride), tmp / name, common))
    return out


def run(args: argparse.Namespace) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model_dir or tmp / args.preset
        if not (model_dir / "model_index.json").is_file():  # a --model-dir is built once, then reused
            if args.preset in FLOW_PRESETS:
                init_tiny_flow(model_dir, FLOW_PRESETS[args.preset]["family"], preset=args.preset, device=args.device)
            else:
                init_tiny(model_dir, preset=args.preset)
        args.tower = None
        if args.algorithm.split(",") != ["ddpo"]:
            tower = args.tower_dir or tmp / "critic-tower"
            args.tower = str(tower) if (tower / "config.json").is_file() else save_critic_tower(tower, args.preset)
        contenders = contenders_for(args, model_dir, tmp)
        rows: dict[str, list[dict]] = {c.name: [] for c in contenders}
        peaks: dict[str, float] = {}
        for k in range(args.epochs + 1):
            order = contenders[k % len(contenders):] + contenders[: k % len(contenders)]
            for contender in order:
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row = contender.epoch(k, args.warmup_batches if k == 0 else None, args.device)
                if args.device == "cuda":
                    peaks[contender.name] = max(peaks.get(contender.name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                if k:  # the first round warms up kernels, allocators and compilers
                    rows[contender.name].append(row)
                print(f"epoch {k} {contender.name}: {row['total_s']:.2f} s{' (warm-up)' if not k else ''}", flush=True)
        peak_flops, peak_bw = device_peaks(args)
        for contender in contenders:
            summary = summarize(contender.name, rows[contender.name])
            if contender.name in peaks:
                summary["peak_memory_gb"] = round(peaks[contender.name], 2)
            reference = next((c for c in contenders if isinstance(c, Ours)), None)
            if reference is not None and args.preset not in FLOW_PRESETS:
                costs = epoch_cost_of(reference.trainer if isinstance(contender, TRL) else contender.trainer, args)
                total = sum(c.flops for c in costs.values())
                summary["model_tflop_per_epoch"] = round(total / 1e12, 4)
                summary["achieved_tflops"] = round(total / summary["median_total_s"] / 1e12, 4)
                summary["cost_model"] = cost_table(costs, summary, peak_flops, peak_bw)
            results.append(summary)
    base = results[0]["median_images_per_s"]
    for row in results:
        row["ratio"] = round(row["median_images_per_s"] / base, 3)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "preset": args.preset, "steps": args.steps, "images_per_epoch": args.images_per_epoch,
            "sample_batch": args.sample_batch, "train_batch": args.train_batch, "grad_accum": args.grad_accum,
            "timestep_fraction": args.timestep_fraction, "mixed_precision": args.mixed_precision,
            "timed_epochs": args.epochs, "set": args.set or []}
    if args.device == "cuda":
        meta["cuda"] = torch.version.cuda
    return {"meta": meta, "results": results}


def print_report(report: dict) -> None:
    header = ["name", "median_sampling_s", "median_reward_s", "median_training_s", "median_reset_and_dual_s",
              "median_total_s", "median_images_per_s", "ratio", "achieved_tflops", "peak_memory_gb"]
    print(" | ".join(header))
    for row in report["results"]:
        print(" | ".join(str(row.get(h, "")) for h in header))
    first = next((r for r in report["results"] if "cost_model" in r), None)
    if first is not None:
        print(f"\ncost model of one epoch of {first['name']} (each row's own is in the JSON), beside its medians:")
        keys = list(first["cost_model"][0])
        print(" | ".join(keys))
        for row in first["cost_model"]:
            print(" | ".join(str(row[k]) for k in keys))
    print(json.dumps(report["meta"]))


def summarize(name: str, rows: list[dict]) -> dict:
    median = {f"median_{k}": round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    return {"name": name, **median, "epochs": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted([*PRESETS, *FLOW_PRESETS]))
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
    parser.add_argument("--timestep-fraction", type=float, default=1.0)
    parser.add_argument("--fused-steps", default="1", help="comma-separated training.fused_steps values to time")
    parser.add_argument("--critic-input-strides", default="1",
                        help="comma-separated algorithm.critic.input_stride values to time (TDPO family)")
    parser.add_argument("--compare-trl", action="store_true", help="also time TRL's DDPOTrainer in this process")
    parser.add_argument("--speedups", action="store_true", help="time each performance switch alone against the baseline")
    parser.add_argument("--skip", default="", help="comma-separated --speedups names to leave out (e.g. compile)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for all our trainers")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per contender (after one warm-up round)")
    parser.add_argument("--warmup-batches", type=int, default=None, help="sampling batches in the warm-up round (default: all)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="device matmul peak for the roofline column")
    parser.add_argument("--peak-tbps", type=float, default=None, help="device memory bandwidth (TB/s) for the roofline column")
    parser.add_argument("--model-dir", type=Path, default=None, help="pipeline directory to reuse (built there if absent)")
    parser.add_argument("--tower-dir", type=Path, default=None, help="critic tower directory to reuse (built there if absent)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    big = args.preset == "sd15"
    flow = args.preset in FLOW_PRESETS
    args.steps = args.steps or (50 if big else 10 if flow else 8)
    args.images_per_epoch = args.images_per_epoch or (32 if big or flow else 16)
    args.sample_batch = args.sample_batch or (8 if big or flow else 4)
    if flow and args.compare_trl:
        parser.error("--compare-trl: TRL's DDPOTrainer runs SD 1.x/2.x pipelines only; drop it for --preset sd35m")
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = set(args.algorithm.split(",")) - {"ddpo", "grpo", "tdpo", "tdpo_r", "cdpo"}
    if unknown:
        parser.error(f"--algorithm: unknown {sorted(unknown)}; choose among ddpo, grpo, tdpo, tdpo_r, cdpo")
    if args.skip - set(SPEEDUPS):
        parser.error(f"--skip: unknown {sorted(args.skip - set(SPEEDUPS))}; choose among {', '.join(SPEEDUPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1 (timed epochs after the warm-up round)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        from rewardtune.checkpoint import write_text_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
