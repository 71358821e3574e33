"""Held-out evaluation: the base model and every kept checkpoint, scored on the training reward and
on rewards the policy never saw, with diversity and drift from the base model.

Comparability: the noise of image j of prompt p (initial latent and every DDIM step's noise) comes
from its own CPU generator seeded by (evaluation.seed, p, j) alone, so it is the same at every
checkpoint, in every batch composition and on every device. Differences between checkpoints'
images are then the policy's doing, not the sampler's.

Layout of `out_dir`. A checkpoint's results are written into a hidden temporary directory (metrics.json
last) and renamed into place: a `<checkpoint>/` directory is complete by construction, a re-run skips it,
and a killed evaluation leaves only a hidden `.tmp-*` directory that the next run deletes.

    eval_settings.json            what was evaluated; a later call with other settings is refused
    <checkpoint>/metrics.json     see `checkpoint_metrics` for the fields
    <checkpoint>/samples.jsonl    one record per image: split, prompt, index, seed, every reward
    <checkpoint>/embeddings.npy   [N, d] image embeddings in samples.jsonl order (drift needs base's)
    <checkpoint>/images/*.png     <split>-<prompt index>-<image index>.png
    <checkpoint>/grid.png         held-out prompts (rows) x images (columns)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from rewardtune.checkpoint import (
    list_checkpoints,
    verify_checkpoint,
    warn_stray_checkpoint_files,
    write_json_atomic,
)
from rewardtune.config import RewardSpec, RunConfig
from rewardtune.errors import CheckpointError, RewardtuneError
from rewardtune.faults import fault_point

log = logging.getLogger(__name__)

BASE = "base"
SPLITS = ("heldout", "train")


# ---------------------------------------------------------------------------------------------- statistics
def summary_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and the Student-t 95% CI of the mean over `values` (one value per prompt)."""
    array = np.asarray(values, dtype=np.float64)
    n = int(array.size)
    if n == 0:
        raise ValueError("summary_stats needs at least one value")
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if n > 1 else 0.0
    import scipy.stats  # here, not at import time: scipy is only needed once a CI is computed

    half = float(scipy.stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def pairwise_cosine_distance(embeddings: torch.Tensor) -> float | None:
    """Mean of 1 − cos over all unordered pairs of rows (rows L2-normalized); None for fewer than 2 rows."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    sims = embeddings.double() @ embeddings.double().T
    upper = torch.triu_indices(n, n, offset=1)
    return float((1 - sims[upper[0], upper[1]]).mean())


# ---------------------------------------------------------------------------------------------- embeddings
class Embedder(Protocol):
    """What diversity and drift need: `embed(images [B,3,H,W] in [0,1]) -> [B, d]`, rows L2-normalized."""

    name: str

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


class PixelEmbedder:
    """FALLBACK embedding, used only when `evaluation.image_tower` is unset: the image area-downsampled
    to 16x16, centred per image, L2-normalized.

    It sees layout and colour, not content, so its diversity and drift are a weaker proxy than CLIP's;
    the report says which embedding was used.
    """

    name = "pixel-16x16 (fallback, not CLIP)"

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.adaptive_avg_pool2d(images.float(), self.size).flatten(1)
        small = small - small.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(small, dim=1)


class _TowerEmbedder:
    def __init__(self, tower: Any, source: str) -> None:
        self.tower, self.name = tower, f"CLIP image tower ({source})"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.tower.embed(images).float(), dim=1)


def load_embedder(source: str | None, device: torch.device) -> Embedder:
    """The CLIP image tower named by `evaluation.image_tower`, or the pixel fallback when it is unset."""
    if source is None:
        return PixelEmbedder()
    try:
        from rewardtune.rewards.towers import load_clip_image_tower
    except ImportError:
        raise RewardtuneError(
            f"evaluation.image_tower={source!r} needs rewardtune.rewards.towers, which this build lacks; "
            "unset evaluation.image_tower to use the pixel fallback embedding"
        ) from None
    return _TowerEmbedder(load_clip_image_tower(source, device), source)


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class EvalItem:
    """One image to generate: prompt `index` of `split`, image number `image`, with its noise seed."""

    split: str
    index: int
    prompt: str
    image: int
    seed: int


def noise_seed(seed: int, prompt: str, image: int) -> int:
    """A stable 63-bit seed from (seed, prompt, image index): Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seeded_sample(prompts: list[str], n: int, seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:n]]


