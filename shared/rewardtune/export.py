"""`rewardtune export`: pick a checkpoint (last, best-proxy or best-heldout), write a diffusers pipeline
directory that `StableDiffusionPipeline.from_pretrained(dir)` loads, with a model card, and optionally push it.

Selection (over the evaluated checkpoints, the training reward's held-out mean as "proxy"):
- `last`: the newest checkpoint of the run;
- `best-proxy`: `indicators.best_proxy_index`, the highest training reward;
- `best-heldout`: `indicators.best_heldout_index`, the highest training reward among checkpoints whose unseen
  rewards stay at or above the lower end of the base model's 95% CI.

Layout of `--out`: a complete pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
README.md (the model card) and rewardtune_export.json (what was chosen and why). With `--merge` a LoRA is fused
into the UNet; without it the UNet is the base one and the adapter sits in `lora/` (`pipe.load_lora_weights`).
Written to a temporary directory beside `--out` and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rewardtune.checkpoint import fsync_tree, list_checkpoints, verify_checkpoint, write_json_atomic
from rewardtune.errors import RewardtuneError
from rewardtune.faults import fault_point
from rewardtune.provenance import check_evaluation_of, checkpoint_digest, read_run_id
from rewardtune.safe_paths import apply_umask

log = logging.getLogger(__name__)

SELECTIONS = ("last", "best-proxy", "best-heldout")
EXPORT_FILE = "rewardtune_export.json"
LORA_DIR = "lora"


# ------------------------------------------------------------------------------------------- selection
def _mean(record: dict[str, Any], reward: str) -> float:
    stats = record["rewards"][reward].get("heldout") or record["rewards"][reward].get("train")
    if stats is None:
        raise RewardtuneError(f"checkpoint {record['checkpoint']} has no results for reward {reward}")
    return float(stats["mean"])


def select_checkpoint(run_dir: Path, records: list[dict[str, Any]], rule: str) -> tuple[str, str]:
    """(checkpoint name, one-sentence reason) under `rule`; `records` are read_evaluations(eval_dir)."""
    from rewardtune.evaluate import BASE
    from rewardtune.indicators import best_heldout_index, best_proxy_index

    if rule not in SELECTIONS:
        raise RewardtuneError(f"--select {rule!r}: allowed: {', '.join(SELECTIONS)}")
    if rule == "last":
        checkpoints = list_checkpoints(Path(run_dir) / "checkpoints")
        if not checkpoints:
            raise RewardtuneError(f"{run_dir} holds no checkpoints; train first")
        return checkpoints[-1].name, "the run's newest checkpoint (`--select last`)"
    if not records or records[0]["checkpoint"] != BASE:
        raise RewardtuneError(f"--select {rule} needs the evaluation of base and the checkpoints (--eval); "
                              "run `rewardtune evaluate` first")
    names = [r["checkpoint"] for r in records]
    train_name = records[0]["train_reward"]
    train = [_mean(r, train_name) for r in records]
    if rule == "best-proxy":
        index = best_proxy_index(train)
        return names[index], (f"highest held-out {train_name} ({train[index]:.4g}) of {len(names)} evaluated "
                              "(`--select best-proxy`)")
    unseen = [n for n, e in records[0]["rewards"].items() if e["role"] == "unseen"]
    if not unseen:
        raise RewardtuneError("--select best-heldout needs unseen rewards in the evaluation (eval_rewards); none found")
    series = {u: [_mean(r, u) for r in records] for u in unseen}
    low = {u: float((records[0]["rewards"][u].get("heldout") or records[0]["rewards"][u]["train"])["ci95"][0])
           for u in unseen}
    index = best_heldout_index(train, series, low)
    kept = [n for c, n in enumerate(names) if c == 0 or all(series[u][c] >= low[u] for u in unseen)]
    rule_name = "(`--select best-heldout`, rewardtune.indicators.best_heldout_index)"
    within = f"kept the unseen rewards ({', '.join(unseen)}) at or above the base model's 95% CI lower bound"
    if index == 0 and len(kept) == 1:
        return names[0], (f"no checkpoint {within}, so the base model is shipped (base held-out {train_name} "
                          f"{train[0]:.4g}, {len(names) - 1} checkpoint(s) evaluated) {rule_name}")
    if index == 0:
        best = max(range(1, len(names)), key=lambda c: train[c]) if len(names) > 1 else 0
        return names[0], (f"the base model scored highest on the training reward (held-out {train_name} "
                          f"{train[0]:.4g}; best checkpoint {names[best]}: {train[best]:.4g}) among the "
                          f"{len(kept)} of {len(names)} evaluated that {within} {rule_name}")
    reason = (f"highest held-out {train_name} ({train[index]:.4g}) among the {len(kept)} of {len(names)} evaluated "
              f"checkpoints whose unseen rewards ({', '.join(unseen)}) stay at or above the base model's 95% CI "
              f"lower bound {rule_name}")
    return names[index], reason


# ------------------------------------------------------------------------------------------- model card
def base_license(source: str) -> str | None:
    """The `license` of the base model's card (its README.md front matter), when it can be read offline."""
    from huggingface_hub import ModelCard

    readme = Path(source) / "README.md"
    try:
        if readme.is_file():
            card = ModelCard.load(readme)
        elif os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False") and not Path(source).exists():
            card = ModelCard.load(source)
        else:
            return None
    except Exception as err:  # noqa: BLE001 - a card that cannot be read leaves the license unknown, said so
        log.warning("could not read the base model's card (%s); license left unknown", err)
        return None
    return getattr(card.data, "license", None)


