"""Prompt sources: built-in sets shipped with the package, or a user file (.txt, .jsonl, .csv).

Built-in sets mirror DDPO's prompt functions (Black et al., 2023) so paper runs are reproducible offline:
`simple_animals` (45 animals), `imagenet_animals` (ImageNet classes 0-397), `imagenet_dogs` (151-268) and
`imagenet_all`. Class names are the first name of each ImageNet-1k class.
"""

from __future__ import annotations

import csv
import io
import json
import random
from importlib import resources
from pathlib import Path

from rewardtune.errors import RewardtuneError

# name -> (data file, first line, end line): slices follow DDPO's `imagenet(low, high)`.
_BUILTIN_SLICES: dict[str, tuple[str, int, int | None]] = {
    "simple_animals": ("simple_animals.txt", 0, None),
    "imagenet_animals": ("imagenet_classes.txt", 0, 398),
    "imagenet_dogs": ("imagenet_classes.txt", 151, 269),
    "imagenet_all": ("imagenet_classes.txt", 0, 1000),
    "testbed": ("testbed_prompts.txt", 0, None),  # every prompt of the testbed world (rewardtune.testbed.world)
}
BUILTIN_SETS = {name: spec[0] for name, spec in _BUILTIN_SLICES.items()}
_FILE_SUFFIXES = (".txt", ".jsonl", ".csv")


def builtin_prompts(name: str) -> list[str]:
    if name not in _BUILTIN_SLICES:
        raise RewardtuneError(f"unknown built-in prompt set '{name}'; choose one of {', '.join(BUILTIN_SETS)}")
    filename, low, high = _BUILTIN_SLICES[name]
    lines = resources.files("rewardtune.data").joinpath(filename).read_text().splitlines()[low:high]
    return [line.strip() for line in lines if line.strip()]


def has_line_break(text: str) -> bool:
    """Whether `text` would split into several lines when written one prompt a line and read back.

    `str.splitlines` also splits on \\v, \\f, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, not only \\n and \\r.
    """
    return len(text.strip().splitlines()) > 1


def _refuse_line_breaks(prompt: str, where: str) -> None:
    """prepare-prompts writes one prompt a line: a prompt with a line break would come back as two prompts,
    and could land on both sides of the train/held-out split."""
    if has_line_break(prompt):
        raise RewardtuneError(f"{where}: the prompt {prompt[:60]!r} contains a line break; prompts must be one line "
                              "(replace the break with a space)")


class _Lax(ValueError):
    """What Python's json module accepts but JSON does not promise: a key given twice (the last silently wins),
    NaN/Infinity."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _Lax(f"the key {repeated[0]!r} appears twice")
    return dict(pairs)


def _no_constant(name: str) -> float:
    raise _Lax(f"{name} is not JSON")


def read_prompt_file(path: Path) -> list[str]:
    """Read prompts from .txt (one per line), .jsonl ({"prompt": ...} per line) or .csv (a 'prompt' column)."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise RewardtuneError(f"prompt file {path} looks binary (contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RewardtuneError(f"prompt file {path} is not UTF-8 ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.split("\n"), 1):  # JSON strings may hold a raw \u2028: not a record end
            if not line.strip():
                continue
            try:
                item = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
                value = item["prompt"]
            except _Lax as err:
                raise RewardtuneError(f"prompt file {path} line {number}: {err}; JSON Lines must be strict JSON "
                                      "(one value per key, no NaN/Infinity)") from None
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RewardtuneError(f'prompt file {path} line {number}: expected a JSON object with a "prompt" key') from None
            if not isinstance(value, str):
                raise RewardtuneError(f'prompt file {path} line {number}: "prompt" must be a string, got {type(value).__name__}')
            _refuse_line_breaks(value, f"prompt file {path} line {number}")
            prompts.append(value)
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline=""), strict=True))  # quoted line breaks kept whole
        except csv.Error as err:
            raise RewardtuneError(f"prompt file {path} is not valid CSV: {err}") from None
        if rows and "prompt" not in rows[0]:
            raise RewardtuneError(f"prompt file {path}: the CSV needs a 'prompt' column (found {sorted(k for k in rows[0] if k)})")
        prompts = [row["prompt"] or "" for row in rows]
        for number, prompt in enumerate(prompts, 2):
            _refuse_line_breaks(prompt, f"prompt file {path} row {number}")
    else:  # one prompt per "\n" line (CRLF too); str.splitlines would also split on \f, \x85, \u2028, ... silently
        prompts = [line.removesuffix("\r") for line in text.split("\n")]
        for number, prompt in enumerate(prompts, 1):
            _refuse_line_breaks(prompt, f"prompt file {path} line {number}")
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


def split_prompts(prompts: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded, disjoint train/held-out split of deduplicated prompts; both sides non-empty when fraction > 0.

    The held-out side is rounded to at least one prompt so evaluation always sees unseen prompts, and at
    most len-1 so training always has data. Each side keeps the source order (stable diffs between runs).
    """
    unique = list(dict.fromkeys(prompts))
    if not 0.0 <= heldout_fraction < 1.0:
        raise RewardtuneError(f"prompts.heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0.0:
        return unique, []
    if len(unique) < 2:
        raise RewardtuneError(
            f"need at least 2 distinct prompts to hold some out, got {len(unique)}; add prompts or set prompts.heldout_fraction=0"
        )
    n_heldout = min(max(1, round(len(unique) * heldout_fraction)), len(unique) - 1)
    chosen = set(random.Random(seed).sample(range(len(unique)), n_heldout))
    train = [p for i, p in enumerate(unique) if i not in chosen]
    heldout = [p for i, p in enumerate(unique) if i in chosen]
    return train, heldout


def check_token_lengths(prompts: list[str], tokenizer_dir: str) -> int:
    """Fail when a prompt would be truncated by the model's tokenizer; returns the longest length in tokens."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise RewardtuneError(f"could not load a CLIP tokenizer from {tokenizer_dir}: {str(err).splitlines()[0]}") from None
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]  # our message, not its warning
    too_long = [p for p, n in zip(prompts, lengths, strict=True) if n > limit]
    if too_long:
        raise RewardtuneError(
            f"{len(too_long)} prompt(s) exceed the tokenizer's {limit} tokens (first: {too_long[0][:60]!r}); "
            "shorten them, they would be silently truncated"
        )
    return max(lengths, default=0)
