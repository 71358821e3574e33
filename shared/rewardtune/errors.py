"""User-facing errors: one line that names the problem and the fix, shown without a traceback."""


class RewardtuneError(Exception):
    """An error caused by the user's input or environment, not by a bug in rewardtune."""


class ConfigError(RewardtuneError):
    """A config value is missing, unknown or out of range."""


class CheckpointError(RewardtuneError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


class RewardError(RewardtuneError):
    """A reward function returned unusable values (NaN/inf) or could not be built."""


class Terminated(RewardtuneError):
    """The run stopped on SIGTERM (pod eviction, preemption); `--resume` continues it bit-identically."""

    exit_code = 143  # 128 + SIGTERM, what a shell and Kubernetes report for a terminated process


def describe_os_error(err: OSError) -> str:
    """One line for an OSError that reached the CLI: what happened, to which path, and what to do.

    An OSError is the environment (permissions, a read-only mount, a full disk, a vanished file), never
    the config: it still deserves a line naming the path instead of a traceback.
    """
    import errno
    import os

    path = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    reason = err.strerror or os.strerror(err.errno or 0) or type(err).__name__
    hint = {
        errno.ENOSPC: "the disk is full: free space and run again (train: --resume; written checkpoints are intact)",
        errno.EDQUOT: "the disk quota is exhausted: free space and run again",
        errno.EACCES: "check the path's permissions or choose another path",
        errno.EPERM: "check the path's permissions or choose another path",
        errno.EROFS: "the file system is read-only: choose a writable path (e.g. a mounted volume) for --out",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
        errno.EISDIR: "a directory is where a file was expected: check the path",
        errno.ELOOP: "the path is a symlink loop: check the path",
        errno.ENAMETOOLONG: "shorten the path",
    }.get(err.errno or 0, "check the path and the storage")
    if err.errno in (errno.EACCES, errno.EPERM) and os.environ.get("RT_IN_IMAGE") == "1":
        hint = container_write_hint()
    return f"{reason}: {path}; {hint}"


def container_write_hint() -> str:
    """The fix for a mounted volume the image's non-root user cannot write (the images set RT_IN_IMAGE=1).

    The images run as uid 1000, and a bind mount or volume keeps its owner's permissions, so the usual cause is
    a directory owned by another uid: the user's own (`-u`), or a pod volume without `fsGroup`.
    """
    import os

    uid, gid = os.getuid(), os.getgid()
    return (f"this container runs as uid {uid} (gid {gid}) and cannot write there: run it as the directory's owner "
            "(docker/podman run -u $(id -u):$(id -g) ...), or make the directory writable for uid "
            f"{uid} (chown {uid} DIR), or on Kubernetes set the pod's securityContext.fsGroup: {gid}")


def one_line(text: str) -> str:
    """A message as one line: a value quoted into it (a file name, a prompt) may hold line breaks."""
    lines = text.splitlines()
    return " ".join(lines) if lines else text
