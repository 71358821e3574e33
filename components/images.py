"""Image references for the components, read from images/images.yaml (the file images/build.py builds from).

The DAG takes whole references as parameters (`trainer_image`, `cpu_image`, defaulting to these): the KFP
driver replaces an image string containing a parameter placeholder by the parameter's value as a whole.
"""

from __future__ import annotations

from pathlib import Path

import yaml

_SPEC = yaml.safe_load((Path(__file__).resolve().parents[1] / "images" / "images.yaml").read_text())

REGISTRY: str = _SPEC["registry"]
DEFAULT_TAG: str = _SPEC["tag"]


def image_ref(key: str, tag: str = DEFAULT_TAG) -> str:
    """`registry/name:tag` for one image key of images.yaml (trainer, cpu)."""
    return f"{REGISTRY}/{_SPEC['images'][key]['name']}:{tag}"


TRAINER_IMAGE = image_ref("trainer")
CPU_IMAGE = image_ref("cpu")
