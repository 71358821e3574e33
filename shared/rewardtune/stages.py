"""Pipeline stages as plain library functions: the CLI, the KFP components and `docker run` all call these.

Each stage takes paths and returns a small JSON-able summary, so a KFP component body is one import and
one call, and the same code runs in the cluster, under `kfp.local` and on a laptop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from rewardtune.checkpoint import write_text_atomic
from rewardtune.config import RunConfig, load_config, parse_config, parse_yaml
from rewardtune.errors import ConfigError, RewardtuneError, Terminated
from rewardtune.prompts import check_token_lengths, load_prompts, split_prompts

log = logging.getLogger(__name__)

TRAIN_FILE, HELDOUT_FILE, SUMMARY_FILE = "train.txt", "heldout.txt", "prompts.json"


def resolve_config(config: str, overrides: list[str] | None = None) -> RunConfig:
    """A config given as YAML text, a local path, a file:// URI or an s3:// URI (pipeline parameters are strings)."""
    text = config.strip()
    if text.startswith("s3://"):
        return parse_config(parse_yaml(_read_s3_text(text), f"config {text}", "fix the object's YAML"), overrides)
    if "\n" not in text and (text.startswith("file://") or text.endswith((".yaml", ".yml"))):
        return load_config(text.removeprefix("file://"), overrides)
    return parse_config(parse_yaml(text, "config text", "fix the YAML (see configs/ for examples)"), overrides)


def _read_s3_text(uri: str) -> str:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not key:
        raise ConfigError(f"config URI {uri} names no object; use s3://bucket/path/config.yaml")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    except Exception as err:  # noqa: BLE001 - botocore raises many types; the user needs one line
        raise ConfigError(f"could not read config {uri}: {err}") from None


def _tokenizer_location(model_dir: str) -> str:
    """A diffusers pipeline keeps its tokenizer in `tokenizer/`; accept either that directory or the pipeline root."""
    path = Path(model_dir.removeprefix("file://"))
    return str(path / "tokenizer") if (path / "tokenizer").is_dir() else str(path)


