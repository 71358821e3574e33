"""The run's lifecycle around its epochs: SIGTERM's safe points and the votes that make every process stop
together (`Termination`), the run directory's lock and the clean-stop marker around the whole job (`guarded`),
and what a start that fails before its first checkpoint leaves behind (`StartRecord`: nothing).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from rewardtune.checkpoint import latest_checkpoint, list_checkpoints, write_json_atomic
from rewardtune.errors import RewardtuneError, Terminated
from rewardtune.training.setup import Progress, Run

log = logging.getLogger(__name__)


# Written by a run that stopped cleanly on SIGTERM: a launcher reports only "a worker exited non-zero"
# (torchrun and accelerate launch exit 1 even when every rank exited 143), so the stage reads this instead.
TERMINATED_FILE = "terminated.json"
LOCK_FILE = ".rewardtune.lock"


class Termination:
    """SIGTERM: the handler records the request; `safe_point` and `votes` make every process stop together.

    It keeps the timing of the current and the last epoch, from which it predicts whether an epoch fits the
    `checkpointing.termination_grace_s` that remains.
    """

    def __init__(self, accelerator: Accelerator, device: torch.device, grace_s: float, checkpoint_dir: Path) -> None:
        self.accelerator = accelerator
        self.device = device
        self.grace_s = grace_s
        self.checkpoint_dir = checkpoint_dir
        self.requested_at: float | None = None  # monotonic time of SIGTERM
        self.epoch_started_at = 0.0
        self.last_epoch_s: float | None = None  # wall time of the last full epoch, checkpoint included

    def on_sigterm(self, signum: int, frame: object) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            log.warning("SIGTERM received: stopping at the next safe point (grace %.0f s)", self.grace_s)

    def epoch_started(self) -> None:
        self.epoch_started_at = time.monotonic()

    def epoch_ended(self) -> None:
        self.last_epoch_s = time.monotonic() - self.epoch_started_at

    def safe_point(self, epoch: int) -> None:
        """Inside an epoch: after SIGTERM, stop now unless the rest of the epoch and its checkpoint fit the grace.

        Only epoch boundaries are checkpointed (mid-epoch state would need the sampled trajectories), so
        stopping here loses this epoch's work but nothing else: resume redoes it bit-identically.
        """
        if self.requested_at is None and self.accelerator.num_processes == 1:
            return
        now = time.monotonic()
        # the epoch (checkpoint included) is predicted to end as the last one did, or now if it is already later
        fits = self.requested_at is None or (
            self.last_epoch_s is not None
            and max(self.epoch_started_at + self.last_epoch_s, now) < self.requested_at + self.grace_s
        )
        requested, fits = self.votes(fits)
        if not requested or fits:
            return
        found = latest_checkpoint(self.checkpoint_dir)
        newest = found[0].name if found else "none (starts over)"
        raise Terminated(f"SIGTERM: epoch {epoch} cannot finish within the {self.grace_s:g} s "
                         f"grace ({now - self.epoch_started_at:.1f} s in); stopped without a new checkpoint, newest is "
                         f"{newest}; run again with --resume")

    def votes(self, fits: bool) -> tuple[bool, bool]:
        """(some process got SIGTERM, every process has time to finish the epoch), agreed by all processes,
        so that none stops alone and leaves the others waiting in a collective."""
        requested = self.requested_at is not None
        if self.accelerator.num_processes == 1:
            return requested, fits
        vote = torch.tensor([[float(requested), float(fits)]], device=self.device)
        votes = self.accelerator.gather(vote)
        return bool(votes[:, 0].max() > 0), bool(votes[:, 1].min() > 0)


def lock_out_dir(out_dir: Path, wait: float) -> FileLock:
    """An exclusive lock on the run directory, held for the whole run (filelock: flock on POSIX).

    A retried pod can start while the old one is still inside its termination grace, writing its last
    checkpoint; the new one waits up to `checkpointing.lock_wait_s` for it instead of writing alongside.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    lock = FileLock(path, mode=0o644)
    try:
        lock.acquire(timeout=0)
    except FileLockTimeout:
        if wait > 0:
            log.warning("%s is locked by another run; waiting up to %g s", out_dir, wait)
        try:
            if wait <= 0:
                raise
            lock.acquire(timeout=wait, poll_interval=0.2)
        except FileLockTimeout:
            raise RewardtuneError(
                f"{out_dir} is in use by another `rewardtune train` (lock {path.name} held for "
                f"{wait:g} s); wait for it to end or choose another --out"
            ) from None
    return lock


