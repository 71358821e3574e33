"""Helpers that damage runs the way a disk, a user or a half-finished copy would (fuzz and bad-input tests)."""

from __future__ import annotations

import json
from pathlib import Path

from rewardtune.checkpoint import MANIFEST, sha256_file


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def rehash_checkpoint(checkpoint: Path) -> None:
    """Rewrite a checkpoint's manifest to match its files as they are now: damage the loader itself must catch."""
    manifest_path = checkpoint / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"] = {p.relative_to(checkpoint).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in files_of(checkpoint) if p.name != MANIFEST}
        manifest_path.write_text(json.dumps(manifest))
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # the manifest itself was the damaged file
