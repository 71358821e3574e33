"""The policy's learning-rate warm-up: a pure function of the optimizer step, so a resumed run needs no
scheduler state (the restored `global_step` gives the same rate).

Why: Adam's first steps move every coordinate by about the full learning rate, whatever the gradient's
noise, so a constant rate that is right for later epochs shocks the policy in epoch 0. A linear warm-up
(diffusers' `constant_with_warmup`) lets epoch 0 stay calm while later epochs get the calibrated rate.
"""

from __future__ import annotations

__all__ = ["warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of the learning rate at optimizer step `step` (1 = the first step).

    Linear from 1/warmup_steps at step 1 to 1 at step warmup_steps, then 1. This is diffusers'
    `get_constant_schedule_with_warmup` shifted by one step: diffusers' first step has factor 0, a step
    that moves nothing; here every step moves. `warmup_steps = 0` is a constant rate.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)