def _ci(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    return f"{stats['mean']:.4g} [{stats['ci95'][0]:.4g}, {stats['ci95'][1]:.4g}]"


def model_card(cfg: Any, chosen: str, reason: str, records: list[dict[str, Any]], merged: bool,
               license_id: str | None) -> str:
    """README.md: front matter (license from the base card, base model, tags) + what was trained and chosen."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license_id or "other", base_model=cfg.model.source, library_name="diffusers",
                         pipeline_tag="text-to-image",
                         tags=["rewardtune", "diffusers", "text-to-image", cfg.algorithm.name, cfg.reward.name])
    record = next((r for r in records if r["checkpoint"] == chosen), None)
    base = next((r for r in records if r["checkpoint"] == "base"), None)
    constraints = ", ".join(c.reward.name for c in cfg.algorithm.constraints) or "none"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {cfg.algorithm.name.upper()} fine-tune of {cfg.model.source}", "",
        f"- **Base model:** {cfg.model.source}" + (f" (revision {cfg.model.revision})" if cfg.model.revision else ""),
        f"- **Algorithm:** {cfg.algorithm.name} ({cfg.model.finetune}"
        + (f", LoRA rank {cfg.model.lora_rank}" if cfg.model.finetune == "lora" else "") + ")",
        f"- **Training reward:** {cfg.reward.name}; **constraints:** {constraints}",
        f"- **Checkpoint:** {chosen}: {reason}.",
        "- **Weights:** " + ("the base model unchanged (the reason is above)" if chosen == "base"
                             else "fine-tuned UNet" if cfg.model.finetune == "full"
                             else "LoRA fused into the UNet" if merged
                             else f"base UNet + LoRA adapter in `{LORA_DIR}/` (`pipe.load_lora_weights(dir + '/{LORA_DIR}')`)"),
        f"- **License:** {license_id or 'unknown: the base model card gave none; check the base model terms'}",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "pipe = StableDiffusionPipeline.from_pretrained(\"<this directory or repo>\")",
        "```",
    ]
    if record is not None:
        lines += ["", f"## Held-out evaluation of {chosen}", "",
                  "Mean over held-out prompts with the Student-t 95% CI; base = the model before fine-tuning.", "",
                  "| reward | role | this checkpoint | base |", "|---|---|---|---|"]
        for name, entry in record["rewards"].items():
            base_entry = (base or {}).get("rewards", {}).get(name, {})
            lines.append(f"| {name} | {entry['role']} | {_ci(entry.get('heldout'))} | {_ci(base_entry.get('heldout'))} |")
        for kind in ("diversity", "drift"):
            lines.append(f"| {kind} | – | {_ci((record.get(kind) or {}).get('heldout'))} | "
                         f"{_ci(((base or {}).get(kind) or {}).get('heldout'))} |")
    if records:
        train_name = records[0]["train_reward"]
        lines += ["", "## All evaluated checkpoints", "", f"| checkpoint | epoch | held-out {train_name} |", "|---|---|---|"]
        lines += [f"| {r['checkpoint']}{' (chosen)' if r['checkpoint'] == chosen else ''} | {r['epoch']} | "
                  f"{_ci(r['rewards'][train_name].get('heldout'))} |" for r in records]
    lines += ["", "Exported by `rewardtune export`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the pipeline
def _load_policy(cfg: Any, checkpoint: Path | None):
    """The base pipeline with the checkpoint's policy weights in its denoiser (LoRA as a peft adapter); None: base."""
    import torch

    from rewardtune.models import load_pipeline, load_policy_weights, prepare_policy, resolve_model_dir

    if cfg.model.family != "sd":
        from rewardtune.families.flow import (
            FlowFamily,
            load_flow_pipeline,
            load_flow_policy_weights,
            prepare_flow_policy,
        )

        pipe = load_flow_pipeline(resolve_model_dir(cfg.model.source, cfg.model.revision, cfg.model.family), cfg.model.family)
        if checkpoint is None:
            return pipe
        prepare_flow_policy(pipe, cfg.model, torch.device("cpu"), gradient_checkpointing=False)
        load_flow_policy_weights(FlowFamily(pipe), cfg.model.finetune, checkpoint)
        pipe.transformer.requires_grad_(False).eval()
        return pipe
    pipe = load_pipeline(cfg.model)
    if checkpoint is None:
        return pipe
    prepare_policy(pipe, cfg.model, torch.device("cpu"), gradient_checkpointing=False)
    load_policy_weights(pipe.unet, cfg.model, checkpoint)
    pipe.unet.requires_grad_(False).eval()
    return pipe


def _save_adapter(cfg: Any, pipe: Any, directory: Path) -> None:
    """The loaded LoRA in the diffusers format with its adapter metadata (what `load_lora_weights` reads)."""
    directory.mkdir(parents=True)
    if cfg.model.family == "sd":
        from rewardtune.models import save_policy

        save_policy(pipe.unet, cfg.model, directory)
    else:
        from rewardtune.families.flow import FlowFamily

        FlowFamily(pipe).save_lora(directory)


def write_pipeline(cfg: Any, checkpoint: Path | None, out: Path, merge: bool) -> None:
    """Save the exported pipeline into `out` (a fresh directory); checkpoint None: the base model unchanged."""
    import torch

    pipe = _load_policy(cfg, checkpoint)
    denoiser = pipe.unet if cfg.model.family == "sd" else pipe.transformer
    if checkpoint is not None and cfg.model.finetune == "lora":
        if merge:
            denoiser.fuse_lora(lora_scale=1.0)  # W += scale * B A with peft's alpha / r, as in training
            denoiser.unload_lora()
        else:  # lora/ is written from the loaded adapter, so it carries its scale even from an old checkpoint
            _save_adapter(cfg, pipe, out / LORA_DIR)
            denoiser.unload_lora()  # the denoiser stays the base one
    cast_components(pipe, {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.model.dtype, torch.float32))
    pipe.save_pretrained(out, safe_serialization=True)


def cast_components(pipe: Any, dtype: Any) -> None:
    """Every torch component of `pipe` in `dtype`, without diffusers' spurious warnings.

    `ModelMixin.to(dtype=...)` warns "modules ... that should be kept in float32: []" on every dtype cast, even
    when the model keeps none in float32 (its list defaults to [] and is then tested against None), and
    `pipe.to(dtype)` casts the UNet/transformer and the VAE this way: two warnings per export. A component
    already in `dtype` is left alone; one with modules to keep in float32 goes through diffusers' own `to`
    (its warning is then real); the others are cast as the plain torch modules they are.
    """
    import torch
    from diffusers.models.modeling_utils import ModelMixin

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        if all(p.dtype == dtype for p in component.parameters() if p.is_floating_point()):
            continue
        if isinstance(component, ModelMixin) and not component._keep_in_fp32_modules:
            torch.nn.Module.to(component, dtype=dtype)
        else:
            component.to(dtype=dtype)


def export_model(run_dir: Path, eval_dir: Path | None, select: str, out: Path, merge: bool = False,
                 push_to_hub: str | None = None, private: bool = True) -> dict[str, Any]:
    """The whole `rewardtune export`; returns the summary written to rewardtune_export.json."""
    from rewardtune.config import load_config
    from rewardtune.evaluate import read_evaluations

    run_dir, out = Path(run_dir), Path(out)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RewardtuneError(f"--run {run_dir} has no config.yaml; give the directory of a `rewardtune train` run")
    previous = _previous_export(out)
    cfg = load_config(config_path)
    if eval_dir is not None and not Path(eval_dir).is_dir():
        raise RewardtuneError(f"--eval {eval_dir} is not a directory")
    records = read_evaluations(Path(eval_dir)) if eval_dir is not None else []
    if records:
        check_evaluation_of(run_dir, records, "--eval", Path(eval_dir))
    chosen, reason = select_checkpoint(run_dir, records, select)
    checkpoint = None if chosen == "base" else run_dir / "checkpoints" / chosen
    if checkpoint is None:  # the rule says no fine-tuned checkpoint is better: ship the base model, and say so
        log.warning("--select %s chose the base model: %s; exporting the base pipeline", select, reason)
    merged = checkpoint is not None and (merge or cfg.model.finetune == "full")
    summary = {"checkpoint": chosen, "select": select, "reason": reason, "merged": merged,
               "base_model": cfg.model.source, "algorithm": cfg.algorithm.name, "reward": cfg.reward.name,
               "run_id": read_run_id(run_dir),
               "checkpoint_digest": checkpoint_digest(verify_checkpoint(checkpoint)) if checkpoint else None}
    if previous is not None and all(previous.get(k) == v for k, v in summary.items()):
        log.info("--out %s already holds this export (%s); kept", out, chosen)  # a retried step: the same result
        summary = previous
    elif out.exists():
        what = "another export (other run, checkpoint, selection or merge)" if previous is not None else "files"
        raise RewardtuneError(f"--out {out} already exists and holds {what}; remove it or choose another path")
    else:
        _write_export(cfg, checkpoint, out, merge, summary, model_card(
            cfg, chosen, reason, records, merged, base_license(cfg.model.source)))
    if push_to_hub and not summary.get("pushed"):
        summary["pushed"] = push(out, push_to_hub, private=private, message=f"rewardtune export: {chosen} ({select})")
        write_json_atomic(out / EXPORT_FILE, summary)
    return summary


def _previous_export(out: Path) -> dict[str, Any] | None:
    """The summary of a complete export already at `out` (a retried step), or None."""
    from rewardtune.checkpoint import read_json_object

    return read_json_object(out / EXPORT_FILE)


def _write_export(cfg: Any, checkpoint: Path | None, out: Path, merge: bool, summary: dict[str, Any], card: str) -> None:
    """Pipeline, card and summary into a temporary directory beside `out`, fsynced, then renamed into place.

    Temporary directories of killed attempts (`.<name>.tmp-*`) are removed first: an attempt never reads or
    keeps another's files.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_pipeline(cfg, checkpoint, tmp, merge)
        (tmp / "README.md").write_text(card)
        write_json_atomic(tmp / EXPORT_FILE, summary)
        fault_point("export_write")
        apply_umask(tmp)
        fsync_tree(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push(folder: Path, repo_id: str, private: bool = True, message: str = "rewardtune export") -> str:
    """Create (if needed) and upload to a Hub model repo; the token comes from HF_TOKEN / the hub login."""
    from huggingface_hub import HfApi

    if "/" not in repo_id or repo_id.count("/") != 1:
        raise RewardtuneError(f"--push-to-hub {repo_id!r}: give a repo id like 'user/model-name'")
    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as err:  # noqa: BLE001 - network/auth errors of the hub client: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RewardtuneError(f"push to {repo_id} failed: {type(err).__name__}: {first[:200]}") from None
    return str(getattr(commit, "commit_url", None) or commit)
