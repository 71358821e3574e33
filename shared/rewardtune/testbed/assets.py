"""Where the testbed's committed weights live, and the `testbed` model source that names them.

Rebuild both with `rewardtune testbed pretrain --out shared/rewardtune/data/testbed --force`.
"""

from __future__ import annotations

from pathlib import Path

from rewardtune.errors import RewardtuneError

SOURCE_NAME = "testbed"  # model.source: testbed  ->  the committed base model
ASSETS = Path(__file__).resolve().parent.parent / "data" / "testbed"


def model_dir(root: Path = ASSETS) -> Path:
    return root / "model"


def proxy_dir(root: Path = ASSETS) -> Path:
    return root / "proxy"


def resolve_model_source(source: str) -> str:
    """`testbed` -> the committed pipeline directory (absolute); any other source unchanged."""
    if source != SOURCE_NAME:
        return source
    path = model_dir()
    if not (path / "model_index.json").is_file():
        raise RewardtuneError(f"the testbed model is missing at {path}; rebuild it with "
                              "`rewardtune testbed pretrain --out shared/rewardtune/data/testbed --force`")
    return str(path)
