"""Prompt sources: built-in sets shipped with the package, or a user file (.txt, .jsonl, .csv)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from rewardtune.errors import RewardtuneError

BUILTIN_SETS = {"simple_animals": "simple_animals.txt"}


def builtin_prompts(name: str) -> list[str]:
    text = resources.files("rewardtune.data").joinpath(BUILTIN_SETS[name]).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: Path) -> list[str]:
    """Read prompts from .txt (one per line), .jsonl ({"prompt": ...} per line) or .csv (a 'prompt' column)."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise RewardtuneError(f"prompt file {path} looks binary (contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RewardtuneError(f"prompt file {path} is not UTF-8 ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RewardtuneError(f'prompt file {path} line {number}: expected a JSON object with a "prompt" key') from None
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "prompt" not in rows[0]:
            raise RewardtuneError(f"prompt file {path}: the CSV needs a 'prompt' column (found {sorted(rows[0])})")
        prompts = [row["prompt"] for row in rows]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise RewardtuneError(f"prompt file {path} holds no prompts; put one prompt per line")
    return prompts


def load_prompts(source: str, template: str = "{}") -> list[str]:
    """Resolve a built-in set name or a file path to a deduplicated prompt list (order kept)."""
    if source in BUILTIN_SETS:
        prompts = builtin_prompts(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RewardtuneError(
                f"prompts.source '{source}' is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor an existing file"
            )
        prompts = read_prompt_file(path)
    return list(dict.fromkeys(template.format(p) for p in prompts))
