"""The run report: one self-contained HTML file (inline CSS, plots as inline base64 PNG, no external
requests), a short Markdown summary, and the headline numbers as a flat dict for KFP `Metrics`.

Given several runs (e.g. DDPO vs TDPO-R vs CDPO on the same prompts, rewards and seeds) every plot
overlays them, one colour per run, and the tables get one row or section per run.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardtune.checkpoint import write_text_atomic
from rewardtune.evaluate import BASE, read_evaluations
from rewardtune.indicators import DEFINITIONS, summarize
from rewardtune.metrics import MetricsLog
from rewardtune.provenance import check_evaluation_of

SPLIT = "heldout"  # the indicators and headline numbers are computed on the held-out prompts
TRAIN_CURVES = ["reward_mean", "reward_std", "approx_kl", "clipfrac", "loss", "critic_loss",
                "value_explained_variance", "neurons_dormant", "neurons_active"]
CURVE_PREFIXES = ("lambda_", "constraint_", "threshold_")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
background:#fff}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;
font-size:.9em}th{background:#f3f3f3}td.l,th.l{text-align:left}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:.8em}
figure.plot img{max-width:100%}.note{background:#fff6d6;border-left:4px solid #e0b000;padding:6px 10px}
img.cell{width:96px;height:96px;image-rendering:pixelated}dt{font-weight:bold;margin-top:6px}
"""


@dataclass
class RunData:
    label: str
    run_dir: Path
    eval_dir: Path
    config_text: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]


def load_run(run_dir: Path, eval_dir: Path, label: str) -> RunData:
    config = run_dir / "config.yaml"
    evals = read_evaluations(eval_dir)
    if not evals:
        raise ValueError(f"{eval_dir} holds no evaluated checkpoint (*/metrics.json); run `rewardtune evaluate` first")
    check_evaluation_of(run_dir, evals, "--eval", eval_dir)
    try:  # shown as text in the report: a damaged file shows as what it is, not a crash
        config_text = config.read_bytes().decode("utf-8", errors="replace") if config.is_file() else None
    except OSError:
        config_text = None
    return RunData(label, run_dir, eval_dir, config_text or "(no readable config.yaml in run dir)",
                   MetricsLog(run_dir / "metrics.jsonl").read(), evals)


# ---------------------------------------------------------------------------------------------- numbers
def reward_series(run: RunData, reward: str, split: str = SPLIT) -> list[float]:
    return [e["rewards"][reward][split]["mean"] for e in run.evals]


def unseen_rewards(run: RunData) -> list[str]:
    return [name for name, entry in run.evals[0]["rewards"].items() if entry["role"] == "unseen"]


def run_indicators(run: RunData) -> dict[str, Any]:
    train = run.evals[0]["train_reward"]
    names = [e["checkpoint"] for e in run.evals]
    rewards = [train, *unseen_rewards(run)]
    return summarize(names, train, {r: reward_series(run, r) for r in rewards}, unseen_rewards(run))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline(run: RunData, indicators: dict[str, Any]) -> dict[str, float]:
    """The few numbers a KFP UI should show: training-reward gain and, per unseen reward, change and gold."""
    last = run.evals[-1]
    out: dict[str, Any] = {
        "train_reward_base": indicators["train_base"],
        "train_reward_final": indicators["train_final"],
        "train_reward_gain": indicators["train_gain_final"],
        "checkpoints_evaluated": len(run.evals),
        "drift_final": (last["drift"].get(SPLIT) or {}).get("mean"),
        "diversity_final": (last["diversity"].get(SPLIT) or {}).get("mean"),
        "diversity_base": (run.evals[0]["diversity"].get(SPLIT) or {}).get("mean"),
        "eval_images_per_s": sum(e["timing"]["images_per_s"] for e in run.evals) / len(run.evals),
    }
    train_speeds = [r["images_per_s"] for r in run.train if _finite(r.get("images_per_s"))]
    if train_speeds:
        out["train_images_per_s"] = sum(train_speeds) / len(train_speeds)
    for reward, entry in indicators["unseen"].items():
        out[f"{reward}_change_final"] = entry["change_final"]
        out[f"{reward}_change_per_gain_final"] = entry["change_per_gain_final"]
        out[f"{reward}_gold_at_best_proxy"] = entry["gold_at_best_proxy"]
        out[f"{reward}_gold_at_best_proxy_change"] = entry["gold_at_best_proxy_change"]
    return {k: float(v) for k, v in out.items() if _finite(v)}


