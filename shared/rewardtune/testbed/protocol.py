"""The pre-registered protocol of the overoptimization benchmark (benchmarks/overopt/protocol.yaml).

One validated schema: arms, paired seeds, budget, evaluation, the primary metric and its decision rule,
the validity gates and the secondary analyses. `smoke()` shrinks a protocol to a minutes-long check of
the machinery (2 seeds, 4 epochs); a smoke run never carries a verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewardtune.config import format_validation_error
from rewardtune.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Arm(_Strict):
    """One method: an algorithm on the proxy, with its own overrides of the shared config (its calibration)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    algorithm: Literal["ddpo", "tdpo", "tdpo_r", "cdpo", "grpo"]
    overrides: list[str] = Field(default_factory=list, description="section.key=value applied to the base config.")


class Primary(_Strict):
    proxy_gain: float = Field(0.05, gt=0, description="GMP is read at this held-out proxy gain over the base model.")
    level: float = Field(0.95, gt=0, lt=1)
    bootstrap_resamples: int = Field(10_000, ge=100)
    bootstrap_seed: int = 0
    sesoi_fraction: float = Field(
        0.2, gt=0, le=1, description="Smallest effect of interest = this × proxy_gain (gold and proxy share a scale)."
    )
    metric: Literal["gmp", "final_gold"] = Field(
        "gmp", description="gmp (overopt-v3 to v6): gold at a proxy gain. final_gold (issue 31): held-out gold at a "
        "fixed reward-query budget, matched across arms, with drawdown and gold area as secondary signs.",
    )
    budget: int | None = Field(
        None, ge=1, description="final_gold: reward queries at which gold is read (None: the smallest final count of any arm)."
    )
    sesoi: float | None = Field(
        None, gt=0, description="final_gold: the smallest effect of interest in gold, fixed from the pilot's oracle "
        "headroom (e.g. a quarter of oracle - DDPO) before the confirmatory run.",
    )
    proxy_margin: float = Field(
        0.01, ge=0, description="final_gold: a method counts only if its paired proxy gain's 95% lower bound is "
        "above DDPO's minus this (it must not buy gold by optimizing less).",
    )


class Control(_Strict):
    """A validity-gate run: DDPO on another reward (gold itself, or the proxy with shuffled scores)."""

    reward: str
    seeds: list[int] = Field(min_length=1)


class Gates(_Strict):
    reach_fraction: float = Field(0.8, gt=0, le=1, description="Share of each arm's runs that must reach proxy_gain.")
    gold_trained: Control
    shuffled_proxy: Control
    best_of_n_max: int = Field(16, ge=2)
    best_of_n_prompts: int = Field(54, ge=1)
    probe_renders: int = Field(4, ge=1, description="World renders per held-out prompt for the proxy probe table.")
    instrument: InstrumentGates | None = Field(None, description="G0-G4 (issue 31); required by primary.metric final_gold.")


class InstrumentGates(_Strict):
    """Issue 31's gates: the instrument proves on its controls that it can see the effect (final_gold only)."""

    power: float = Field(0.8, gt=0, lt=1, description="G0: the rule passes the oracle with at least this simulated power.")
    overoptimized_fraction: float = Field(0.7, gt=0, le=1, description="G1: DDPO's gold peaks then falls in this share of seeds.")
    drop: float = Field(0.02, gt=0, description="G1: the fall after gold's peak that counts as overoptimization.")
    critic_ev: float = Field(0.3, description="G2: TDPO critic's explained variance, later half before the first reset.")
    critic_ev_last_third: float = Field(0.6, description="G2: the same on the last third of the denoising steps.")
    dormant_low: float = Field(0.1, ge=0, le=1, description="G3: dormant share of critic neurons at a reset, lower bound.")
    dormant_high: float = Field(0.9, ge=0, le=1, description="G3: upper bound.")
    violated_fraction: float = Field(0.7, gt=0, le=1, description="G4: DDPO breaks the fidelity constraint in this share.")


class Secondary(_Strict):
    path_kl_prompts: int = Field(8, ge=1, description="Held-out prompts of the fixed path-KL subset.")
    path_kl_images: int = Field(2, ge=1)
    fit_resamples: int = Field(1000, ge=10)
    fidelity_tolerance: float = Field(0.02, ge=0, description="CDPO's claim: final fidelity >= threshold - this.")


class Protocol(_Strict):
    name: str
    config: str = Field(description="The shared run config, relative to the repository root (or absolute).")
    arms: list[Arm] = Field(min_length=2)
    baseline: str = "ddpo"
    seeds: list[int] = Field(min_length=2)
    epochs: int = Field(24, ge=1)
    checkpoint_every: int = Field(4, ge=1)
    heldout_prompts: int = Field(54, ge=1)
    images_per_prompt: int = Field(2, ge=1)
    cdpo_fidelity_margin: float = Field(0.05, ge=0)
    cdpo_fidelity_threshold: float | None = Field(
        None, ge=0, le=1, description="CDPO's absolute training constraint E[fidelity] >= this (from a large base "
        "sample), instead of each run's epoch-0 mean - cdpo_fidelity_margin (16 images: it binds on the draw)."
    )
    unseen_rewards: list[str] = Field(
        default_factory=list, description="Further rewards every checkpoint is scored on and no run trains on (the "
        "papers' cross-reward table), e.g. testbed_proxy_b, testbed_proxy_c.",
    )
    primary: Primary = Field(default_factory=Primary)
    gates: Gates
    secondary: Secondary = Field(default_factory=Secondary)
    smoke: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms name {names}: every arm needs its own name")
        if self.baseline not in names:
            raise ValueError(f"baseline '{self.baseline}' is not one of the arms {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        if self.primary.metric == "final_gold" and (self.primary.sesoi is None or self.gates.instrument is None):
            raise ValueError("primary.metric final_gold needs primary.sesoi (from the pilot's oracle headroom) and "
                             "gates.instrument (G0-G4); set both before pre-registering")
        if self.epochs < 2 * self.checkpoint_every:
            raise ValueError(f"epochs={self.epochs} gives fewer than 2 checkpoints every {self.checkpoint_every}; GMP needs a line")
        return self


def load_protocol(path: str | Path) -> Protocol:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--protocol {path} does not exist; use benchmarks/overopt/protocol.yaml")
    try:
        data = yaml.safe_load(path.read_text())
        return Protocol.model_validate(data)
    except yaml.YAMLError as err:
        raise ConfigError(f"protocol {path} is not valid YAML: {getattr(err, 'problem', err)}") from None
    except ValidationError as err:
        raise ConfigError(f"protocol {path}: " + format_validation_error(err).replace("config error", "error")) from None


def smoke(p: Protocol) -> Protocol:
    """The same arms and analysis at toy size: 2 seeds, 4 epochs, checkpoints every 2, a few prompts."""
    data = p.model_dump()
    data |= {"seeds": p.seeds[:2], "epochs": 4, "checkpoint_every": 2, "heldout_prompts": 4, "images_per_prompt": 2,
             "smoke": True}
    data["primary"]["bootstrap_resamples"] = 1000
    data["gates"] |= {"best_of_n_max": 4, "best_of_n_prompts": 4, "probe_renders": 1}
    for key in ("gold_trained", "shuffled_proxy"):
        data["gates"][key]["seeds"] = data["gates"][key]["seeds"][:1]
    data["secondary"] |= {"path_kl_prompts": 2, "path_kl_images": 1, "fit_resamples": 50}
    return Protocol.model_validate(data)
