"""`reward: {name: http, options: {url, ...}}`: a reward model served elsewhere, spoken to in the Open
Inference Protocol (KServe v2 REST), so it can run on KServe, Triton, MLServer or any v2 server on other GPUs.

Request, `POST <url>` where url is `http(s)://host[:port]/v2/models/<model>/infer` (or a base URL plus
`options.model`), JSON body:

    {"id": "<uuid>",
     "inputs": [{"name": "images", ...},                                 # see below
                {"name": "prompts", "datatype": "BYTES", "shape": [B], "data": ["a cat", ...]}],
     "outputs": [{"name": "scores"}]}

`images` is, with `image_format: png` (the default), `{"datatype": "BYTES", "shape": [B],
"parameters": {"content_type": "base64"}, "data": [<base64 of a PNG, 8-bit RGB>, ...]}`; with
`image_format: tensor`, `{"datatype": "FP32", "shape": [B, 3, H, W], "data": [<row-major floats in [0,1]>]}`.
The response must hold an output named `scores` (or a single output) of B finite numbers.

Timeouts, connection errors, 5xx, 429 and malformed responses are retried `max_retries` times with
exponential backoff (`backoff_s` * 2^attempt); then, like a 4xx at once, the reward fails with one line
naming the URL and the cause. There is no fallback score: the training step is refused, never continued.
A bearer token can come from the environment variable named by `token_env` (never from the config).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from rewardtune.errors import RewardError
from rewardtune.rewards import check_scores, register
from rewardtune.rewards.simple import to_uint8_hwc

log = logging.getLogger(__name__)
OPTIONS = ("url", "model", "timeout_s", "batch_size", "max_retries", "backoff_s", "image_format", "token_env")
INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer$")
IMAGE_FORMATS = ("png", "tensor")


class _Retryable(Exception):
    """A failure worth another try (timeout, refused connection, 5xx/429, malformed body)."""


def infer_url(url: str, model: str | None) -> str:
    """The v2 infer endpoint from `url` (already one, or a base URL + model name)."""
    if not re.match(r"^https?://[^/\s]+", url or ""):
        raise RewardError(f"reward.options.url = {url!r}: give http(s)://host[:port]/v2/models/<model>/infer")
    trimmed = url.rstrip("/")
    if INFER_PATH.search(trimmed):
        return trimmed
    if not model:
        raise RewardError(f"reward.options.url = {url!r} is not a v2 infer endpoint (.../v2/models/<model>/infer); "
                          "give the full endpoint or set reward.options.model")
    return f"{trimmed}/v2/models/{model}/infer"


def png_b64(images: torch.Tensor) -> list[str]:
    """[B,3,H,W] in [0,1] -> base64 strings of 8-bit RGB PNGs."""
    out = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def decode_png_b64(data: Sequence[str]) -> torch.Tensor:
    """The inverse of `png_b64` (for servers written in Python, and the tests): [B,3,H,W] float in [0,1]."""
    import numpy as np

    arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item))).convert("RGB")) for item in data]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def build_request(images: torch.Tensor, prompts: Sequence[str], image_format: str) -> dict[str, Any]:
    """The v2 inference request body for one batch (see the module docstring)."""
    batch = int(images.shape[0])
    if image_format == "png":
        image_input = {"name": "images", "datatype": "BYTES", "shape": [batch],
                       "parameters": {"content_type": "base64"}, "data": png_b64(images)}
    else:
        x = images.detach().float().clamp(0, 1).cpu()
        image_input = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}
    return {"id": str(uuid.uuid4()),
            "inputs": [image_input, {"name": "prompts", "datatype": "BYTES", "shape": [batch], "data": list(prompts)}],
            "outputs": [{"name": "scores"}]}


def parse_scores(body: bytes, batch: int) -> list[float]:
    """B finite floats from a v2 response; anything else raises `_Retryable` naming what was wrong."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Retryable(f"response is not JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise _Retryable("response has no 'outputs' list")
    named = [o for o in outputs if isinstance(o, dict) and o.get("name") == "scores"]
    output = named[0] if named else outputs[0] if len(outputs) == 1 else None
    if not isinstance(output, dict) or not isinstance(output.get("data"), list):
        raise _Retryable("response has no output 'scores' with a 'data' list")
    data = output["data"]
    if len(data) != batch:
        raise _Retryable(f"response has {len(data)} scores for {batch} images")
    try:
        values = [float(v) for v in data]
    except (TypeError, ValueError):
        raise _Retryable("response scores are not numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise _Retryable("response holds non-finite scores")
    return values


class ServedReward:
    """Scores batches on a v2 inference server; a batch either gets B finite scores or the call raises."""

    def __init__(self, url: str, timeout_s: float, batch_size: int | None, max_retries: int, backoff_s: float,
                 image_format: str, token: str | None) -> None:
        self.url, self.timeout_s, self.batch_size = url, timeout_s, batch_size
        self.max_retries, self.backoff_s, self.image_format, self.token = max_retries, backoff_s, image_format, token
        self.name = f"http:{url}"
        self.requests = 0  # sent, retries included (read by the tests and the overlap benchmark)

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - URL from config
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode("utf-8", "replace").strip()
            cause = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
            if err.code >= 500 or err.code == 429:
                raise _Retryable(cause) from None
            raise RewardError(f"reward server {self.url} refused the request: {cause}") from None
        except TimeoutError:
            raise _Retryable(f"no response within timeout_s={self.timeout_s:g}") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"no response within timeout_s={self.timeout_s:g}") from None
            raise _Retryable(f"cannot connect ({reason})") from None
        except (ConnectionError, OSError) as err:
            raise _Retryable(f"connection failed ({type(err).__name__}: {err})") from None

    def score_batch(self, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        body = json.dumps(build_request(images, prompts, self.image_format)).encode()
        cause = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.backoff_s * 2 ** (attempt - 1), 30.0)
                log.warning("reward server %s: %s; retry %d/%d in %.2g s", self.url, cause, attempt, self.max_retries, delay)
                time.sleep(delay)
            try:
                return parse_scores(self._post(body), len(prompts))
            except _Retryable as err:
                cause = str(err)
        raise RewardError(f"reward server {self.url} failed after {self.max_retries + 1} attempt(s): {cause}; "
                          "the step was refused (no score is made up)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        step = self.batch_size or len(prompts) or 1
        values: list[float] = []
        for start in range(0, len(prompts), step):
            values += self.score_batch(images[start:start + step], prompts[start:start + step])
        scores = torch.tensor(values, dtype=torch.float32, device=images.device)
        return check_scores(self.name, scores, images, prompts)


def _number(options: dict, key: str, default: float, low: float, integer: bool = False) -> Any:
    value = options.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if not ok or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise RewardError(f"reward.options.{key} = {value!r}: must be {kind} >= {low:g}")
    return int(value) if integer else float(value)


@register("http", options=OPTIONS)
def _build(spec, device: torch.device) -> ServedReward:
    options = spec.options
    if "url" not in options:
        raise RewardError("reward 'http' needs options.url: http(s)://host[:port]/v2/models/<model>/infer")
    image_format = options.get("image_format", "png")
    if image_format not in IMAGE_FORMATS:
        raise RewardError(f"reward.options.image_format = {image_format!r}: allowed: {', '.join(IMAGE_FORMATS)}")
    token = None
    if options.get("token_env"):
        token = os.environ.get(str(options["token_env"]))
        if not token:
            raise RewardError(f"reward.options.token_env = {options['token_env']!r}: that environment variable is unset")
    batch = options.get("batch_size")
    return ServedReward(
        infer_url(str(options["url"]), options.get("model")),
        timeout_s=_number(options, "timeout_s", 60.0, 0.001),
        batch_size=None if batch is None else _number(options, "batch_size", 1, 1, integer=True),
        max_retries=_number(options, "max_retries", 3, 0, integer=True),
        backoff_s=_number(options, "backoff_s", 1.0, 0.0),
        image_format=image_format,
        token=token,
    )