# ---------------------------------------------------------------------------------------------- plots
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(data: str, labels: Sequence[str], caption: str) -> str:
    series = html.escape("|".join(labels))
    return (f'<figure class="plot" data-series="{series}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _grid(n: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _x(record: dict[str, Any]) -> float:
    samples = record.get("samples")
    return float(samples) if samples is not None else float(record.get("epoch", 0))


def training_curves(runs: list[RunData]) -> str:
    """One panel per metric present in any run; reset epochs (`reset: true`) are dashed lines on every panel."""
    keys = [k for k in TRAIN_CURVES if any(_finite(r.get(k)) for run in runs for r in run.train)]
    extra = sorted({k for run in runs for r in run.train for k in r if k.startswith(CURVE_PREFIXES) and _finite(r[k])})
    keys += extra
    if not keys:
        return "<p>No training metrics (metrics.jsonl) found.</p>"
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for i, run in enumerate(runs):
            color = COLORS[i % len(COLORS)]
            rows = [r for r in run.train if _finite(r.get(key))]
            xs = [_x(r) for r in rows]
            ys = [r[key] for r in rows]
            ax.plot(xs, ys, color=color, marker=".", label=run.label)
            if key == "reward_mean":
                std = [r.get("reward_std") if _finite(r.get("reward_std")) else 0.0 for r in rows]
                ax.fill_between(xs, [y - s for y, s in zip(ys, std, strict=True)],
                                [y + s for y, s in zip(ys, std, strict=True)], color=color, alpha=0.15)
            for r in run.train:
                if r.get("reset"):
                    ax.axvline(_x(r), color=color, linestyle="--", linewidth=1, alpha=0.7)
        ax.set_title(key + (" (± std)" if key == "reward_mean" else ""), fontsize=10)
        ax.set_xlabel("samples (reward queries)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    caption = "Training curves against reward queries; dashed vertical lines mark neuron-reset epochs."
    return _figure(_png(fig), [r.label for r in runs], caption)


def heldout_curves(runs: list[RunData]) -> str:
    """Per reward (training reward first), diversity and drift: mean over prompts per checkpoint, 95% CI band."""
    train = runs[0].evals[0]["train_reward"]
    rewards = [train] + sorted({n for run in runs for n in run.evals[0]["rewards"]} - {train})
    panels = [("rewards", r) for r in rewards] + [("diversity", None), ("drift", None)]
    fig, axes = _grid(len(panels))
    for ax, (kind, reward) in zip(axes, panels, strict=True):
        for i, run in enumerate(runs):
            points = []
            for e in run.evals:
                entry = e[kind].get(reward) if kind == "rewards" else e[kind]
                stats = (entry or {}).get(SPLIT)
                if stats:
                    points.append((_x(e), stats["mean"], *stats["ci95"]))
            if not points:
                continue
            xs, mean, lo, hi = zip(*points, strict=True)
            color = COLORS[i % len(COLORS)]
            ax.plot(xs, mean, color=color, marker="o", label=run.label)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
        role = "training reward" if reward == train else ("unseen" if reward else "")
        ax.set_title(f"{reward or kind}" + (f" ({role})" if role else ""), fontsize=10)
        ax.set_xlabel("samples (reward queries)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    caption = "Held-out prompts: mean over prompts per checkpoint (x = 0 is the base model), band = 95% CI."
    return _figure(_png(fig), [r.label for r in runs], caption)


# ---------------------------------------------------------------------------------------------- html pieces
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def indicators_table(run: RunData, ind: dict[str, Any]) -> str:
    first = ind["first_unseen_below_base"]
    first_text = "never" if first is None else f"{first['checkpoint']} ({first['reward']})"
    head = (f"<p>Training reward <b>{html.escape(ind['train_reward'])}</b>: base {_fmt(ind['train_base'])} → final "
            f"{_fmt(ind['train_final'])} (gain {_fmt(ind['train_gain_final'])}); best-proxy checkpoint "
            f"<b>{html.escape(ind['best_proxy_checkpoint'])}</b>; first unseen reward below base: <b>{first_text}</b>.</p>")
    cols = ["base", "final", "change_final", "change_per_gain_final", "first_below_base", "gold_at_best_proxy",
            "gold_at_best_proxy_change"]
    rows = "".join(
        f"<tr><td class=l>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(entry[c])}</td>" for c in cols) + "</tr>"
        for name, entry in ind["unseen"].items()
    )
    if not rows:
        return head + "<p>No unseen rewards were evaluated (set eval_rewards in the config).</p>"
    header = "".join(f"<th>{c}</th>" for c in cols)
    return head + f"<table><tr><th class=l>unseen reward</th>{header}</tr>{rows}</table>"


def arms_table(runs: list[RunData], indicators: list[dict[str, Any]]) -> str:
    """Every run in one table (the DAG's arms side by side): training-reward gain and each unseen reward's change
    at the final checkpoint and at the best-proxy checkpoint, held-out prompts."""
    unseen = list(dict.fromkeys(name for ind in indicators for name in ind["unseen"]))
    header = "".join(f"<th>{html.escape(n)} change (final)</th><th>{html.escape(n)} change (best proxy)</th>" for n in unseen)
    rows = ""
    for run, ind in zip(runs, indicators, strict=True):
        cells = "".join(f"<td>{_fmt(ind['unseen'].get(n, {}).get('change_final'))}</td>"
                        f"<td>{_fmt(ind['unseen'].get(n, {}).get('gold_at_best_proxy_change'))}</td>" for n in unseen)
        rows += (f"<tr><td class=l>{html.escape(run.label)}</td><td>{_fmt(ind['train_base'])}</td>"
                 f"<td>{_fmt(ind['train_final'])}</td><td>{_fmt(ind['train_gain_final'])}</td>"
                 f"<td class=l>{html.escape(ind['best_proxy_checkpoint'])}</td>{cells}</tr>")
    return ("<table><tr><th class=l>run</th><th>train reward base</th><th>final</th><th>gain</th>"
            f"<th class=l>best-proxy ckpt</th>{header}</tr>{rows}</table>")


def definitions_html() -> str:
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(' '.join(text.split()))}</dd>"
                    for name, text in DEFINITIONS.items())
    return f"<dl>{items}</dl>"


