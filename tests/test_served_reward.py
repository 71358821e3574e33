"""A reward served in the Open Inference Protocol (KServe v2 REST) by a real HTTP server on loopback, started by
the test: correct scores in both image encodings, retries on injected faults, one-line failure, a tiny run."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from rewardtune.config import RewardSpec, parse_config
from rewardtune.errors import RewardError
from rewardtune.rewards import build_reward
from rewardtune.rewards.served import build_request, decode_png_b64, infer_url, parse_scores
from tests.conftest import REPO, tiny_config_dict

MODEL = "brightness"


class RewardServer:
    """A v2 inference server for one model (mean brightness); `faults` is a queue of what to do to the next calls."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.delay_s = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                self._send(200 if self.path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready") else 404, b"{}")

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fault = server.faults.pop(0) if server.faults else None
                if self.path != f"/v2/models/{MODEL}/infer":
                    return self._send(404, json.dumps({"error": f"model not found: {self.path}"}).encode())
                request = json.loads(body)
                server.requests.append(request)
                if fault == "500":
                    return self._send(500, b'{"error": "CUDA out of memory"}')
                if fault == "400":
                    return self._send(400, b'{"error": "bad input"}')
                if fault == "slow":
                    time.sleep(1.0)
                if fault == "garbage":
                    return self._send(200, b"<html>proxy error</html>")
                time.sleep(server.delay_s)
                images = next(i for i in request["inputs"] if i["name"] == "images")
                if images["datatype"] == "BYTES":
                    x = decode_png_b64(images["data"])
                else:
                    x = torch.tensor(images["data"]).view(images["shape"])
                scores = x.mean(dim=(1, 2, 3)).tolist()
                if fault == "short":
                    scores = scores[:-1]
                if fault == "nan":
                    scores[0] = "NaN"
                out = {"model_name": MODEL, "id": request["id"],
                       "outputs": [{"name": "scores", "datatype": "FP32", "shape": [len(scores)], "data": scores}]}
                self._send(200, json.dumps(out).encode())

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v2/models/{MODEL}/infer"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = RewardServer()
    yield s
    s.close()


def _reward(url: str, **options):
    return build_reward(RewardSpec(name="http", options={"url": url, "backoff_s": 0.01, **options}), "cpu")


def _images(n=3, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_request_and_response_follow_the_v2_protocol():
    body = build_request(_images(2, 4), ["a", "b"], "tensor")
    images, prompts = body["inputs"]
    assert (images["name"], images["datatype"], images["shape"], len(images["data"])) == ("images", "FP32", [2, 3, 4, 4], 96)
    assert prompts == {"name": "prompts", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
    png = build_request(_images(2, 4), ["a", "b"], "png")["inputs"][0]
    assert png["datatype"] == "BYTES" and png["parameters"] == {"content_type": "base64"}
    decoded = decode_png_b64(png["data"])
    assert torch.allclose(decoded, (_images(2, 4) * 255).round() / 255, atol=1e-6)  # 8-bit PNG, lossless otherwise
    assert parse_scores(b'{"outputs": [{"name": "scores", "data": [1, 2.5]}]}', 2) == [1.0, 2.5]
    assert infer_url("http://h:8080", "aesthetic") == "http://h:8080/v2/models/aesthetic/infer"
    assert infer_url("https://h/v2/models/m/versions/2/infer", None) == "https://h/v2/models/m/versions/2/infer"


@pytest.mark.parametrize("image_format", ["png", "tensor"])
def test_scores_come_back_in_order_and_in_batches(server, image_format):
    images = _images(5)
    reward = _reward(server.url, image_format=image_format, batch_size=2)
    scores = reward(images, list("abcde"))
    expected = images.mean(dim=(1, 2, 3)) if image_format == "tensor" else ((images * 255).round() / 255).mean(dim=(1, 2, 3))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert [len(r["inputs"][1]["data"]) for r in server.requests] == [2, 2, 1]
    assert server.requests[0]["inputs"][1]["data"] == ["a", "b"]


@pytest.mark.parametrize("fault", ["500", "slow", "garbage", "short", "nan"])
def test_transient_faults_are_retried(server, fault):
    server.faults = [fault, fault]
    reward = _reward(server.url, timeout_s=0.5, max_retries=2, image_format="tensor")
    images = _images(3)
    torch.testing.assert_close(reward(images, ["a", "b", "c"]), images.mean(dim=(1, 2, 3)))
    assert reward.requests == 3  # two faults, then the answer


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("500", 'HTTP 500 Internal Server Error: {"error": "CUDA out of memory"}'),
        ("slow", "no response within timeout_s=0.3"),
        ("garbage", "response is not JSON"),
        ("short", "response has 2 scores for 3 images"),
        ("nan", "response holds non-finite scores"),
    ],
)
def test_persistent_faults_fail_with_one_line_naming_url_and_cause(server, fault, cause):
    server.faults = [fault] * 3
    reward = _reward(server.url, timeout_s=0.3, max_retries=2)
    with pytest.raises(RewardError) as err:
        reward(_images(3), ["a", "b", "c"])
    message = str(err.value)
    assert message.startswith(f"reward server {server.url} failed after 3 attempt(s): {cause}") and "\n" not in message
    assert reward.requests == 3


