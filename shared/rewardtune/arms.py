"""Arms of one pipeline run: several algorithms trained side by side on the same config, prompts and seeds.

The DAG's `algorithms` parameter fans training out over these names (`dsl.ParallelFor`); `arm_overrides`
gives an arm its own `section.key=value` settings (a calibrated learning rate, CDPO's constraints). The plan
is validated before anything trains, so a typo fails in seconds, not after the first arm's GPU hours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml

from rewardtune.checkpoint import write_text_atomic
from rewardtune.config import AlgorithmConfig
from rewardtune.errors import ConfigError

ALGORITHMS: tuple[str, ...] = get_args(AlgorithmConfig.model_fields["name"].annotation)
RUN, EVAL = "run", "eval"
ARM_PLACEHOLDER = "{algorithm}"  # in push_to_hub: replaced by each arm's algorithm
RUN_FILES = ("config.yaml", "metrics.jsonl")  # what the report reads from a training run


def arm_overrides(algorithm: str, per_arm: dict[str, list[str]] | None = None) -> list[str]:
    """The `--set` overrides that make the shared config one arm: its algorithm, then the arm's own settings.

    Constraints are CDPO's alone (the config refuses them elsewhere), so a non-CDPO arm drops the shared
    config's; a CDPO arm keeps them unless its own overrides replace them.
    """
    sets = [f"algorithm.name={algorithm}"]
    if algorithm != "cdpo":
        sets.append("algorithm.constraints=[]")
    return sets + list((per_arm or {}).get(algorithm, []))


def arm_repo_id(push_to_hub: str, algorithm: str) -> str:
    """The hub repo an arm's export pushes to: `push_to_hub` with {algorithm} replaced (empty: no push)."""
    return push_to_hub.replace(ARM_PLACEHOLDER, algorithm)


def arm_run_id(run_id: str, algorithm: str) -> str:
    """One run directory (and TrainJob name) per arm, stable across retries of the same run; empty stays empty."""
    return f"{run_id}-{algorithm}" if run_id else ""


def plan_arms(config: str, algorithm: str = "", algorithms: list[str] | None = None,
              per_arm: dict[str, list[str]] | None = None, overrides: list[str] | None = None,
              push_to_hub: str = "") -> list[str]:
    """The arms to train, each checked by resolving its whole config; raises ConfigError naming the field.

    No `algorithms`: one arm, `algorithm` or else the config's own (the single-algorithm DAG of before). Every
    arm exports its own model, so several arms may only push to the hub under per-arm names (`{algorithm}`).
    """
    from rewardtune.rewards import critic_image_tower
    from rewardtune.stages import resolve_config

    algorithms = list(algorithms or [])
    per_arm = dict(per_arm or {})
    if algorithms and algorithm:
        raise ConfigError(f"give either algorithm ('{algorithm}') or algorithms ({algorithms}), not both")
    for name in algorithms:
        if not isinstance(name, str) or name not in ALGORITHMS:
            raise ConfigError(f"algorithms: unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError(f"algorithms: {algorithms} names an algorithm twice; give each once (arms share a run id)")
    if algorithm and algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    arms = algorithms or [algorithm or resolve_config(config, overrides).algorithm.name]
    unused = sorted(set(per_arm) - set(arms))
    if unused:
        raise ConfigError(f"arm_overrides: {unused} is not among the arms {arms}; remove it or add it to algorithms")
    for name, sets in per_arm.items():
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ConfigError(f"arm_overrides.{name}: give a list of 'section.key=value' strings, got {sets!r}")
    if len(arms) > 1 and push_to_hub and ARM_PLACEHOLDER not in push_to_hub:
        raise ConfigError(f"push_to_hub: {len(arms)} arms would all push to '{push_to_hub}'; put {ARM_PLACEHOLDER} "
                          f"in the repo id (e.g. '{push_to_hub}-{ARM_PLACEHOLDER}') so each arm gets its own")
    for name in arms:
        try:
            cfg = resolve_config(config, [*(overrides or []), *arm_overrides(name, per_arm)])
            if cfg.algorithm.uses_critic:  # the trainer's own check, before the DAG starts rather than after
                critic_image_tower(cfg)
        except ConfigError as err:
            raise ConfigError(f"arm {name}: {err}") from None
    return arms


def pack_arm(run_dir: str | Path, eval_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One arm as one small artifact for the report: the run's config and metrics (no weights) and its merged
    per-checkpoint evaluations. One artifact per arm keeps each run paired with its own evaluations whatever
    order the fan-in lists them in."""
    from rewardtune.stages import merge_evaluations

    out = Path(out_dir)
    (out / RUN).mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (Path(run_dir) / name).is_file():
            write_text_atomic(out / RUN / name, (Path(run_dir) / name).read_text())
    merge_evaluations(list(eval_dirs), out / EVAL)
    return out


def arm_algorithm(arm_dir: str | Path) -> str:
    """The algorithm an arm trained with, from its run's config."""
    config = Path(arm_dir) / RUN / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{arm_dir} is not an arm (no {RUN}/config.yaml); build it with pack_arm")
    return (yaml.safe_load(config.read_text()) or {}).get("algorithm", {}).get("name", "?")


def arms_report(arm_dirs: list[str | Path], out_html: str | Path, out_md: str | Path) -> dict[str, Any]:
    """The report over every arm (plots overlaid, one table row per arm), in the order of `ALGORITHMS`."""
    from rewardtune.report import build_report
    from rewardtune.stages import run_label

    order = {name: i for i, name in enumerate(ALGORITHMS)}
    dirs = sorted((Path(d) for d in arm_dirs), key=lambda d: order.get(arm_algorithm(d), len(order)))
    if not dirs:
        raise ConfigError("report: no arm was trained; give at least one algorithm")
    return build_report([d / RUN for d in dirs], [d / EVAL for d in dirs], Path(out_html), Path(out_md),
                        labels=[run_label(d / RUN) for d in dirs])


def evaluation_config(config: str, run_dir: str | Path):
    """The shared config with the arm's own `algorithm` section (from the run's config.yaml), so a CDPO arm's
    constraint rewards are scored in the constraint role rather than as unseen; other sections stay shared."""
    from rewardtune.config import parse_config
    from rewardtune.stages import resolve_config

    base = resolve_config(config)
    trained = Path(run_dir) / "config.yaml"
    section = (yaml.safe_load(trained.read_text()) or {}).get("algorithm") if trained.is_file() else None
    if section is None:
        return base
    return parse_config({**base.model_dump(mode="json"), "algorithm": section})
