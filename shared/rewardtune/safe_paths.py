"""Untrusted names and file modes: a name read from a manifest or a config never leaves its root, and
what we write gets the modes the user's umask asks for.

Manifests (in a cache bucket anyone with write access can edit) and configs name files; joining such a
name onto a directory without checking it lets `/abs/path` or `../../x` write or read anywhere. Every such
join goes through `contained`. Temporary directories (`tempfile.mkdtemp`, 0700) and safetensors files
(0600) ignore the umask; a checkpoint or a tiny model on a shared volume must be readable by the other
pods' users when the umask says so, hence `apply_umask`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from rewardtune.errors import RewardtuneError


class UnsafePathError(RewardtuneError):
    """A name from an untrusted source (manifest, config) would resolve outside its root."""


def check_relative_name(name: object, what: str) -> str:
    """`name` as a safe relative POSIX path: a non-empty string, not absolute, no `..`, no NUL or backslash."""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise UnsafePathError(f"{what}: file name {name!r} is not a plain relative path")
    parts = PurePosixPath(name).parts
    if (name.startswith(("/", "~")) or "\\" in name or "\x00" in name or ".." in parts or not parts
            or (len(name) > 1 and name[1] == ":")):
        raise UnsafePathError(f"{what}: file name {name!r} is absolute or climbs out of its directory (..); refused")
    return name


def contained(root: Path, name: object, what: str) -> Path:
    """`root / name`, refused unless the name is relative and, with symlinks resolved, stays inside `root`."""
    rel = check_relative_name(name, what)
    try:
        base = Path(root).resolve()
        target = (base / rel).resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError for a symlink loop
        raise UnsafePathError(f"{what}: file name {rel!r} cannot be resolved ({err}); refused") from None
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what}: file name {rel!r} resolves to {target}, outside {base}; refused")
    return Path(root) / rel


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would have given (umask applied)."""
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        executable = path.is_dir() or bool(mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)
