"""Deterministic fault injection at named points of training, checkpointing and evaluation.

The preemption tests need to kill the process *exactly* mid optimizer step, mid checkpoint write or
around a neuron reset; timing-based kills would be flaky and would not say which point was hit. So the
code calls `fault_point(phase)` at those places. Unless `RT_FAULT_AT` or `RT_FAULT_TRACE` is set this is
one dict lookup and does nothing.

- ``RT_FAULT_AT="optimizer_step:3"`` sends SIGKILL to this process the 3rd time that point is reached;
  ``"term@sample:2"`` sends SIGTERM instead (what Kubernetes sends first). Several, comma-separated.
- ``"enospc@checkpoint_files:1"`` raises ``OSError(ENOSPC)`` there instead: a disk that fills up mid-write.
- ``RT_FAULT_TRACE=FILE`` appends ``phase:n`` for every point reached (the harness samples kill points
  from the trace of an uninterrupted run, so every sampled point is really reached).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

FAULT_ENV = "RT_FAULT_AT"
TRACE_ENV = "RT_FAULT_TRACE"

_counts: Counter[str] = Counter()


def fault_point(phase: str) -> None:
    """Count this point; record it, and kill or terminate this process if the environment asks to."""
    spec = os.environ.get(FAULT_ENV, "")
    trace = os.environ.get(TRACE_ENV, "")
    if not spec and not trace:
        return
    _counts[phase] += 1
    here = f"{phase}:{_counts[phase]}"
    if trace:
        with open(trace, "a") as handle:
            handle.write(here + "\n")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, point = item.rpartition("@")
        if point == here and action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if point == here:
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGKILL)
