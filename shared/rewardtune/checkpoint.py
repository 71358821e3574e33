"""Atomic, verifiable checkpoints.

A checkpoint is a directory written under a temporary name, fsynced, given a sha256 manifest last,
then renamed into place: a directory without a valid manifest is by definition incomplete and is
never loaded. Resume picks the newest valid checkpoint and skips broken ones with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewardtune.errors import CheckpointError
from rewardtune.faults import fault_point

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

# Resume never starts from a pre-reset checkpoint: it is a rollback point, not the run's state.
RESUMABLE_KINDS = ("regular", "post_reset")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a reader sees the old content or the new, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def checkpoint_name(epochs_done: int, kind: str) -> str:
    suffix = {"regular": "", "pre_reset": "-pre-reset", "post_reset": "-post-reset"}[kind]
    return f"epoch-{epochs_done:06d}{suffix}"


def save_checkpoint(
    root: Path, epochs_done: int, kind: str, write: Callable[[Path], None], meta: dict[str, Any]
) -> Path:
    """Write a checkpoint with `write(tmpdir)`, add the manifest, and rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(epochs_done, kind)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    fault_point("checkpoint_files")
    files = {
        str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    write_json_atomic(tmp / MANIFEST, {"epochs_done": epochs_done, "kind": kind, "meta": meta, "files": files})
    _fsync_tree(tmp)
    fault_point("checkpoint_rename")
    if final.exists():
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        fault_point("checkpoint_swap")
        tmp.rename(final)
        shutil.rmtree(trash)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: without this a power cut may forget the checkpoint's new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale(root: Path) -> list[Path]:
    """Delete temporary and trash directories a killed writer left behind; they are never loadable."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".trash-"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_checkpoint(path: Path) -> None:
    """Rename out of the `epoch-*` namespace first, so a kill mid-delete never leaves a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    path.rename(trash)
    fault_point("checkpoint_delete")
    shutil.rmtree(trash)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest if every listed file is present with its sha256; raise otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it was never completed")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON") from None
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (corrupt)")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Completed-looking checkpoint directories, oldest first (temporary dirs are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch-"))


def latest_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid resumable checkpoint; broken ones are skipped with a warning."""
    candidates = []
    for path in list_checkpoints(root):
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
            continue
        if manifest["kind"] in RESUMABLE_KINDS:
            candidates.append((manifest["epochs_done"], manifest["kind"] == "post_reset", path, manifest))
    if not candidates:
        return None
    _, _, path, manifest = max(candidates, key=lambda c: (c[0], c[1]))
    return path, manifest


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` regular checkpoints; reset checkpoints are kept."""
    regular = [p for p in list_checkpoints(root) if not p.name.endswith("-reset")]
    for path in regular[:-keep_last]:
        remove_checkpoint(path)