def prepare_prompts(
    source: str,
    out_dir: Path,
    *,
    heldout_fraction: float,
    seed: int,
    template: str = "{}",
    tokenizer_dir: str | None = None,
) -> dict[str, Any]:
    """Write `train.txt` and a disjoint `heldout.txt` (one prompt a line) plus `prompts.json` with the counts.

    Prompts are templated and deduplicated before the split, so the same prompt can never land on both sides;
    with a tokenizer, a prompt that would be truncated is an error here, not a silent surprise on the GPU.
    """
    prompts = load_prompts(source, template)
    train, heldout = split_prompts(prompts, heldout_fraction, seed)
    max_tokens = check_token_lengths(prompts, _tokenizer_location(tokenizer_dir)) if tokenizer_dir else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / TRAIN_FILE, "\n".join(train) + "\n")
    write_text_atomic(out_dir / HELDOUT_FILE, "\n".join(heldout) + ("\n" if heldout else ""))
    summary = {
        "source": source, "template": template, "seed": seed, "heldout_fraction": heldout_fraction,
        "num_prompts": len(prompts), "num_train": len(train), "num_heldout": len(heldout), "max_tokens": max_tokens,
    }
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_prompts_from_config(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """prepare-prompts driven by a run config; checks lengths against the model's tokenizer when it is local."""
    model_dir = Path(cfg.model.source.removeprefix("file://"))
    return prepare_prompts(
        cfg.prompts.source, out_dir, heldout_fraction=cfg.prompts.heldout_fraction, seed=cfg.prompts.split_seed,
        template=cfg.prompts.template, tokenizer_dir=str(model_dir) if model_dir.is_dir() else None,
    )


def run_forwarding_sigterm(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` and pass a SIGTERM sent to this process on to it.

    Kubernetes signals only the container's main process; without forwarding, the training processes would
    never hear of the eviction, miss their chance to checkpoint, and die by SIGKILL when the grace ends.
    """
    children: list[subprocess.Popen] = []
    pending: list[int] = []

    def relay(signum: int, frame: object) -> None:
        if children:
            children[0].send_signal(signal.SIGTERM)
        else:  # arrived before the child existed: deliver it once it does
            pending.append(signum)

    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, relay) if forward else None
    try:
        children.append(subprocess.Popen(cmd, env=env))
        if pending:
            children[0].send_signal(signal.SIGTERM)
        return children[0].wait()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


# torchrun SIGKILLs the workers this long after it forwards a SIGTERM (its default, 30 s, can be shorter than
# the checkpoint grace); the stage gives the workers the grace plus this margin for the checkpoint write.
SHUTDOWN_MARGIN_S = 15


def multi_process_command(num_processes: int, train_args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m rewardtune.cli train ...`: N processes on one machine,
    on GPUs (NCCL) or CPUs (gloo). `accelerate launch --cpu` would start one process, whatever N says."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "-m", "rewardtune.cli", "train", *train_args]


def launcher_env(grace_s: float, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment with TORCH_ELASTIC_SHUTDOWN_TIMEOUT above the checkpoint grace."""
    env = dict(os.environ if environ is None else environ)
    needed = math.ceil(grace_s) + SHUTDOWN_MARGIN_S
    try:
        current = int(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0"))
    except ValueError:
        current = 0
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(current, needed))
    return env


def train_stage(
    config: str, prompts_dir: Path, run_dir: Path, *, num_gpus: int = 1, overrides: list[str] | None = None,
    resume: bool = True,
) -> Path:
    """Train on `prompts_dir/train.txt` into `run_dir`, resuming from its newest checkpoint (a retried pod continues).

    The template was already applied by prepare-prompts, so it is reset to '{}' here. With more than one
    process the run is re-launched through torchrun, one process per GPU (or CPU process), on the same CLI.
    A clean stop on SIGTERM raises `Terminated` whatever the process count: the launcher itself exits 1
    then, so the stage reads the record the stopped run leaves (`terminated.json`).
    """
    from rewardtune.training.lifecycle import StartRecord

    train_file = Path(prompts_dir) / TRAIN_FILE
    if not train_file.is_file():
        raise RewardtuneError(f"{train_file} is missing; run prepare-prompts first and pass its --out as the prompts dir")
    run_dir = Path(run_dir)
    start = StartRecord(run_dir)  # a start that fails before its first checkpoint takes its config.yaml back too
    try:
        return _train_stage(config, train_file, run_dir, num_gpus, overrides, resume)
    except Terminated:
        raise
    except BaseException:
        start.undo()
        raise


def _train_stage(config: str, train_file: Path, run_dir: Path, num_gpus: int, overrides: list[str] | None,
                 resume: bool) -> Path:
    from rewardtune.trainer import TERMINATED_FILE

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config(config, overrides)
    # assigned as data (validated on assignment): a path holding '#' or ': ' must not go through YAML again
    cfg.prompts.source = str(train_file)
    cfg.prompts.template = "{}"
    config_file = run_dir / "config.yaml"
    write_text_atomic(config_file, cfg.to_yaml())
    if num_gpus > 1:
        cmd = multi_process_command(num_gpus, ["--config", str(config_file), "--out", str(run_dir),
                                               *(["--resume"] if resume else [])])
        record = run_dir / TERMINATED_FILE
        record.unlink(missing_ok=True)
        log.info("launching %d processes: %s", num_gpus, " ".join(cmd))
        returncode = run_forwarding_sigterm(cmd, launcher_env(cfg.checkpointing.termination_grace_s))
        if returncode != 0 and record.is_file():
            raise Terminated(json.loads(record.read_text())["message"])
        if returncode != 0:
            raise RewardtuneError(f"torchrun with {num_gpus} processes failed with exit code {returncode}")
        return run_dir
    from rewardtune.trainer import Trainer

    return Trainer(cfg, run_dir).run(resume=resume)


def list_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint names in epoch order (reset pairs kept): the fan-out list of the evaluation stage."""
    root = Path(run_dir) / "checkpoints"
    names = [p.name for p in root.glob("epoch-*") if (p / "manifest.json").is_file()] if root.is_dir() else []
    phase = {"-pre-reset": 0, "": 1, "-post-reset": 2}
    return sorted(names, key=lambda n: (n[:12], phase.get(n[12:], 1)))


def param_overrides(
    *, algorithm: str = "", base_model: str = "", reward: str = "", epochs: int = 0, prompt_source: str = ""
) -> list[str]:
    """Turn pipeline parameters into `--set` overrides; an empty value (or 0 epochs) keeps the config's own."""
    sets = []
    if algorithm:
        sets.append(f"algorithm.name={yaml_string(algorithm)}")
    if base_model:
        sets.append(f"model.source={yaml_string(base_model)}")
    if reward:
        sets.append(f"reward.name={yaml_string(reward)}")
    if epochs:
        sets.append(f"training.epochs={int(epochs)}")
    if prompt_source:
        sets.append(f"prompts.source={yaml_string(prompt_source)}")
    return sets


def yaml_string(value: str) -> str:
    """`value` as a double-quoted YAML scalar on one line: overrides are YAML-parsed, and a path with '#', ': '
    or a leading '[' must come back as exactly that string, not a comment, a mapping or a list."""
    return yaml.safe_dump(str(value), default_style='"', width=float("inf"), allow_unicode=False).strip().removesuffix("...").strip()


def _final_metrics(run_dir: Path) -> dict[str, float]:
    """Numeric fields of the last metrics.jsonl record (what the KFP UI shows for the train step)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: float(v) for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def train_for_pipeline(
    config: str, prompts_dir: str | Path, out_dir: str | Path, *, workdir: str = "", run_id: str = "",
    num_gpus: int = 1, overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The train step: train in `workdir/run_id` (persistent PVC, so a retried pod resumes) and publish to `out_dir`.

    Without a workdir (kfp.local, docker run) it trains straight into `out_dir`. This is the step's whole body,
    so a clean SIGTERM stop exits 143 here (the KFP executor would report any exception as exit 1).
    """
    import shutil

    out_dir = Path(out_dir)
    if workdir and not run_id:
        raise RewardtuneError("train: a workdir needs a run_id so that retries of one run share a directory")
    run_dir = Path(workdir) / run_id if workdir else out_dir
    try:
        train_stage(config, Path(prompts_dir), run_dir, num_gpus=num_gpus, overrides=overrides, resume=True)
    except Terminated as err:  # a preemption, not a failure: exit as the CLI does, 143 and one line
        print(f"terminated: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    if run_dir != out_dir:
        shutil.copytree(run_dir, out_dir, dirs_exist_ok=True)
    return {"run_dir": str(run_dir), "checkpoints": list_checkpoints(out_dir), "final_metrics": _final_metrics(out_dir)}


def record_run_status(state: str, job: str, error_message: str = "") -> str:
    """The exit handler's record: one line on stdout (pod logs) and on stderr when the run did not succeed."""
    line = f"rewardtune run {job or '<local>'}: {state}" + (f" ({error_message})" if error_message else "")
    print(line, file=sys.stdout if state == "SUCCEEDED" else sys.stderr)
    return line


def run_label(run_dir: str | Path) -> str:
    """A report label that says what was trained ("ddpo on testbed_proxy"); the artifact folder's own name
    ("checkpoints") says nothing."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return Path(run_dir).name
    data = yaml.safe_load(config.read_text()) or {}
    return f"{data.get('algorithm', {}).get('name', '?')} on {data.get('reward', {}).get('name', '?')}"


def merge_evaluations(eval_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Gather per-checkpoint evaluation results (one `<checkpoint>/` folder each) into one directory.

    The fanned-out evaluate steps each also hold the base model's results, which are identical (same
    seeds, same weights): the first copy is kept.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for directory in eval_dirs:
        for result in sorted(Path(directory).glob("*/metrics.json")):
            target = out / result.parent.name
            if not target.exists():
                shutil.copytree(result.parent, target)
    return out


def export_stage(run_dir: str | Path, eval_dirs: list[str | Path], out_dir: str | Path, select: str = "best-heldout",
                 merge: bool = True, push_to_hub: str = "") -> dict[str, Any]:
    """The DAG's export step: merge the per-checkpoint evaluations, then `rewardtune export` into `out_dir`."""
    import tempfile

    from rewardtune.export import export_model

    with tempfile.TemporaryDirectory() as merged:
        merge_evaluations(list(eval_dirs), merged)
        return export_model(Path(run_dir), Path(merged), select, Path(out_dir), merge=merge,
                            push_to_hub=push_to_hub or None)
