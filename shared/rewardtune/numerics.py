"""Non-finite training state is stopped where it starts, naming the cause, before it can be checkpointed.

A learning rate that is finite but far too large turns the weights into inf/NaN within a step; left alone,
the NaN weights are saved as a valid checkpoint and the next epoch's images are NaN, which the reward check
then blames on the reward model. So every epoch, before anything is saved: the losses, the gradient norms
of every optimizer step, and every trained weight must be finite. Sampled images are checked before the
reward sees them, so a NaN policy is reported as the policy's fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from rewardtune.errors import RewardtuneError

ADVICE = ("lower training.learning_rate or training.max_grad_norm, or check the reward's scale; no checkpoint "
          "was written for this epoch (the newest one is unchanged)")


class NonFiniteTrainingError(RewardtuneError):
    """A loss, gradient or weight became NaN/inf: the run stops before saving it."""


def count_nonfinite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Non-finite elements per tensor, with one device-to-host transfer for all of them."""
    if not tensors:
        return []
    counts = torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors])
    return [int(c) for c in counts.cpu()]


class StepHealth:
    """Collects each optimizer step's gradient norms (no sync per step) and checks an epoch at its end.

    Under fp16 the GradScaler skips steps with inf gradients by design, so only the weights are checked.
    """

    def __init__(self, mixed_precision: str) -> None:
        self.check_steps = mixed_precision != "fp16"
        self.grad_norms: list[torch.Tensor] = []

    def record(self, norms: Iterable[torch.Tensor]) -> None:
        self.grad_norms.extend(torch.as_tensor(n).detach().float().reshape(()) for n in norms)

    def check(self, epoch: int, stats: dict[str, float], named: Sequence[tuple[str, torch.Tensor]]) -> None:
        causes = []
        if self.check_steps:
            losses = [k for k in ("loss", "critic_loss") if k in stats and not math.isfinite(stats[k])]
            if losses:
                causes.append(f"the {' and '.join(losses)} became non-finite")
            bad_norms = sum(count_nonfinite(self.grad_norms))
            if bad_norms:
                causes.append(f"{bad_norms} of {len(self.grad_norms)} optimizer steps had a non-finite gradient norm")
        self.grad_norms.clear()
        counts = count_nonfinite([p for _, p in named])
        bad = [(name, n) for (name, _), n in zip(named, counts, strict=True) if n]
        if bad:
            total = sum(n for _, n in bad)
            causes.append(f"{total} trained weight(s) in {len(bad)} tensor(s) are NaN/inf (first: {bad[0][0]})")
        if causes:
            raise NonFiniteTrainingError(f"training stopped at epoch {epoch}: {'; '.join(causes)}; {ADVICE}")


def check_images(images: torch.Tensor, prompts: Sequence[str], epoch: int,
                 trained: Sequence[tuple[str, torch.Tensor]] | None = None) -> None:
    """Refuse NaN/inf images before the reward scores them: the model, not the reward, produced them.

    `trained`: the trained weights when the policy has been trained (or resumed), so the message can say
    whether the base model or the training is to blame (huge but finite weights overflow the forward pass).
    """
    bad = ~torch.isfinite(images.detach().flatten(1)).all(dim=1)
    if not bad.any():
        return
    first = prompts[int(torch.nonzero(bad)[0])]
    what = f"epoch {epoch}: the model produced NaN/inf images for {int(bad.sum())} of {len(prompts)} samples (first prompt {first!r})"
    if trained:
        largest = max(float(p.detach().abs().max()) for _, p in trained)
        raise NonFiniteTrainingError(
            f"{what}; the trained weights overflow the forward pass (largest |weight| {largest:.3g}): lower "
            "training.learning_rate or training.max_grad_norm; the reward was not called"
        )
    raise NonFiniteTrainingError(
        f"{what}; the base model's weights (model.source) hold non-finite values, or sampling overflows (model.dtype, "
        "sampling.guidance_scale); the reward was not called"
    )