def _img(path: Path) -> str:
    if not path.is_file():
        return "<td>missing</td>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<td><img class="cell" alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"></td>'


def image_grid_html(run: RunData, max_prompts: int = 4) -> str:
    """Rows: held-out prompts (image 0, same seed); columns: checkpoints. Same noise in every column."""
    first = run.evals[0]
    shown = min(max_prompts, first["num_prompts"][SPLIT])
    prompts = _prompts(run)
    header = "".join(f"<th>{html.escape(e['checkpoint'])}</th>" for e in run.evals)
    rows = ""
    for i in range(shown):
        cells = "".join(_img(run.eval_dir / e["checkpoint"] / "images" / f"{SPLIT}-{i:03d}-00.png") for e in run.evals)
        rows += f"<tr><td class=l>{html.escape(prompts.get(i, str(i)))}</td>{cells}</tr>"
    return f"<table><tr><th class=l>prompt</th>{header}</tr>{rows}</table>"


def _prompts(run: RunData) -> dict[int, str]:
    import json

    samples = run.eval_dir / BASE / "samples.jsonl"
    try:
        records = [json.loads(line) for line in samples.read_text().split("\n") if line.strip()]
        return {r["index"]: str(r["prompt"]) for r in records if r["split"] == SPLIT}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # labels only: a damaged file shows indices
        return {}


def timing_table(runs: list[RunData]) -> str:
    rows = ""
    for run in runs:
        train = [r["images_per_s"] for r in run.train if _finite(r.get("images_per_s"))]
        ev = [e["timing"]["images_per_s"] for e in run.evals]
        hw = run.evals[-1].get("hardware", {})
        where = hw.get("gpu") or f"{hw.get('device', '?')} ({hw.get('cpu_count', '?')} CPUs)"
        rows += (f"<tr><td class=l>{html.escape(run.label)}</td><td>{_fmt(sum(train) / len(train) if train else None)}</td>"
                 f"<td>{_fmt(sum(ev) / len(ev))}</td><td class=l>{html.escape(str(where))}</td>"
                 f"<td class=l>torch {html.escape(str(hw.get('torch', '?')))}, {html.escape(str(hw.get('platform', '?')))}"
                 "</td></tr>")
    return ("<table><tr><th class=l>run</th><th>train images/s</th><th>eval images/s</th><th class=l>hardware</th>"
            f"<th class=l>software</th></tr>{rows}</table>")


def _notes(run: RunData) -> str:
    first = run.evals[0]
    notes = [f"Diversity and drift use the embedding <b>{html.escape(first['embedding'])}</b>."]
    if "fallback" in first["embedding"]:
        notes.append("This is the pixel FALLBACK (no CLIP image tower configured in evaluation.image_tower): it "
                     "measures layout and colour change, not semantic change.")
    if not first.get("heldout_disjoint", True):
        notes.append(f"No heldout.txt was given: the 'held-out' prompts come from the training source "
                     f"({html.escape(str(first.get('heldout_source')))}) and are NOT disjoint from training.")
    notes.append(f"{first['num_prompts'][SPLIT]} held-out prompts x {first['images_per_prompt']} images per checkpoint; "
                 "statistics are over prompts. Learned rewards follow the official scorer libraries' scales "
                 "(PickScore = 100·cos, standardized ImageReward).")
    return "".join(f'<p class="note">{n}</p>' for n in notes)


