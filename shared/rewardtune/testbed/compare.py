"""`rewardtune testbed compare`: DDPO / TDPO / TDPO-R / CDPO on the proxy, judged by gold and fidelity.

Every (algorithm, seed) run uses the same config (configs/testbed.yaml by default) with only
`algorithm.name` and `training.seed` changed, so the sample budget (epochs x images per epoch) is equal.
CDPO gets a constraint on prompt fidelity (`testbed_fidelity`, relative to the base model's epoch-0
mean), the auxiliary reward a user has at train time; gold stays unseen by every method. Each run is
evaluated with `rewardtune.evaluate` on the world's held-out prompt combinations; the comparison report
(`comparison.md`, `comparison.html`, `comparison.json`) aggregates over seeds:

- proxy-vs-gold curves (Gao et al. 2022 style: held-out gold against held-out proxy, per checkpoint);
- gold at best proxy: gold at the checkpoint with the highest held-out proxy (base included);
- gold at equal proxy: gold where each run's proxy curve first reaches the proxy gain that *every* run
  reached (linear interpolation between checkpoints), so methods are compared at the same optimization;
- fidelity and diversity over training, reset events (TDPO-R), CDPO multipliers.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewardtune.config import ConstraintConfig, RewardSpec, RunConfig, load_config
from rewardtune.evaluate import BASE, evaluate_run, read_evaluations
from rewardtune.metrics import MetricsLog

log = logging.getLogger(__name__)
PROXY, GOLD, FIDELITY = "testbed_proxy", "testbed_gold", "testbed_fidelity"
SPLIT = "heldout"
ALGORITHMS = ("ddpo", "tdpo", "tdpo_r", "cdpo")
LABELS = {"ddpo": "DDPO", "tdpo": "TDPO", "tdpo_r": "TDPO-R", "cdpo": "CDPO"}


def default_config_path() -> Path:
    return Path(__file__).resolve().parents[3] / "configs" / "testbed.yaml"


def write_prompts(out: Path) -> Path:
    """train.txt = the world's pretraining combinations, heldout.txt = the combinations never pretrained on."""
    from rewardtune.testbed.world import split_specs

    train, heldout = split_specs()
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n".join(s.prompt for s in train) + "\n")
    (out / "heldout.txt").write_text("\n".join(s.prompt for s in heldout) + "\n")
    return out


def run_config(base: RunConfig, algorithm: str, seed: int, prompts_file: Path, fidelity_margin: float,
               checkpoint_every: int = 2) -> RunConfig:
    """The base config with only the algorithm and the seed changed (plus CDPO's fidelity constraint and
    a checkpoint every `checkpoint_every` epochs, the points of the curves)."""
    data = base.model_dump(mode="json")
    data["algorithm"]["name"] = algorithm
    data["algorithm"]["constraints"] = []
    if algorithm == "cdpo":
        constraint = ConstraintConfig(reward=RewardSpec(name=FIDELITY), relative_margin=fidelity_margin)
        data["algorithm"]["constraints"] = [constraint.model_dump(mode="json")]
    data["training"]["seed"] = seed
    data["prompts"]["source"] = str(prompts_file)
    data["checkpointing"]["keep_last"] = 10_000  # every checkpoint is a point on the curves
    data["checkpointing"]["every_epochs"] = checkpoint_every
    data["logging"]["progress_bars"] = False
    return RunConfig.model_validate(data)


def run_one(cfg: RunConfig, run_dir: Path, eval_dir: Path, prompts_dir: Path) -> dict[str, float]:
    """Train (resuming a partial run) and evaluate one run; returns wall seconds of each phase."""
    from rewardtune.trainer import Trainer

    t0 = time.perf_counter()
    done = run_dir / "metrics.jsonl"
    finished = done.is_file() and len(MetricsLog(done).read()) >= cfg.training.epochs
    if not finished:
        Trainer(cfg, run_dir).run(resume=run_dir.exists())
    t1 = time.perf_counter()
    evaluate_run(cfg, run_dir, prompts_dir, eval_dir)
    return {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}


# ------------------------------------------------------------------------------------------- aggregation
def _series(evals: list[dict[str, Any]], reward: str) -> list[float]:
    return [e["rewards"][reward][SPLIT]["mean"] for e in evals]