class StartRecord:
    """What the output directory held before a run started, so that a start failing before its first
    checkpoint can take back exactly what it wrote (config.yaml, an empty metrics.jsonl, the lock, tracker
    files): a stub would otherwise pass for a run with `--resume`, `evaluate` and `export`.

    Only entries that did not exist before are removed (an `--out` that already held other files keeps
    them), and nothing at all once a checkpoint exists: from then on the directory is a run.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.existed = self.out_dir.is_dir()
        self.before: set[str] | None
        try:
            self.before = {p.name for p in self.out_dir.iterdir()} if self.existed else set()
        except OSError:  # unreadable: the run fails on its own; take nothing back
            self.existed, self.before = True, None

    def undo(self, lock: FileLock | None = None) -> None:
        """Remove what this start created, unless it got as far as a checkpoint; the lock file goes last."""
        if self.before is None or not self.out_dir.is_dir() or list_checkpoints(self.out_dir / "checkpoints"):
            if lock is not None:
                lock.release()
            return
        if lock is None:  # another trainer holding the directory (a retried pod's predecessor) keeps its files
            lock = FileLock(self.out_dir / LOCK_FILE, mode=0o644)
            try:
                lock.acquire(timeout=0)
            except FileLockTimeout:
                return
        created = [p for p in self.out_dir.iterdir() if p.name not in self.before and p.name != LOCK_FILE]
        for path in created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if LOCK_FILE not in self.before:
            (self.out_dir / LOCK_FILE).unlink(missing_ok=True)
        if lock is not None:
            lock.release()
        if not self.existed:
            try:
                self.out_dir.rmdir()  # only if empty: a file another process wrote meanwhile stays
            except OSError:
                pass
        if created:
            names = ", ".join(sorted(p.name for p in created))
            log.debug("removed what the failed start wrote to %s (%s): it holds no checkpoint", self.out_dir, names)


def is_main_process_env() -> bool:
    """Rank 0 by the launcher's environment (torchrun, accelerate): before the Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def guarded(run: Run, termination: Termination, progress: Progress, start: StartRecord | None = None) -> Iterator[None]:
    """The whole job's guard: the run-directory lock, the SIGTERM handler, on a clean stop (`Terminated`)
    the marker file a launcher's caller reads, and on a failure before the first checkpoint `start.undo()`."""
    handler_installed = threading.current_thread() is threading.main_thread()
    lock = lock_out_dir(run.out_dir, run.cfg.checkpointing.lock_wait_s) if run.is_main else None
    previous = signal.signal(signal.SIGTERM, termination.on_sigterm) if handler_installed else None
    stopped = failed = False
    try:
        yield
    except Terminated as err:
        stopped = True
        if run.is_main:
            write_json_atomic(run.out_dir / TERMINATED_FILE, {"message": str(err), "epochs_done": progress.epochs_done})
        raise
    except BaseException:
        failed = True
        raise
    finally:
        # Under a launcher, the first rank to exit makes it SIGTERM the others, which may still be on their
        # way out of a clean stop: they keep this (recording, not killing) handler until they exit.
        if handler_installed and not (stopped and run.accelerator.num_processes > 1):
            signal.signal(signal.SIGTERM, previous)
        run.tracker.finish()
        if failed and start is not None and run.is_main:
            start.undo(lock)  # while holding the lock: a retried pod waiting for it must not lose its files
        elif lock is not None:
            lock.release()
