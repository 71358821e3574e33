"""Which run an artifact belongs to: a run id kept in the run directory, recorded with every evaluation
together with the base model and each checkpoint's digest, and checked where an evaluation is used.

Without it `export --eval` and `report` take any evaluation directory: a model card would state a held-out
score the exported checkpoint never had. The run id is a random id written once, when training starts
(`run.json`; a resume keeps it, the pipeline's publish copy carries it). A checkpoint's digest is the sha256
of its manifest's file list (names, sizes, sha256s): it changes whenever any of its files does, and costs
no rehashing, since `verify_checkpoint` already checks the files against the manifest.

Evaluations and runs from before this record nothing to compare; they are accepted with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from rewardtune.checkpoint import MANIFEST, read_json_object, write_json_atomic
from rewardtune.errors import RewardtuneError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


def read_run_id(run_dir: Path) -> str | None:
    """The run id in `run_dir/run.json`, or None (a run from before run ids, or a damaged file)."""
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def ensure_run_id(run_dir: Path, base_model: str) -> str:
    """The run's id, written (atomically) the first time; a resumed run keeps its own."""
    found = read_run_id(run_dir)
    if found is not None:
        return found
    run_id = uuid.uuid4().hex
    write_json_atomic(Path(run_dir) / RUN_FILE, {"run_id": run_id, "base_model": base_model})
    return run_id


def checkpoint_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's file list: the identity of a checkpoint's contents."""
    files = json.dumps(manifest.get("files"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(files.encode()).hexdigest()


def _manifest(path: Path) -> dict[str, Any] | None:
    return read_json_object(path / MANIFEST)


def run_base_model(run_dir: Path) -> str | None:
    """`model.source` of the run's config.yaml (None when it has none or it cannot be read)."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    source = model.get("source") if isinstance(model, dict) else None
    return source if isinstance(source, str) else None


def evaluation_provenance(run_dir: Path, base_model: str, revision: str | None) -> dict[str, Any]:
    """What an evaluation records about its run: {run_id, run_dir, base_model, revision}."""
    return {"run_id": read_run_id(run_dir), "run_dir": str(Path(run_dir).resolve()), "base_model": base_model,
            "revision": revision}


def check_evaluation_of(run_dir: Path, records: list[dict[str, Any]], flag: str, eval_dir: Path) -> None:
    """Refuse evaluation `records` (from `eval_dir`) that were not made of `run_dir`'s run and checkpoints.

    One line naming `flag`: another run id, another base model, or a checkpoint whose files changed since it
    was evaluated (re-trained over). Records without provenance (older evaluations) pass with a warning.
    """
    run_dir = Path(run_dir)
    run_id, base_model = read_run_id(run_dir), run_base_model(run_dir)
    fix = f"evaluate this run (`rewardtune evaluate --run {run_dir}`) into a new --out and pass that"
    unrecorded = []
    for record in records:
        name = record.get("checkpoint")
        run = record.get("run")
        if not isinstance(run, dict):
            unrecorded.append(str(name))
            continue
        if run_id and run.get("run_id") and run["run_id"] != run_id:
            raise RewardtuneError(f"{flag} {eval_dir} is the evaluation of another run (run id {run['run_id']}, "
                                  f"{run.get('run_dir')}), not of --run {run_dir} (run id {run_id}); {fix}")
        if base_model and run.get("base_model") and run["base_model"] != base_model:
            raise RewardtuneError(f"{flag} {eval_dir} evaluated base model {run['base_model']}, but --run {run_dir} "
                                  f"was trained from {base_model}; {fix}")
        digest = record.get("digest")
        manifest = _manifest(run_dir / "checkpoints" / str(name)) if name != "base" else None
        if digest and manifest is not None and checkpoint_digest(manifest) != digest:
            raise RewardtuneError(f"{flag} {eval_dir}: checkpoint {name} of --run {run_dir} is not the one that was "
                                  f"evaluated (its files changed since; digest {checkpoint_digest(manifest)[:12]} vs "
                                  f"{str(digest)[:12]}); {fix}")
    if unrecorded:
        log.warning("%s %s: %s carry no run provenance (evaluated before rewardtune recorded it); it cannot be "
                    "checked that they belong to --run %s", flag, eval_dir, ", ".join(unrecorded), run_dir)
