"""Per-replica state digests, to check that every process of a multi-process run holds the same weights.

Data parallelism is only correct while every replica is bit-identical: all-reduced gradients keep them so,
but anything a rank decides alone (a neuron-reset mask from its own samples, a re-draw from its own RNG)
silently forks them. With ``RT_DIGEST_DIR`` set, every process appends one JSON line per epoch and per
reset to ``DIR/rank-<i>.jsonl`` with the sha256 of its policy, critic and optimizer state; the multi-process
tests compare the ranks' files. Unset, nothing is computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

DIGEST_ENV = "RT_DIGEST_DIR"


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the given order."""
    digest = hashlib.sha256()
    for name, tensor in named:
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the optimizer's per-parameter state (Adam's moments and step), in parameter order."""
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            for key, value in sorted(optimizer.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor):
                    out.append((f"{g}.{i}.{key}", value))
    return out


def record(phase: str, epoch: int, process: int, parts: Mapping[str, Iterable[tuple[str, torch.Tensor]]]) -> None:
    """Append {phase, epoch, <part>: sha256} to DIR/rank-<process>.jsonl when RT_DIGEST_DIR is set."""
    directory = os.environ.get(DIGEST_ENV)
    if not directory:
        return
    line = {"phase": phase, "epoch": epoch, **{name: tensors_digest(tensors) for name, tensors in parts.items()}}
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"rank-{process}.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")
