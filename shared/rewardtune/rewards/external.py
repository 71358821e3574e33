"""`reward: {name: python, options: {callable: "pkg.module:function"}}`: a reward from the user's own code.

The callable is `score(images [B,3,H,W] float in [0,1] on the training device, prompts: list[str]) -> scores`
with scores a tensor on the images' device, a numpy array or a list: B finite numbers. It may be a plain
function, an `async def` (awaited on a private event loop), or a class (instantiated once with no arguments,
so it can load its model in `__init__`). Options: `callable` (required), `path` (a directory put first on
sys.path, for code that is not installed), `batch_size` (call it on chunks of at most this many images).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rewardtune.errors import RewardError
from rewardtune.rewards import check_scores, register


def import_callable(target: str, path: str | None = None) -> Callable[..., Any]:
    """'pkg.module:attr.sub' -> the object; every failure is one line naming the target and the fix."""
    module_name, sep, attr = str(target).partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.options.callable = {target!r}: write it as 'package.module:function'")
    if path:
        directory = str(Path(path).resolve())
        if not Path(directory).is_dir():
            raise RewardError(f"reward.options.path = {path!r} is not a directory")
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - user code may raise anything on import
        first = (str(err).strip().splitlines() or [""])[0]
        raise RewardError(f"reward.options.callable = {target!r}: cannot import {module_name!r} "
                          f"({type(err).__name__}: {first[:160]}); install it or set reward.options.path") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward.options.callable = {target!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:  # noqa: BLE001
            raise RewardError(f"reward.options.callable = {target!r}: {attr}() failed: {type(err).__name__}: "
                              f"{str(err)[:160]}") from None
    if not callable(obj):
        raise RewardError(f"reward.options.callable = {target!r} is a {type(obj).__name__}, not callable")
    return obj


class PythonReward:
    """Calls the user's scorer (in chunks of `batch_size`) and checks every output before training sees it."""

    def __init__(self, fn: Callable[..., Any], target: str, batch_size: int | None) -> None:
        self.fn, self.target, self.batch_size = fn, target, batch_size
        self.name = f"python:{target}"
        call = getattr(fn, "__call__", None)  # noqa: B004 - a class instance's async __call__ counts too
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _call(self, images: torch.Tensor, prompts: list[str]) -> Any:
        try:
            out = self.fn(images, prompts)
            if self.is_async or inspect.isawaitable(out):
                self._loop = self._loop or asyncio.new_event_loop()  # one loop per reward: it may hold a client
                out = self._loop.run_until_complete(out)
        except RewardError:
            raise
        except Exception as err:  # noqa: BLE001 - user code: one line, the training step is refused
            raise RewardError(f"reward '{self.name}' raised {type(err).__name__}: {str(err)[:200]}") from None
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        step = self.batch_size or len(prompts) or 1
        chunks = []
        for start in range(0, len(prompts), step):
            part = images[start:start + step]
            chunks.append(check_scores(self.name, self._call(part, prompts[start:start + step]), part,
                                       prompts[start:start + step]))
        return torch.cat(chunks) if chunks else torch.zeros(0, device=images.device)


@register("python", options=("callable", "path", "batch_size"))
def _build(spec, device: torch.device) -> PythonReward:
    options = spec.options
    if "callable" not in options:
        raise RewardError("reward 'python' needs options.callable: 'package.module:function'")
    batch = options.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise RewardError(f"reward.options.batch_size = {batch!r}: must be a positive integer")
    target = str(options["callable"])
    return PythonReward(import_callable(target, options.get("path")), target, batch)
