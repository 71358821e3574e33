"""Several multi-process checks in ONE launch (`torchrun`/`accelerate launch ... -m tests.mp_driver SPEC`):
starting N interpreters costs far more than the tiny runs themselves, so every scenario of
tests/test_multiprocess.py that needs no signal runs here, one after the other, in one process group.

SPEC is a JSON list of steps:
- {"kind": "train", "config": PATH, "out": DIR, "resume": bool, "digests": DIR, "sets": [...]}: `Trainer.run`,
  with RT_DIGEST_DIR=digests (every rank records its state digests per epoch and per reset);
- {"kind": "grad", "config": PATH, "reference": FILE, "out": FILE}: take this rank's share of the samples the
  single-process reference stored, recompute their advantages, train one epoch (one optimizer step) and
  write the gradients the optimizer saw, the advantages and the logged statistics (rank 0).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from rewardtune.config import load_config
from rewardtune.digests import DIGEST_ENV
from rewardtune.trainer import EpochSamples, Trainer

SAMPLE_FIELDS = ("latents", "next_latents", "timesteps", "log_probs", "prompt_embeds", "negative_embeds", "images", "rewards")


def capture_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copy every trainable gradient at the optimizer step (after clipping: what the update uses)."""
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step
    named = [(f"policy.{n}", p) for n, p in trainer.policy.named_parameters() if p.requires_grad]
    if trainer.critics is not None:
        named += [(f"critic.{n}", p) for n, p in trainer.accelerator.unwrap_model(trainer.critics).named_parameters()]

    def recording_step(*args, **kwargs):
        if trainer.accelerator.sync_gradients:
            if grads:
                raise AssertionError("more than one optimizer step in the epoch")
            grads.update({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


def keep_order(trainer: Trainer) -> None:
    """Train the samples and time columns in stored order: the shuffle is not under test, and its per-process
    seeds would make one process and two train different (sample, step) pairs in a one-column epoch."""

    def in_order(samples: EpochSamples, generator: torch.Generator) -> dict[str, torch.Tensor]:
        k = samples.timesteps.shape[1]
        batch = {name: getattr(samples, name) for name in
                 ("latents", "next_latents", "timesteps", "log_probs", "advantages", "prompt_embeds", "negative_embeds")}
        return batch | {name: v for name, v in samples.extras.items() if v.ndim >= 2 and v.shape[1] == k}

    trainer.ppo.shuffled = in_order


def samples_share(stored: dict, rank: int, world: int) -> EpochSamples:
    n = len(stored["prompts"]) // world
    rows = slice(rank * n, (rank + 1) * n)
    return EpochSamples(prompts=stored["prompts"][rows], **{k: stored[k][rows] for k in SAMPLE_FIELDS},
                        extras={k: v[rows] for k, v in stored["extras"].items()})


def grad_step(step: dict) -> None:
    trainer = Trainer(load_config(step["config"]), step["out"] + ".run")
    acc = trainer.accelerator
    stored = torch.load(step["reference"], weights_only=False)
    samples = samples_share(stored["samples"], acc.process_index, acc.num_processes)
    trainer.compute_advantages(samples)
    grads = capture_gradients(trainer)
    keep_order(trainer)
    stats = trainer.train_epoch(samples, 0)
    advantages = acc.gather(samples.advantages)
    if acc.is_main_process:
        torch.save({"grads": grads, "stats": stats, "advantages": advantages, "world": acc.num_processes}, step["out"])


def main(spec_path: str) -> None:
    for step in json.loads(open(spec_path).read()):
        if step["kind"] == "train":
            os.environ[DIGEST_ENV] = step["digests"]
            Trainer(load_config(step["config"], step.get("sets", [])), step["out"]).run(resume=step.get("resume", False))
            os.environ.pop(DIGEST_ENV)
        else:
            grad_step(step)


if __name__ == "__main__":
    main(sys.argv[1])
