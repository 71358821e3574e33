"""Image references for the components, read from images/images.yaml (the file images/build.py builds from)."""

from __future__ import annotations

from pathlib import Path

import yaml

_SPEC = yaml.safe_load((Path(__file__).resolve().parents[1] / "images" / "images.yaml").read_text())

REGISTRY: str = _SPEC["registry"]
DEFAULT_TAG: str = _SPEC["tag"]


def image_repo(key: str) -> str:
    """`registry/name` without a tag, for tags chosen at run time (`set_container_image`)."""
    return f"{REGISTRY}/{_SPEC['images'][key]['name']}"


def image_ref(key: str, tag: str = DEFAULT_TAG) -> str:
    return f"{image_repo(key)}:{tag}"


TRAINER_IMAGE = image_ref("trainer")
CPU_IMAGE = image_ref("cpu")
