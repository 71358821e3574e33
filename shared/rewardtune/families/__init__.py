"""Model families behind one seam (`PolicyFamily`): `sd` (DDIM + UNet) and `flow` (SD3/SD3.5, FLUX)."""

from __future__ import annotations

from rewardtune.families.base import Conditioning, PolicyFamily, Rollout, Step

FAMILY_NAMES = ("sd", "sd3", "flux")

__all__ = ["FAMILY_NAMES", "Conditioning", "PolicyFamily", "Rollout", "Step"]
