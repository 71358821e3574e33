"""The proxy reward a user would actually have: a small CNN fitted to a limited, noisy set of gold labels.

Training set: `num_labels` images near the base model's distribution (samples of the pretrained model on
training prompts, plus jittered world renders), each labelled with the gold aesthetic plus Gaussian noise
(std `label_noise`), like human ratings. In distribution it tracks gold (Spearman reported on fresh,
exactly-labelled base-model samples); off distribution it has whatever flaws its few hundred labels left,
which reward optimization then finds.

Files of a proxy directory (a model source like any other: a path, or a cache entry with a manifest):
`proxy.safetensors` (weights) and `testbed_proxy.json` (architecture + training summary).
The CNN's pooled features double as the image tower of TDPO's critic (the reward's own tower, as for
PickScore/HPSv2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.cache import ModelRef, resolve_local
from rewardtune.errors import RewardError
from rewardtune.rewards import register, register_sources, register_tower, register_tower_loader
from rewardtune.safe_paths import apply_umask

log = logging.getLogger(__name__)
WEIGHTS = "proxy.safetensors"
CONFIG = "testbed_proxy.json"


class ProxyCNN(nn.Module):
    """Three strided convs, global average pool, a 2-layer head; `features` feeds the critic."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 32), nn.ReLU(), nn.Linear(32, 1))

    @property
    def dim(self) -> int:
        return 4 * self.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,32,32] in [0,1] -> [B, 4*width]: mean and max pooled conv features."""
        h = self.convs(images * 2 - 1)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(-1)


def _to32(images: torch.Tensor) -> torch.Tensor:
    x = images.float().clamp(0, 1)
    return x if x.shape[-2:] == (32, 32) else F.interpolate(x, size=(32, 32), mode="area")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), by scipy.stats."""
    import scipy.stats

    return float(scipy.stats.spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------- loading
def load_proxy(source: str, device: torch.device | str = "cpu") -> ProxyCNN:
    """Load a proxy directory (local path or cache URI, sha256-verified by the cache when cached)."""
    directory = resolve_local(source)
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise RewardError(f"{directory} is not a testbed proxy (no {CONFIG}); build one with `rewardtune testbed pretrain`")
    from safetensors.torch import load_file

    cfg = json.loads(cfg_path.read_text())
    model = ProxyCNN(int(cfg["width"]))
    model.load_state_dict(load_file(directory / WEIGHTS), strict=True)
    return model.to(device).eval().requires_grad_(False)


def default_source() -> str:
    from rewardtune.testbed.assets import proxy_dir

    return str(proxy_dir())


# Unseen rewards for the cross-reward table (issue 31, the papers' ImageReward/HPSv2/PickScore analogue):
# proxies trained independently of the training proxy, on other labels, capacity and data. Built by
# benchmarks/overopt/build_unseen_proxies.py into data/testbed/<dir>; the policy never trains on them.
UNSEEN_PROXIES: dict[str, dict[str, Any]] = {
    "testbed_proxy_b": {"dir": "proxy_b", "seed": 11, "width": 32, "num_samples": 512, "num_renders": 0,
                        "label_noise": 0.1},   # twice the width, other labels, noisier, model samples only
    "testbed_proxy_c": {"dir": "proxy_c", "seed": 12, "width": 8, "num_samples": 0, "num_renders": 512,
                        "label_noise": 0.02},  # a narrow CNN on world renders only: another data distribution
}


def unseen_source(name: str) -> str:
    from rewardtune.testbed.assets import ASSETS

    return str(ASSETS / UNSEEN_PROXIES[name]["dir"])


class Proxy:
    name = "testbed_proxy"

    def __init__(self, model: ProxyCNN) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(_to32(images.to(device)))


@register_sources("testbed_proxy")
def _sources(spec) -> list[ModelRef]:
    return [ModelRef(spec.source or default_source())]


@register("testbed_proxy")
def _build(spec, device: torch.device) -> Proxy:
    return Proxy(load_proxy(spec.source or default_source(), device))


@register_tower("testbed_proxy")
def _tower(spec) -> str:
    return spec.source or default_source()


def _is_proxy_dir(directory: Path) -> bool:
    return (directory / CONFIG).is_file()


@register_tower_loader(_is_proxy_dir)
def proxy_tower(directory: Path, device: torch.device, dtype: torch.dtype):
    """The proxy's pooled conv features as a frozen image tower (L2-normalized by ClipImageTower)."""
    from rewardtune.rewards.towers import ClipImageTower

    model = load_proxy(str(directory), device).to(dtype)
    return ClipImageTower(model.features, model.dim, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), device, dtype, model)


