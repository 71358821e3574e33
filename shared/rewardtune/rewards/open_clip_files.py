"""Open_clip models stored as HPS-style checkpoints: the one loader that the HPSv2 reward and the critic's
image tower (rewards/towers.py) share, so neither imports the other.

A directory holds a `{"state_dict": ...}` (or bare) weights-only torch file; its architecture is the
caller's `options.arch` (default ViT-H-14) or `open_clip_model.json` beside it (`{"arch": name,
"model_cfg": {...}}`, how tiny stand-ins describe themselves).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from rewardtune.errors import RewardError
from rewardtune.safe_paths import check_relative_name, contained

OPEN_CLIP_CONFIG = "open_clip_model.json"  # {"arch": name, "model_cfg": {...}} for non-builtin open_clip configs
VERSIONS = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_CHECKPOINT = VERSIONS["2.1"]


def chosen_checkpoint(options: dict[str, Any]) -> str | None:
    """The checkpoint file `options` ask for (`checkpoint`, else `version`), None when they name none."""
    if options.get("checkpoint"):
        return str(options["checkpoint"])
    if "version" not in options:
        return None
    version = str(options["version"])
    if version not in VERSIONS:
        raise ValueError(f"hpsv2 options.version: unknown HPS version {version!r}; use one of {', '.join(VERSIONS)}")
    return VERSIONS[version]


def _register_arch(directory: Path, options: dict[str, Any]) -> str:
    import open_clip

    path = directory / OPEN_CLIP_CONFIG
    if not path.is_file():
        return str(options.get("arch", "ViT-H-14"))
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str) or not isinstance(spec.get("model_cfg"), dict):
        raise RewardError(f"{path} needs an 'arch' name and a 'model_cfg' mapping")
    arch = check_relative_name(spec["arch"], str(path))  # a file name below: never '../x' or '/abs'
    if "/" in arch:
        raise RewardError(f"{path}: arch {arch!r} must be a plain name, not a path")
    with tempfile.TemporaryDirectory() as tmp:  # open_clip registers configs from <name>.json files
        cfg_file = Path(tmp) / f"{arch}.json"
        cfg_file.write_text(json.dumps(spec["model_cfg"]))
        open_clip.add_model_config(cfg_file)
    return str(spec["arch"])


def find_checkpoint(directory: Path, options: dict[str, Any]) -> Path:
    """The file `options` choose (never another one, never outside `directory`), else v2.1, else the directory's
    only kind of *.pt."""
    name = chosen_checkpoint(options)
    candidates = [contained(directory, name, "reward option checkpoint")] if name else [directory / DEFAULT_CHECKPOINT, *sorted(directory.glob("*.pt"))]
    for path in candidates:
        if path.is_file():
            return path
    raise RewardError(f"no HPS checkpoint ({name or DEFAULT_CHECKPOINT} or *.pt) in {directory}")


def load_hps_state(path: Path) -> dict[str, torch.Tensor]:
    """Accept `{"state_dict": ...}` (the released layout) or a bare state dict; strip DDP's 'module.'."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardError(f"cannot read HPS checkpoint {path} as a weights-only torch file: {str(err).splitlines()[0]}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise RewardError(f"HPS checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' before we load the checkpoint ourselves: misleading in logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_open_clip(arch: str):
    import open_clip

    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=None, device="cpu")
    finally:
        root.removeFilter(quiet)


def load_open_clip(directory: Path, options: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): `open_clip.create_model(arch)` with the checkpoint loaded strictly."""
    import open_clip

    arch = _register_arch(directory, options)
    model = create_open_clip(arch)
    model.load_state_dict(load_hps_state(find_checkpoint(directory, options)), strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(arch)
