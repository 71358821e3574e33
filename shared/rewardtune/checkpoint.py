"""Atomic, verifiable checkpoints.

A checkpoint is a directory written under a temporary name, fsynced, given a sha256 manifest last,
then renamed into place: a directory without a valid manifest is by definition incomplete and is
never loaded. Resume picks the newest valid checkpoint and skips broken ones with a warning.
"""

from __future__ import annotations

import errno
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
from rewardtune.safe_paths import UnsafePathError, apply_umask, contained

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

# Resume never starts from a pre-reset checkpoint: it is a rollback point, not the run's state.
RESUMABLE_KINDS = ("regular", "post_reset")
KINDS = ("regular", "pre_reset", "post_reset")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then `root` itself, to disk: what a rename into place must follow."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a reader sees the old content or the new, never a torn file."""
    _write_atomic(path, text, "w")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _write_atomic(path, data, "wb")


def _write_atomic(path: Path, payload: str | bytes, mode: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open(mode) as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave temp files behind either
        raise


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable, not JSON or not an object: for files
    whose absence or damage means "nothing recorded here" (a retried export's summary, a checkpoint's manifest)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        fault_point("checkpoint_files")
        apply_umask(tmp)  # safetensors writes 0600: another pod's user on a shared volume must read it too
        files = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        write_json_atomic(tmp / MANIFEST, {"epochs_done": epochs_done, "kind": kind, "meta": meta, "files": files})
        fsync_tree(tmp)
    except Exception as err:
        failure = storage_failure(err, root)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{failure} while writing checkpoint {final}; the partial write was removed and "
                              f"{_previous_state(root)}; {_fix_for(failure)}") from None
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


DISK_FULL = "disk full (no space left on the device)"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left", "os error 28", "disk quota exceeded", "os error 122")
_TORCH_WRITE_TEXT = ("inline_container", "unexpected pos", "pytorchstreamwriter")


def free_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def storage_failure(err: BaseException, where: Path) -> str | None:
    """What a failed write means for the user, or None if it is not a storage failure (a bug: re-raised).

    torch.save reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`,
    losing the errno; the filesystem's free space (read before the partial write is removed) says then.
    """
    text = str(err).lower()
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS or any(t in text for t in _FULL_TEXT):
        return DISK_FULL
    if any(t in text for t in _TORCH_WRITE_TEXT):
        free = free_bytes(where)
        return DISK_FULL if free is not None and free < (1 << 20) else "a write error (torch could not write the file)"
    if isinstance(err, OSError):
        return f"{err.strerror or err} (errno {err.errno})"
    return None


def _fix_for(failure: str) -> str:
    if failure == DISK_FULL:
        return "free space (or lower checkpointing.keep_last) and run again with --resume"
    return "fix the storage and run again with --resume"


def _previous_state(root: Path) -> str:
    """Which checkpoint a resume would continue from, checked, so that the message's promise is true."""
    found = list_checkpoints(root)
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return f"the previous checkpoint {path.name} is intact"
    return "no earlier checkpoint exists (a resume starts from epoch 0)"


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
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or not files or manifest.get("kind") not in KINDS
            or not isinstance(manifest.get("epochs_done"), int) or isinstance(manifest.get("epochs_done"), bool)):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lacks a valid files/kind/epochs_done entry (damaged)")
    for name, entry in files.items():
        try:
            file = contained(path, name, f"checkpoint {path}")
        except UnsafePathError as err:
            raise CheckpointError(str(err)) from None
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if (not isinstance(entry, dict) or file.stat().st_size != entry.get("size")
                or sha256_file(file) != entry.get("sha256")):
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (corrupt)")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Completed-looking checkpoint directories, oldest first (temporary dirs are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch-"))


def warn_stray_checkpoint_files(root: Path) -> None:
    """Warn about non-directories named like checkpoints (`epoch-*`): a checkpoint is a directory, so they are
    skipped; a user who copied a checkpoint as an archive or a file must hear why it is not used."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith("epoch-") and not path.is_dir():
            log.warning("skipping %s: named like a checkpoint but not a directory (a checkpoint is a directory "
                        "with %s; unpack it or move it out of %s)", path, MANIFEST, root)


def latest_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid resumable checkpoint; broken ones are skipped with a warning."""
    warn_stray_checkpoint_files(root)
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