def test_client_errors_and_unreachable_servers_are_one_line(server):
    server.faults = ["400"]
    with pytest.raises(RewardError, match=r"refused the request: HTTP 400 Bad Request: \{\"error\": \"bad input\"\}"):
        _reward(server.url, max_retries=3)(_images(2), ["a", "b"])
    assert len(server.requests) == 1  # a 4xx is not retried
    wrong = server.url.replace(MODEL, "nope")
    with pytest.raises(RewardError, match="refused the request: HTTP 404"):
        _reward(wrong)(_images(2), ["a", "b"])
    closed = RewardServer()
    url = closed.url
    closed.close()
    with pytest.raises(RewardError, match=f"reward server {url} failed after 2 attempt\\(s\\): cannot connect"):
        _reward(url, max_retries=1)(_images(2), ["a", "b"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://x"}, "give http(s)://host[:port]/v2/models/<model>/infer"),
        ({"url": "http://h:1"}, "is not a v2 infer endpoint"),
        ({"url": "http://h:1", "model": "m", "timeout_s": 0}, "reward.options.timeout_s = 0: must be a number >= 0.001"),
        ({"url": "http://h:1", "model": "m", "max_retries": 1.5}, "max_retries = 1.5: must be an integer >= 0"),
        ({"url": "http://h:1", "model": "m", "image_format": "jpeg"}, "image_format = 'jpeg': allowed: png, tensor"),
        ({"url": "http://h:1", "model": "m", "token_env": "RT_NO_SUCH_TOKEN"}, "that environment variable is unset"),
        ({}, "needs options.url"),
    ],
)
def test_bad_http_options_are_one_line(options, message):
    with pytest.raises(RewardError) as err:
        build_reward(RewardSpec(name="http", options=options), "cpu")
    assert message in str(err.value)


def test_a_served_reward_trains_a_tiny_run_and_a_dead_server_stops_it(server, tiny_model_dir, tmp_path):
    from rewardtune.trainer import Trainer

    reward = {"name": "http", "options": {"url": server.url, "timeout_s": 10, "batch_size": 2}}
    cfg = parse_config(tiny_config_dict(tiny_model_dir, reward=reward, training={"epochs": 2, "gradient_accumulation_steps": 1},
                                        sampling={"batches_per_epoch": 1}, checkpointing={"every_epochs": 1}))
    Trainer(cfg, tmp_path / "run").run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(0 <= r["reward_mean"] <= 1 for r in records)
    assert len(server.requests) == 2 * cfg.sampling.batch_size // 2  # epochs x (batch / 2 per request)

    server.faults = ["500"] * 100
    failing = cfg.model_copy(update={"reward": RewardSpec(name="http", options={**reward["options"], "max_retries": 1,
                                                                                 "backoff_s": 0.01})})
    with pytest.raises(RewardError, match="failed after 2 attempt"):
        Trainer(failing, tmp_path / "dead").run()
    metrics = tmp_path / "dead" / "metrics.jsonl"
    assert not (tmp_path / "dead" / "checkpoints").exists() and (not metrics.exists() or not metrics.read_text())


def test_the_kserve_example_is_a_v1beta1_inference_service():
    docs = list(yaml.safe_load_all((REPO / "manifests" / "examples" / "kserve-reward.yaml").read_text()))
    [isvc] = [d for d in docs if d and d["kind"] == "InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["metadata"]["name"]
    predictor = isvc["spec"]["predictor"]
    container = predictor["model"] if "model" in predictor else predictor["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    if "model" in predictor:
        assert predictor["model"]["modelFormat"]["name"] and predictor["model"]["protocolVersion"] == "v2"
    assert container["readinessProbe"]["httpGet"]["path"].startswith("/v2/models/")
    cfg = parse_config(yaml.safe_load((REPO / "manifests" / "examples" / "reward-http.yaml").read_text()))
    url = cfg.reward.options["url"]
    namespace = isvc["metadata"]["namespace"]
    assert url.startswith(f"http://{isvc['metadata']['name']}-predictor.{namespace}.svc") and url.endswith("/infer")
    assert build_reward(cfg.reward).url == url  # the example config builds the client it documents
