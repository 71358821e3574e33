"""Refuse a run directory that the training processes do not share, before any work is done.

Across nodes only process 0 writes checkpoints and metrics, and every process reads them back on `--resume`:
if each node has its own directory (a ReadWriteOnce volume, a node-local path), the other nodes silently start
from scratch, or hang waiting for files that never appear. Rank 0 writes a file with a fresh token; every rank
looks for it; the verdicts are exchanged with a collective every rank takes part in, so all fail together with
one message instead of deadlocking.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

from rewardtune.errors import RewardtuneError

PROBE = ".rt-shared-probe-{token}"


def missing_ranks(verdicts: list[tuple[int, str, bool]]) -> list[tuple[int, str]]:
    """(rank, host) of the processes that did not see rank 0's probe file."""
    return [(rank, host) for rank, host, seen in sorted(verdicts) if not seen]


def require_shared_dir(run_dir: str | Path, accelerator: Any) -> None:
    """Raise `RewardtuneError` on every process unless all of them see the same `run_dir` (no-op for one)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    run_dir = Path(run_dir)
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    probe = run_dir / PROBE.format(token=token[0])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
        with open(probe) as handle:
            os.fsync(handle.fileno())
    accelerator.wait_for_everyone()
    seen = probe.is_file() and probe.read_text() == token[0]
    verdicts = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    missing = missing_ranks(verdicts)
    if missing:
        where = ", ".join(f"rank {rank} on {host}" for rank, host in missing)
        raise RewardtuneError(
            f"{run_dir} is not shared between the training processes ({where} cannot see rank 0's files); "
            "multi-node training needs one ReadWriteMany volume mounted at this path on every node"
        )
