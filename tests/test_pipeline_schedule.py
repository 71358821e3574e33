"""pipelines/schedule.py against a fake KFP API server on 127.0.0.1: real kfp.Client, real HTTP."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import REPO

pytest.importorskip("kfp")
SCRIPT = REPO / "pipelines" / "schedule.py"


class _FakeKFP(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for upload -> version -> experiment -> recurring run."""

    calls: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        self.calls.append(("GET", url.path, parse_qs(url.query), None))
        if url.path == "/apis/v2beta1/healthz":
            return self._reply({"multi_user": False})
        if url.path == "/apis/v2beta1/pipelines":
            return self._reply({"pipelines": [], "total_size": 0})
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        self.send_error(404)

    def do_POST(self):
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(("POST", url.path, parse_qs(url.query), body))
        if url.path == "/apis/v2beta1/pipelines/upload":
            return self._reply({"pipeline_id": "pipe-1", "display_name": parse_qs(url.query)["name"][0]})
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            return self._reply({"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"})
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", **json.loads(body)})
        if url.path == "/apis/v2beta1/recurringruns":
            return self._reply({"recurring_run_id": "rr-1", **json.loads(body)})
        self.send_error(404)


@pytest.fixture
def fake_kfp():
    _FakeKFP.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKFP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKFP.calls
    server.shutdown()
    server.server_close()


def _schedule(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_creates_recurring_run_with_one_at_a_time_and_no_catchup(fake_kfp):
    host, calls = fake_kfp
    proc = _schedule("--host", host, "--cron", "0 0 3 * * *", "--param", "config=s3://b/c.yaml", "--param", "gpu_count=8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pipeline_id": "pipe-1", "version_id": "ver-1", "experiment_id": "exp-1",
                                       "recurring_run_id": "rr-1"}
    posts = [c for c in calls if c[0] == "POST"]
    assert [c[1] for c in posts] == ["/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version",
                                     "/apis/v2beta1/experiments", "/apis/v2beta1/recurringruns"]
    assert b"rewardtune-alignment" in posts[0][3]  # the compiled package travels in the multipart body
    run = json.loads(posts[-1][3])
    assert run["max_concurrency"] == "1" or run["max_concurrency"] == 1
    assert run["no_catchup"] is True and run["mode"] == "ENABLE"
    assert run["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}
    assert run["runtime_config"]["parameters"] == {"config": "s3://b/c.yaml", "gpu_count": 8}
    assert run["experiment_id"] == "exp-1" and run["service_account"] == "rewardtune-pipeline"


def test_five_field_cron_is_rejected_with_the_fix(fake_kfp):
    host, calls = fake_kfp
    proc = _schedule("--host", host, "--cron", "0 3 * * *", "--param", "config=c.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "6 with seconds first" in proc.stderr and "'0 0 3 * * *'" in proc.stderr
    assert calls == []  # nothing was sent


def test_dry_run_prints_the_request_and_contacts_nothing():
    proc = _schedule("--host", "http://127.0.0.1:9", "--cron", "0 30 2 * * 1-5", "--param", "config=c.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)["recurring_run"]
    assert request["max_concurrency"] == 1 and request["no_catchup"] is True
    assert _schedule("--cron", "0 0 3 * * *", "--param", "confg=x", "--dry-run").returncode == 2