def _policy_evals(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per distinct policy: a post-reset checkpoint has the pre-reset policy (only the critic changed)."""
    return [e for e in evals if not str(e["checkpoint"]).endswith("post-reset")]


def run_curves(run_dir: Path, eval_dir: Path, unseen: Sequence[str] = ()) -> dict[str, Any]:
    """Per checkpoint: held-out proxy, gold, fidelity, diversity, drift and each `unseen` reward; the training log's
    per-epoch proxy, resets and λ."""
    evals = _policy_evals(read_evaluations(eval_dir))
    train = MetricsLog(run_dir / "metrics.jsonl").read()
    curves = {
        "checkpoint": [e["checkpoint"] for e in evals],
        "samples": [0 if e["checkpoint"] == BASE else int(e.get("samples") or 0) for e in evals],
        "proxy": _series(evals, PROXY),
        "gold": _series(evals, GOLD),
        "fidelity": _series(evals, FIDELITY),
        "diversity": [(e["diversity"][SPLIT] or {}).get("mean") for e in evals],
        "drift": [(e["drift"][SPLIT] or {}).get("mean") for e in evals],
        "train_samples": [r["samples"] for r in train],
        "train_proxy": [r["reward_mean"] for r in train],
        "reset_epochs": [r["epoch"] for r in train if r.get("reset")],
        "neurons_reset": [r.get("neurons_reset", 0) for r in train if r.get("reset")],
        "lambda": [r.get(f"lambda_{FIDELITY}") for r in train],
    }
    if unseen:
        curves["unseen"] = {name: _series(evals, name) for name in unseen}
    return curves


def gold_at_best_proxy(c: dict[str, Any]) -> tuple[float, float]:
    """(gold, proxy) at the checkpoint with the highest held-out proxy; ties go to the earliest."""
    best = max(range(len(c["proxy"])), key=lambda i: (c["proxy"][i], -i))
    return c["gold"][best], c["proxy"][best]


def gold_at_proxy_gain(c: dict[str, Any], gain: float) -> float | None:
    """Gold where the proxy first reaches base + gain, linearly interpolated between checkpoints."""
    proxy, gold = c["proxy"], c["gold"]
    target = proxy[0] + gain
    if gain <= 0:
        return gold[0]
    for i in range(1, len(proxy)):
        if proxy[i] >= target:
            lo, hi = proxy[i - 1], proxy[i]
            w = 1.0 if hi == lo else min(1.0, max(0.0, (target - lo) / (hi - lo)))
            return gold[i - 1] + w * (gold[i] - gold[i - 1])
    return None


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": values}


def aggregate(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per algorithm, over seeds: the headline numbers of the comparison (see the module docstring)."""
    all_runs = [c for runs in curves.values() for c in runs]
    common_gain = min(max(p - c["proxy"][0] for p in c["proxy"]) for c in all_runs)
    out: dict[str, Any] = {"equal_proxy_gain": common_gain, "algorithms": {}}
    for alg, runs in curves.items():
        best = [gold_at_best_proxy(c) for c in runs]
        out["algorithms"][alg] = {
            "seeds": len(runs),
            "proxy_base": _mean_std([c["proxy"][0] for c in runs]),
            "proxy_final": _mean_std([c["proxy"][-1] for c in runs]),
            "proxy_best": _mean_std([b[1] for b in best]),
            "gold_base": _mean_std([c["gold"][0] for c in runs]),
            "gold_final": _mean_std([c["gold"][-1] for c in runs]),
            "gold_max": _mean_std([max(c["gold"]) for c in runs]),
            "gold_at_best_proxy": _mean_std([b[0] for b in best]),
            "gold_at_equal_proxy": _mean_std([gold_at_proxy_gain(c, common_gain) for c in runs]),
            "fidelity_base": _mean_std([c["fidelity"][0] for c in runs]),
            "fidelity_final": _mean_std([c["fidelity"][-1] for c in runs]),
            "diversity_base": _mean_std([c["diversity"][0] for c in runs]),
            "diversity_final": _mean_std([c["diversity"][-1] for c in runs]),
            "resets": _mean_std([float(len(c["reset_epochs"])) for c in runs]),
            "lambda_final": _mean_std([c["lambda"][-1] if c["lambda"] and c["lambda"][-1] is not None else None
                                       for c in runs]),
        }
    return out


# ------------------------------------------------------------------------------------------- report
def _fmt(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = [
        ("proxy: base → final", lambda a: f"{_fmt(a['proxy_base'])} → {_fmt(a['proxy_final'])}"),
        ("proxy: best", lambda a: _fmt(a["proxy_best"])),
        ("gold: base → final", lambda a: f"{_fmt(a['gold_base'])} → {_fmt(a['gold_final'])}"),
        ("gold at best proxy", lambda a: _fmt(a["gold_at_best_proxy"])),
        (f"gold at equal proxy (+{summary['equal_proxy_gain']:.3f})", lambda a: _fmt(a["gold_at_equal_proxy"])),
        ("gold: max over checkpoints", lambda a: _fmt(a["gold_max"])),
        ("fidelity: base → final", lambda a: f"{_fmt(a['fidelity_base'])} → {_fmt(a['fidelity_final'])}"),
        ("diversity: base → final", lambda a: f"{_fmt(a['diversity_base'])} → {_fmt(a['diversity_final'])}"),
        ("reset events", lambda a: _fmt(a["resets"])),
        ("CDPO λ (fidelity), final", lambda a: _fmt(a["lambda_final"])),
    ]
    algs = list(summary["algorithms"])
    lines = ["# Testbed comparison: " + " vs ".join(LABELS.get(a, a) for a in algs), "",
             f"{meta['seeds']} seed(s) per method, {meta['epochs']} epochs × {meta['images_per_epoch']} images "
             f"= {meta['epochs'] * meta['images_per_epoch']} proxy queries per run; held-out prompt combinations "
             f"({meta['heldout_prompts']} evaluated × {meta['images_per_prompt']} images, fixed noise). "
             "Mean ± sample std over seeds.", "",
             "| | " + " | ".join(LABELS.get(a, a) for a in algs) + " |", "|---|" + "---|" * len(algs)]
    for title, fn in rows:
        lines.append(f"| {title} | " + " | ".join(fn(summary["algorithms"][a]) for a in algs) + " |")
    lines += ["", f"Wall time: {meta['wall_s']:.0f} s on {meta['device']} ({meta['threads']} thread(s)).", ""]
    return "\n".join(lines)


def plots_html(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Proxy-vs-gold, gold/fidelity/diversity vs samples, training proxy with resets, CDPO λ (inline PNGs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report extra is optional; the tables still carry every number
        return "<p>(matplotlib is not installed: no plots)</p>"
    from rewardtune.report import COLORS, _png

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("proxy", "gold", "held-out proxy", "held-out gold"), ("samples", "gold", "samples", "held-out gold"),
              ("samples", "proxy", "samples", "held-out proxy"), ("samples", "fidelity", "samples", "held-out fidelity"),
              ("samples", "diversity", "samples", "held-out diversity")]
    for ax, (xk, yk, xl, yl) in zip(axes.flat, panels, strict=False):
        for i, (alg, runs) in enumerate(curves.items()):
            color = COLORS[i % len(COLORS)]
            for j, c in enumerate(runs):
                xs, ys = c[xk], c[yk]
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "-o", ms=2.5, lw=1, alpha=0.75, color=color,
                            label=LABELS.get(alg, alg) if j == 0 else None)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    ax = axes.flat[5]
    for i, (alg, runs) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        for j, c in enumerate(runs):
            ax.plot(c["train_samples"], c["train_proxy"], lw=1, alpha=0.75, color=color,
                    label=LABELS.get(alg, alg) if j == 0 else None)
            for epoch in c["reset_epochs"]:
                ax.axvline(c["train_samples"][epoch], color=color, ls=":", lw=0.8)
    ax.set_xlabel("samples")
    ax.set_ylabel("training proxy (epoch mean); dotted: resets")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    parts = [f'<figure class=plot><img src="data:image/png;base64,{_png(fig)}"></figure>']
    lam = [(alg, c) for alg, runs in curves.items() for c in runs if any(v is not None for v in c["lambda"])]
    if lam:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for alg, c in lam:
            ax.plot(c["train_samples"], [v or 0.0 for v in c["lambda"]], lw=1, label=LABELS.get(alg, alg))
        ax.set_xlabel("samples")
        ax.set_ylabel("CDPO λ (fidelity constraint)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        parts.append(f'<figure class=plot><img src="data:image/png;base64,{_png(fig)}"></figure>')
    return "".join(parts)


def write_report(out: Path, curves: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    from rewardtune.report import CSS

    summary = aggregate(curves)
    md = markdown(summary, meta)
    (out / "comparison.md").write_text(md)
    (out / "comparison.json").write_text(json.dumps({"meta": meta, "summary": summary, "curves": curves}, indent=1))
    table = html.escape(md)
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>testbed comparison</title><style>{CSS}"
            f"</style></head><body><h1>Testbed comparison</h1><pre>{table}</pre>{plots_html(curves)}</body></html>")
    (out / "comparison.html").write_text(page)
    return summary


def compare(out: str | Path, algorithms: list[str], seeds: int, config: str | Path | None = None,
            overrides: list[str] | None = None, fidelity_margin: float = 0.05, checkpoint_every: int = 2) -> dict[str, Any]:
    """Run every (algorithm, seed), evaluate, and write the comparison report into `out`."""
    import torch

    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        from rewardtune.errors import RewardtuneError

        raise RewardtuneError(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(config or default_config_path(), overrides)
    prompts_dir = write_prompts(out / "prompts")
    start = time.perf_counter()
    curves: dict[str, list[dict[str, Any]]] = {}
    timing: dict[str, dict[str, float]] = {}
    for algorithm in algorithms:
        curves[algorithm] = []
        for seed in range(seeds):
            name = f"{algorithm}-seed{seed}"
            cfg = run_config(base, algorithm, seed, prompts_dir / "train.txt", fidelity_margin, checkpoint_every)
            log.info("run %s", name)
            timing[name] = run_one(cfg, out / "runs" / name, out / "evals" / name, prompts_dir)
            curves[algorithm].append(run_curves(out / "runs" / name, out / "evals" / name))
    meta = {
        "algorithms": algorithms, "seeds": seeds, "epochs": base.training.epochs,
        "images_per_epoch": base.sampling.batch_size * base.sampling.batches_per_epoch,
        "heldout_prompts": base.evaluation.num_heldout_prompts, "images_per_prompt": base.evaluation.images_per_prompt,
        "wall_s": time.perf_counter() - start, "timing": timing, "device": base.device,
        "threads": torch.get_num_threads(), "fidelity_margin": fidelity_margin, "checkpoint_every": checkpoint_every,
    }
    return write_report(out, curves, meta)
