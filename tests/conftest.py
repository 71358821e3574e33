"""Shared fixtures: tiny offline models built once per session, and config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-shaped pipeline directory, built offline by the same code as `rewardtune init-tiny`."""
    from rewardtune.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny-sd")


def merge_sections(data: dict, sections: dict) -> dict:
    """`sections` merged into the config dict `data` one level deep (a mapping updates its section, anything
    else replaces it); returns `data`."""
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = dict(value) if isinstance(value, dict) else value
    return data


def tiny_config_dict(model_dir: Path, **sections) -> dict:
    """configs/tiny.yaml pointed at `model_dir`, with sections merged in (one level deep)."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["model"]["source"] = str(model_dir)
    data.setdefault("logging", {})["progress_bars"] = False
    return merge_sections(data, sections)


def one_epoch_lora_dict(model_dir: Path, keep_last: int = 1, **sections) -> dict:
    """The smallest real training run: 1 epoch of LoRA DDPO on the tiny model, 2 steps, 2 images; `sections`
    are merged over it one level deep (the corpus the bad-input, reliability and fuzz tests damage)."""
    base: dict = {
        "model": {"finetune": "lora"},
        "sampling": {"num_steps": 2, "batch_size": 2, "batches_per_epoch": 1},
        "training": {"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
        "checkpointing": {"every_epochs": 1, "keep_last": keep_last},
    }
    return tiny_config_dict(model_dir, **merge_sections(base, sections))


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{reward name: source dir} of tiny reward models, built by the same code as `init-tiny --rewards-out`."""
    from rewardtune.rewards.tiny import init_tiny_rewards

    return init_tiny_rewards(tmp_path_factory.mktemp("rewards"))