# ---------------------------------------------------------------------------------------------- entry point
def build_report(
    run_dirs: list[Path], eval_dirs: list[Path], out_html: Path, out_md: Path, labels: list[str] | None = None
) -> dict[str, float]:
    """Write the HTML report and the Markdown summary; return the headline numbers (flat, finite floats).

    With one run the keys are plain (`train_reward_gain`); with several they are prefixed by the label
    (`ddpo.train_reward_gain`) so one KFP Metrics artifact can hold the comparison.
    """
    if len(run_dirs) != len(eval_dirs) or not run_dirs:
        raise ValueError(f"give one eval dir per run dir (got {len(run_dirs)} runs, {len(eval_dirs)} eval dirs)")
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"give one label per run (got {len(labels)} labels for {len(run_dirs)} runs)")
    if len(set(labels)) != len(labels):
        labels = [f"{label}-{i}" for i, label in enumerate(labels)]
    runs = [load_run(Path(r), Path(e), label) for r, e, label in zip(run_dirs, eval_dirs, labels, strict=True)]
    indicators = [run_indicators(run) for run in runs]
    heads = [headline(run, ind) for run, ind in zip(runs, indicators, strict=True)]
    flat: dict[str, float] = {}
    for run, head in zip(runs, heads, strict=True):
        flat |= head if len(runs) == 1 else {f"{run.label}.{k}": v for k, v in head.items()}

    title = "rewardtune report: " + " vs ".join(r.label for r in runs)
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append("<h2>Held-out evaluation</h2>" + "".join(_notes(run) for run in runs[:1]) + heldout_curves(runs))
    body.append("<h2>Overoptimization indicators</h2>")
    if len(runs) > 1:
        body.append("<h3>All runs</h3>" + arms_table(runs, indicators))
    for run, ind in zip(runs, indicators, strict=True):
        body.append(f"<h3>{html.escape(run.label)}</h3>" + indicators_table(run, ind))
    body.append("<h3>Definitions</h3>" + definitions_html())
    body.append("<h2>Training curves</h2>" + training_curves(runs))
    body.append("<h2>Images across checkpoints</h2><p>Same prompt and same noise (initial and per step) in every "
                "column.</p>")
    for run in runs:
        body.append(f"<h3>{html.escape(run.label)}</h3>" + image_grid_html(run))
    body.append("<h2>Timing and hardware</h2>" + timing_table(runs))
    body.append("<h2>Run configuration</h2>")
    for run in runs:
        body.append(f"<h3>{html.escape(run.label)} <small>({html.escape(str(run.run_dir))})</small></h3>"
                    f"<pre>{html.escape(run.config_text)}</pre>")
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_html, page)
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out_md), markdown_summary(runs, indicators, heads, out_html.name))
    return flat


def markdown_summary(runs: list[RunData], indicators: list[dict[str, Any]], heads: list[dict[str, float]],
                     html_name: str) -> str:
    lines = ["# rewardtune report: " + " vs ".join(r.label for r in runs), "",
             f"Held-out prompts; full report with plots and images: `{html_name}`.", "",
             "| run | train reward | base | final | gain | best-proxy ckpt | first unseen below base |",
             "|---|---|---|---|---|---|---|"]
    for run, ind in zip(runs, indicators, strict=True):
        first = ind["first_unseen_below_base"]
        first_text = "never" if first is None else f"{first['checkpoint']} ({first['reward']})"
        lines.append(f"| {run.label} | {ind['train_reward']} | {_fmt(ind['train_base'])} | {_fmt(ind['train_final'])} "
                     f"| {_fmt(ind['train_gain_final'])} | {ind['best_proxy_checkpoint']} | {first_text} |")
    lines += ["", "| run | unseen reward | change (final) | change / train gain | gold at best proxy |",
              "|---|---|---|---|---|"]
    for run, ind in zip(runs, indicators, strict=True):
        for name, e in ind["unseen"].items():
            lines.append(f"| {run.label} | {name} | {_fmt(e['change_final'])} | {_fmt(e['change_per_gain_final'])} "
                         f"| {_fmt(e['gold_at_best_proxy'])} |")
    lines += ["", f"Diversity/drift embedding: {runs[0].evals[0]['embedding']}.", ""]
    return "\n".join(lines)