# ------------------------------------------------------------------------------------------- training
def label_images(pipe: Any, num_samples: int, num_renders: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Base-model samples of random training prompts plus jittered renders: the proxy's image pool."""
    from rewardtune.testbed.pretrain import sample_images
    from rewardtune.testbed.world import render_batch, split_specs

    train_specs, _ = split_specs()
    rng = np.random.default_rng(seed)
    prompts = [train_specs[i].prompt for i in rng.integers(len(train_specs), size=num_samples)]
    sampled = sample_images(pipe, prompts, seed, steps, guidance) if num_samples else torch.zeros(0, 3, 32, 32)
    if not num_renders:
        return sampled
    rendered = render_batch([train_specs[i] for i in rng.integers(len(train_specs), size=num_renders)], seed)
    return torch.cat([sampled, torch.from_numpy(rendered)])


def gold_scores(images: torch.Tensor) -> np.ndarray:
    from rewardtune.testbed.gold import gold_aesthetic

    return np.array([gold_aesthetic(im) for im in images.double().numpy()])


def train_proxy(images: torch.Tensor, labels: np.ndarray, seed: int, epochs: int = 150, width: int = 16,
                lr: float = 3e-3, batch: int = 32) -> ProxyCNN:
    """Plain MSE regression with light weight decay; no augmentation (its blind spots are the point)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ProxyCNN(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    y = torch.tensor(labels, dtype=torch.float32)
    n = len(images)
    total = epochs * math.ceil(n / batch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            loss = F.mse_loss(model(images[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return model.eval().requires_grad_(False)


def build_proxy(pipe: Any, out: str | Path, *, seed: int = 0, num_samples: int = 256, num_renders: int = 128,
                label_noise: float = 0.05, eval_samples: int = 128, steps: int = 10, guidance: float = 4.0,
                epochs: int = 150, width: int = 16) -> dict[str, Any]:
    """Label, fit, measure (Spearman vs exact gold on fresh base-model samples) and save a proxy to `out`."""
    from safetensors.torch import save_file

    images = label_images(pipe, num_samples, num_renders, seed + 100, steps, guidance)
    gold = gold_scores(images)
    noisy = gold + np.random.default_rng(seed + 7).normal(0.0, label_noise, len(gold))
    model = train_proxy(images, noisy, seed, epochs=epochs, width=width)
    fresh = label_images(pipe, eval_samples, 0, seed + 200, steps, guidance)
    with torch.no_grad():
        pred_fresh = model(fresh).numpy()
        pred_train = model(images).numpy()
    summary = {
        "width": model.width,
        "num_labels": len(images),
        "num_base_samples": num_samples,
        "num_renders": num_renders,
        "label_noise": label_noise,
        "epochs": epochs,
        "seed": seed,
        "spearman_train": spearman(pred_train, gold),
        "spearman_heldout_base_samples": spearman(pred_fresh, gold_scores(fresh)),
        "heldout_samples": eval_samples,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():
            raise FileExistsError(f"{out} already exists")
        apply_umask(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


class ShuffledProxy(Proxy):
    """The proxy's scores of a batch, permuted across its images: the same reward distribution with no link
    to what an image shows. DDPO trained on it measures generic drift (the shuffled-proxy control of the
    overoptimization benchmark), separating it from proxy hacking. The permutation is seeded by the scores
    themselves, so the same batch always gets the same permutation (reproducible and resumable)."""

    name = "testbed_proxy_shuffled"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = super().__call__(images, prompts)
        digest = int.from_bytes(hashlib.sha256(np.round(scores.double().cpu().numpy(), 6).tobytes()).digest()[:8], "little")
        order = np.random.default_rng(digest).permutation(len(scores))
        return scores[torch.as_tensor(order, device=scores.device)]


@register_sources("testbed_proxy_shuffled")
def _shuffled_sources(spec) -> list[ModelRef]:
    return [ModelRef(spec.source or default_source())]


@register("testbed_proxy_shuffled")
def _build_shuffled(spec, device: torch.device) -> ShuffledProxy:
    return ShuffledProxy(load_proxy(spec.source or default_source(), device))


@register_tower("testbed_proxy_shuffled")
def _shuffled_tower(spec) -> str:
    return spec.source or default_source()


class NamedProxy(Proxy):
    """One of the unseen proxies: the same CNN reward under its own name."""

    def __init__(self, model: ProxyCNN, name: str) -> None:
        super().__init__(model)
        self.name = name


def _register_unseen(name: str) -> None:
    register_sources(name)(lambda spec: [ModelRef(spec.source or unseen_source(name))])
    register(name)(lambda spec, device: NamedProxy(load_proxy(spec.source or unseen_source(name), device), name))
    register_tower(name)(lambda spec: spec.source or unseen_source(name))


for _name in UNSEEN_PROXIES:
    _register_unseen(_name)