def select_prompts(cfg: RunConfig, prompts_dir: Path | None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Held-out and training prompts to evaluate, and where they came from.

    Held-out prompts come from `prompts_dir/heldout.txt` (raw prompts, the config's template applied, as for
    any prompt source); without it they fall back to the config's prompt source and are then NOT disjoint
    from training, which is recorded (`heldout_disjoint: false`) and shown in the report.
    """
    from rewardtune.prompts import load_prompts

    ev, template = cfg.evaluation, cfg.prompts.template
    heldout_file = prompts_dir / "heldout.txt" if prompts_dir is not None else None
    train_file = prompts_dir / "train.txt" if prompts_dir is not None else None
    disjoint = heldout_file is not None and heldout_file.is_file()
    heldout_pool = load_prompts(str(heldout_file), template) if disjoint else load_prompts(cfg.prompts.source, template)
    use_train_file = train_file is not None and train_file.is_file()
    train_pool = load_prompts(str(train_file), template) if use_train_file else load_prompts(cfg.prompts.source, template)
    heldout = _seeded_sample(heldout_pool, ev.num_heldout_prompts, ev.seed)
    if not disjoint:  # keep the two splits apart where the pool allows
        rest = [p for p in train_pool if p not in set(heldout)]
        train_pool = rest or train_pool
    train = _seeded_sample(train_pool, ev.num_train_prompts, ev.seed + 1)
    info = {
        "heldout_source": str(heldout_file) if disjoint else cfg.prompts.source,
        "train_source": str(train_file) if use_train_file else cfg.prompts.source,
        "heldout_disjoint": disjoint,
    }
    return {"heldout": heldout, "train": train}, info


def eval_items(prompts: dict[str, list[str]], images_per_prompt: int, seed: int) -> list[EvalItem]:
    return [
        EvalItem(split, i, prompt, j, noise_seed(seed, prompt, j))
        for split in SPLITS
        for i, prompt in enumerate(prompts[split])
        for j in range(images_per_prompt)
    ]


# ---------------------------------------------------------------------------------------------- rewards
def unseen_reward_specs(cfg: RunConfig) -> list[RewardSpec]:
    """`cfg.eval_rewards`, or by default every other registered reward that builds without a source (not testbed_*)."""
    if cfg.eval_rewards:
        return list(cfg.eval_rewards)
    from rewardtune.rewards import default_unseen_names

    seen = {cfg.reward.name, *(c.reward.name for c in cfg.algorithm.constraints)}
    return [RewardSpec(name=name) for name in default_unseen_names() if name not in seen]


def build_rewards(cfg: RunConfig, device: torch.device) -> dict[str, tuple[str, Any]]:
    """name -> (role, reward fn); roles: train, constraint (CDPO's auxiliaries) and unseen."""
    from rewardtune.rewards import build_reward

    rewards: dict[str, tuple[str, Any]] = {cfg.reward.name: ("train", build_reward(cfg.reward, device))}
    for constraint in cfg.algorithm.constraints:
        rewards.setdefault(constraint.reward.name, ("constraint", build_reward(constraint.reward, device)))
    explicit = bool(cfg.eval_rewards)
    for spec in unseen_reward_specs(cfg):
        if spec.name in rewards:
            continue
        try:
            rewards[spec.name] = ("unseen", build_reward(spec, device))
        except Exception as err:  # defaults only: a learned reward without a source is skipped, not fatal
            if explicit:
                raise
            log.warning("default unseen reward '%s' skipped: %s", spec.name, err)
    return rewards


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_names(run_dir: Path, checkpoint: str | None = None) -> list[str]:
    """"base" first, then every valid kept checkpoint (or only the named one), oldest first."""
    root = run_dir / "checkpoints"
    if checkpoint == BASE:
        return [BASE]
    if checkpoint is not None:
        if not (root / checkpoint).is_dir():
            found = ", ".join(p.name for p in list_checkpoints(root)) or "none"
            raise CheckpointError(f"no checkpoint {checkpoint!r} in {root} (found: {found}; or use 'base')")
        verify_checkpoint(root / checkpoint)
        return [BASE, checkpoint]
    names = [BASE]
    warn_stray_checkpoint_files(root)
    for path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("not evaluated: %s", err)
            continue
        names.append(path.name)
    return names


def require_run(run_dir: Path) -> None:
    """Refuse a `--run` that holds no training run: evaluating it would score the base model alone and exit 0."""
    from rewardtune.provenance import CONFIG_FILE

    fix = "give the --out directory of a `rewardtune train` run"
    if not run_dir.exists():
        raise RewardtuneError(f"--run {run_dir} does not exist; {fix}")
    if not run_dir.is_dir():
        raise RewardtuneError(f"--run {run_dir} is not a directory; {fix}")
    if not (run_dir / CONFIG_FILE).is_file() and not (run_dir / "checkpoints").is_dir():
        raise RewardtuneError(f"--run {run_dir} holds no run (no {CONFIG_FILE}, no checkpoints/); {fix}")


def check_trained_with(path: Path, manifest: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse a checkpoint trained on another base model or policy shape: its scores would be meaningless.

    The same fields `train --resume` refuses to change; checkpoints written before a field was recorded
    are not held to it.
    """
    meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
    lora = cfg.model.finetune == "lora"
    for key, want in (("model_source", cfg.model.source), ("finetune", cfg.model.finetune),
                      ("lora_rank", cfg.model.lora_rank if lora else None)):
        if key in meta and meta[key] != want:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={meta[key]!r}, the config has {want!r}; "
                                  "evaluate with the config the run was trained with")


def checkpoint_info(run_dir: Path, name: str) -> dict[str, Any]:
    """Epoch, kind and samples seen of a checkpoint; base is epoch 0, 0 samples."""
    from rewardtune.provenance import checkpoint_digest

    if name == BASE:
        return {"epoch": 0, "kind": BASE, "samples": 0, "digest": None}
    path = run_dir / "checkpoints" / name
    manifest = json.loads((path / "manifest.json").read_text())
    state_file = path / "trainer_state.json"
    samples = None
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path}: trainer_state.json is not a JSON object (damaged); "
                                  "evaluate another checkpoint")
        samples = state.get("samples_seen")
    return {"epoch": manifest["epochs_done"], "kind": manifest["kind"], "samples": samples,
            "digest": checkpoint_digest(manifest)}


def hardware_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------- the evaluator
def _ode_flow_family(cfg: RunConfig, device: torch.device):
    """A flow model (sd3, flux) sampled by the deterministic Euler ODE, as Flow-GRPO evaluates: from fixed
    initial noise the images depend on the policy only (no SDE noise to pair across checkpoints)."""
    from rewardtune.families.flow import FlowFamily, load_flow_pipeline, prepare_flow_policy
    from rewardtune.models import resolve_model_dir

    pipe = load_flow_pipeline(resolve_model_dir(cfg.model.source, cfg.model.revision, cfg.model.family), cfg.model.family)
    prepare_flow_policy(pipe, cfg.model, device, gradient_checkpointing=False)
    flow = cfg.sampling.flow
    return FlowFamily(pipe, noise_level=0.0, max_sequence_length=flow.max_sequence_length if flow else 256)


class Evaluator:
    """Holds one pipeline, the rewards and the embedder; `evaluate(name)` switches weights and scores."""

    def __init__(self, cfg: RunConfig, run_dir: Path, prompts_dir: Path | None, embedder: Embedder | None = None) -> None:
        from rewardtune.diffusion import encode_prompts
        from rewardtune.models import load_pipeline, prepare_policy
        from rewardtune.trainer import resolve_device

        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.device)
        self.family = None
        if cfg.model.family == "sd":
            self.pipe = load_pipeline(cfg.model)
            prepare_policy(self.pipe, cfg.model, self.device, gradient_checkpointing=False)
        else:
            self.family = _ode_flow_family(cfg, self.device)
            self.pipe = self.family.pipe
        self.policy.eval()
        self.loaded: str | None = BASE
        self.rewards = build_rewards(cfg, self.device)
        self.embedder = embedder or load_embedder(cfg.evaluation.image_tower, self.device)
        self.prompts, self.prompt_info = select_prompts(cfg, prompts_dir)
        self.items = eval_items(self.prompts, cfg.evaluation.images_per_prompt, cfg.evaluation.seed)
        if self.family is None:  # a flow family encodes the negative prompt with each batch
            self.negative = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [cfg.sampling.negative_prompt])
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision)

    @property
    def policy(self) -> torch.nn.Module:
        """The trained denoiser: the UNet (sd) or the transformer (sd3, flux)."""
        return self.pipe.unet if self.family is None else self.pipe.transformer

    def settings(self) -> dict[str, Any]:
        """Everything that makes two evaluations comparable; stored once per output directory."""
        s = self.cfg.sampling
        return {
            "evaluation": self.cfg.evaluation.model_dump(mode="json"),
            "sampling": {"num_steps": s.num_steps, "eta": s.eta, "guidance_scale": s.guidance_scale,
                         "resolution": s.resolution, "negative_prompt": s.negative_prompt},
            "model_source": self.cfg.model.source,
            **({"model_family": self.cfg.model.family, "sampler": "ode"} if self.family is not None else {}),
            "rewards": {name: role for name, (role, _) in self.rewards.items()},
            "embedding": self.embedder.name,
            "prompts": self.prompts,
            **self.prompt_info,
        }

    def load(self, name: str) -> None:
        """Put checkpoint `name`'s policy weights into the denoiser (base: adapters off; full fine-tuning: base first)."""
        from rewardtune.families.flow import load_flow_policy_weights
        from rewardtune.models import load_policy_weights

        if name == self.loaded:
            return
        model, lora = self.policy, self.cfg.model.finetune == "lora"
        if name == BASE:
            if not lora:
                raise RewardtuneError("internal: a fully fine-tuned model cannot return to base; evaluate base first")
            model.disable_adapters()
        else:
            path = self.run_dir / "checkpoints" / name
            check_trained_with(path, verify_checkpoint(path), self.cfg)
            if lora:
                model.enable_adapters()
            if self.family is None:
                load_policy_weights(model, self.cfg.model, path)
            else:
                load_flow_policy_weights(self.family, self.cfg.model.finetune, path)
        self.loaded = name

    @torch.no_grad()
    def generate(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """Images [N,3,H,W] (CPU), scores per reward [N], embeddings [N,d] and timings, for `self.items`."""
        from rewardtune.diffusion import encode_prompts, sample_trajectories
        from rewardtune.families.rollout import sample_rollout
        from rewardtune.rewards import check_finite

        s, bs = self.cfg.sampling, self.cfg.evaluation.batch_size
        images, embeds = [], []
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.rewards}
        t_gen = t_score = 0.0
        for start in range(0, len(self.items), bs):
            batch = self.items[start : start + bs]
            prompts = [item.prompt for item in batch]
            t0 = time.perf_counter()
            generators = [torch.Generator().manual_seed(item.seed) for item in batch]
            if self.family is None:
                prompt_embeds = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts)
                traj = sample_trajectories(
                    self.pipe.unet, self.pipe.vae, self.pipe.scheduler, prompt_embeds,
                    self.negative.expand(len(batch), -1, -1), num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                    eta=s.eta, resolution=s.resolution, generator=generators,  # type: ignore[arg-type]
                    autocast_dtype=self.autocast_dtype,
                )
            else:
                traj = sample_rollout(
                    self.family, self.family.encode(prompts, s.negative_prompt), num_steps=s.num_steps,
                    guidance_scale=s.guidance_scale, resolution=s.resolution, generator=generators,  # type: ignore[arg-type]
                    autocast_dtype=self.autocast_dtype,
                )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            for name, (_, fn) in self.rewards.items():
                scores[name].append(check_finite(name, fn(traj.images, prompts).float(), prompts).cpu())
            embeds.append(self.embedder.embed(traj.images).float().cpu())
            t_score += time.perf_counter() - t1
            t_gen += t1 - t0
            images.append(traj.images.float().cpu())
        timing = {"generation_s": t_gen, "scoring_s": t_score, "images": len(self.items),
                  "images_per_s": len(self.items) / max(t_gen + t_score, 1e-9)}
        return torch.cat(images), {k: torch.cat(v) for k, v in scores.items()}, torch.cat(embeds), timing


def _per_prompt(items: list[EvalItem], values: np.ndarray, split: str) -> dict[int, np.ndarray]:
    groups: dict[int, list[int]] = {}
    for row, item in enumerate(items):
        if item.split == split:
            groups.setdefault(item.index, []).append(row)
    return {index: values[rows] for index, rows in groups.items()}


def checkpoint_metrics(
    items: list[EvalItem],
    scores: dict[str, torch.Tensor],
    roles: dict[str, str],
    embeddings: torch.Tensor,
    base_embeddings: torch.Tensor,
) -> dict[str, Any]:
    """The per-checkpoint numbers; every statistic is over prompts (each prompt's mean over its images).

    rewards[name] = {role, heldout, train}; diversity / drift = {heldout, train}; each split is
    {mean, std, ci95: [lo, hi], n} or None (no prompts in that split, or diversity with 1 image per prompt).
    diversity: per prompt, the mean pairwise cosine distance of its images' embeddings.
    drift: per prompt, the mean over images of 1 − cos(embedding, base model's embedding, same prompt and seed).
    """
    out: dict[str, Any] = {"rewards": {}, "diversity": {}, "drift": {}}
    for name, values in scores.items():
        entry: dict[str, Any] = {"role": roles[name]}
        for split in SPLITS:
            groups = _per_prompt(items, values.double().numpy(), split)
            entry[split] = summary_stats([g.mean() for g in groups.values()]) if groups else None
        out["rewards"][name] = entry
    emb = embeddings.double()
    drift = (1 - (emb * base_embeddings.double()).sum(dim=1)).numpy()
    for split in SPLITS:
        rows = _per_prompt(items, np.arange(len(items)), split)
        diversity = [d for r in rows.values() if (d := pairwise_cosine_distance(emb[r])) is not None]
        out["diversity"][split] = summary_stats(diversity) if diversity else None
        out["drift"][split] = summary_stats([drift[r].mean() for r in rows.values()]) if rows else None
    return out


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def image_grid(images: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Images row-major into a grid with a white `pad`-pixel gutter."""
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for k, image in enumerate(images):
        grid.paste(image, (pad + (k % columns) * (w + pad), pad + (k // columns) * (h + pad)))
    return grid


def image_filename(item: EvalItem) -> str:
    return f"{item.split}-{item.index:03d}-{item.image:02d}.png"


def _write_outputs(ev: Evaluator, name: str, final: Path, images: torch.Tensor, scores: dict[str, torch.Tensor],
                   embeddings: torch.Tensor, metrics: dict[str, Any]) -> Path:
    """Images, samples, embeddings, grid, metrics.json into a temporary directory, then one rename into place."""
    out = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    pil = [_to_pil(image) for image in images]
    for item, image in zip(ev.items, pil, strict=True):
        image.save(out / "images" / image_filename(item))
    lines = [json.dumps({"split": it.split, "index": it.index, "prompt": it.prompt, "image": it.image, "seed": it.seed,
                         **{r: float(v[k]) for r, v in scores.items()}}) for k, it in enumerate(ev.items)]
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in lines))
    np.save(out / "embeddings.npy", embeddings.numpy())
    shown = [k for k, it in enumerate(ev.items) if it.split == "heldout" and it.index < ev.cfg.evaluation.grid_prompts]
    image_grid([pil[k] for k in shown], ev.cfg.evaluation.images_per_prompt).save(out / "grid.png")
    fault_point("eval_write")
    write_json_atomic(out / "metrics.json", metrics)
    if final.exists():  # an incomplete directory from an older layout: never trusted, replaced whole
        shutil.rmtree(final)
    os.replace(out, final)
    return final / "metrics.json"


def remove_stale_results(out_dir: Path) -> None:
    """Delete what a killed evaluation left: its temporary directories, and result dirs without metrics.json."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        result_dir = path.name == BASE or path.name.startswith("epoch-")
        if path.is_dir() and (path.name.startswith(".tmp-") or (result_dir and not (path / "metrics.json").is_file())):
            log.warning("removing incomplete evaluation output %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    path = out_dir / "eval_settings.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(settings)):
            raise RewardtuneError(
                f"{out_dir} holds an evaluation with other settings (prompts, seeds, rewards, sampling or embedding); "
                "choose a new --out, or delete it to re-evaluate"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


def evaluate_run(
    cfg: RunConfig,
    run_dir: Path,
    prompts_dir: Path | None,
    out_dir: Path,
    checkpoint: str | None = None,
    *,
    embedder: Embedder | None = None,
) -> list[Path]:
    """Evaluate base and every kept checkpoint of `run_dir` (or base and `checkpoint`); returns their metrics.json paths.

    A checkpoint whose metrics.json exists is skipped (resumable). Base is always evaluated first: drift is
    measured against its embeddings.
    """
    from rewardtune.provenance import check_evaluation_of, evaluation_provenance

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    prompts_dir = Path(prompts_dir) if prompts_dir is not None else None
    require_run(run_dir)
    names = checkpoint_names(run_dir, checkpoint)
    if names == [BASE] and checkpoint != BASE:
        raise CheckpointError(f"--run {run_dir} holds no valid checkpoint to evaluate; train it first (or resume it), "
                              "or pass --checkpoint base to evaluate the base model alone")
    for name in names[1:]:  # before any work: a mismatch must not cost a base-model evaluation first
        path = run_dir / "checkpoints" / name
        check_trained_with(path, verify_checkpoint(path), cfg)
    infos = {name: checkpoint_info(run_dir, name) for name in names}  # a damaged state file refuses here too
    remove_stale_results(out_dir)
    if out_dir.is_dir():  # results already there (skipped below) must be of this run and these checkpoints
        check_evaluation_of(run_dir, read_evaluations(out_dir), "--out", out_dir)
    provenance = evaluation_provenance(run_dir, cfg.model.source, cfg.model.revision)
    todo = [n for n in names if not (out_dir / n / "metrics.json").is_file()]
    paths = [out_dir / n / "metrics.json" for n in names]
    for name in names:
        if name not in todo:
            log.info("checkpoint %s already evaluated; skipped", name)
    if not todo:
        return paths
    ev = Evaluator(cfg, run_dir, prompts_dir, embedder)
    _check_settings(out_dir, ev.settings())
    roles = {name: role for name, (role, _) in ev.rewards.items()}
    base_embeddings = None
    if BASE not in todo:
        base_embeddings = torch.from_numpy(np.load(out_dir / BASE / "embeddings.npy"))
    for name in todo:
        ev.load(name)
        log.info("evaluating %s on %d images", name, len(ev.items))
        images, scores, embeddings, timing = ev.generate()
        if base_embeddings is None:
            base_embeddings = embeddings
        metrics = {
            "checkpoint": name,
            **infos[name],
            "train_reward": cfg.reward.name,
            "run": provenance,
            "embedding": ev.embedder.name,
            "images_per_prompt": cfg.evaluation.images_per_prompt,
            "num_prompts": {split: len(ev.prompts[split]) for split in SPLITS},
            **ev.prompt_info,
            **checkpoint_metrics(ev.items, scores, roles, embeddings, base_embeddings),
            "timing": timing,
            "hardware": hardware_info(ev.device),
        }
        _write_outputs(ev, name, out_dir / name, images, scores, embeddings, metrics)
        fault_point("eval_checkpoint")
    from rewardtune.tracking import log_evaluation

    log_evaluation(cfg, run_dir, out_dir, [json.loads((out_dir / n / "metrics.json").read_text()) for n in todo])
    return paths


def read_evaluations(eval_dir: Path) -> list[dict[str, Any]]:
    """Every metrics.json under `eval_dir`, base first, then by samples seen, epoch and name.

    Each is checked for the fields export and report read (`check_record`) and for the same training reward
    and reward names as the others: a damaged or hand-edited file is one line naming it, not a KeyError later.
    """
    records = []
    for path in sorted(Path(eval_dir).glob("*/metrics.json")):
        if path.parent.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            raise RewardtuneError(f"evaluation {path} cannot be read ({type(err).__name__}); {_REDO}") from None
        check_record(record, path)
        records.append(record)
    for record in records[1:]:
        first = records[0]
        if (record["train_reward"], set(record["rewards"])) != (first["train_reward"], set(first["rewards"])):
            raise RewardtuneError(f"evaluation {eval_dir}: {record['checkpoint']} and {first['checkpoint']} were scored "
                                  f"on different rewards (two evaluations mixed in one directory?); {_REDO}")
    return sorted(records, key=lambda r: (r["checkpoint"] != BASE, r.get("samples") or 0, r["epoch"], r["checkpoint"]))


_REDO = "evaluate the run again into a new --out"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_stats(stats: Any) -> bool:
    """A {mean, std, ci95: [lo, hi], n} entry, or None (no prompts in that split)."""
    if stats is None:
        return True
    return (isinstance(stats, dict) and all(_is_number(stats.get(k)) for k in ("mean", "std", "n"))
            and isinstance(stats.get("ci95"), list) and len(stats["ci95"]) == 2 and all(map(_is_number, stats["ci95"])))


def check_record(record: Any, path: Path) -> None:
    """Refuse a metrics.json without the structure `evaluate_run` writes (the fields export and report read)."""
    def bad(what: str) -> RewardtuneError:
        return RewardtuneError(f"evaluation {path} is damaged ({what}); {_REDO}")

    if not isinstance(record, dict):
        raise bad("not a JSON object")
    if record.get("checkpoint") != path.parent.name:
        raise bad(f"its checkpoint {record.get('checkpoint')!r} is not its directory's name {path.parent.name!r}")
    if not _is_number(record.get("epoch")) or not isinstance(record.get("train_reward"), str):
        raise bad("no epoch or train_reward")
    rewards = record.get("rewards")
    if not isinstance(rewards, dict) or record["train_reward"] not in rewards:
        raise bad("no rewards entry for its training reward")
    for name, entry in rewards.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("role"), str)
                or not all(_check_stats(entry.get(split)) for split in SPLITS)
                or all(entry.get(split) is None for split in SPLITS)):
            raise bad(f"reward {name!r} has no valid role/heldout/train statistics")
    for kind in ("diversity", "drift"):
        entry = record.get(kind)
        if not isinstance(entry, dict) or not all(_check_stats(entry.get(split)) for split in SPLITS):
            raise bad(f"no valid {kind} statistics")
    timing, counts = record.get("timing"), record.get("num_prompts")
    if not isinstance(timing, dict) or not _is_number(timing.get("images_per_s")):
        raise bad("no timing.images_per_s")
    if not isinstance(counts, dict) or not all(isinstance(counts.get(split), int) for split in SPLITS):
        raise bad("no num_prompts per split")
    if not isinstance(record.get("embedding"), str) or not isinstance(record.get("hardware", {}), dict):
        raise bad("no embedding name or a non-object hardware entry")
    if not isinstance(record.get("samples") or 0, int) or not isinstance(record.get("run", {}), dict):
        raise bad("samples is not a count or run is not an object")
