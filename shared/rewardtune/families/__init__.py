"""Model families behind one seam (`PolicyFamily`): `sd` (DDIM + UNet) and `flow` (SD3/SD3.5, FLUX)."""

from __future__ import annotations

import torch

from rewardtune.families.base import Conditioning, PolicyFamily, Rollout, Step

FAMILY_NAMES = ("sd", "sd3", "flux")


def make_family(pipe, *, eta: float = 1.0, flow=None, model: torch.nn.Module | None = None) -> PolicyFamily:
    """The family of a loaded pipeline: `sd` for StableDiffusionPipeline, `flow` for SD3/FLUX pipelines.

    `flow` is a `config.FlowSamplingConfig` (None: its defaults); `model` is the (possibly wrapped) denoiser
    the family should call, e.g. the accelerator-prepared one.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline)):
        from rewardtune.config import FlowSamplingConfig
        from rewardtune.families.flow import FlowFamily

        flow = flow or FlowSamplingConfig()
        window = None if flow.sde_window is None else (flow.sde_window.start, flow.sde_window.size)
        return FlowFamily(pipe, flow.noise_level, flow.sde_type, window, flow.train_last_step,
                          flow.max_sequence_length, model)
    if isinstance(pipe, StableDiffusionPipeline):
        from rewardtune.families.sd import SDFamily

        return SDFamily(pipe, eta, model)
    raise TypeError(f"no model family for {type(pipe).__name__}; supported: {', '.join(FAMILY_NAMES)}")


__all__ = ["FAMILY_NAMES", "Conditioning", "PolicyFamily", "Rollout", "Step", "make_family"]
