"""pipelines/schedule.py against a fake KFP API server on 127.0.0.1: real kfp.Client, real HTTP."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import REPO

pytest.importorskip("kfp")
SCRIPT = REPO / "pipelines" / "schedule.py"
sys.path.insert(0, str(REPO))
from pipelines import schedule  # noqa: E402


class _FakeKFP(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API, with state, for check -> upload -> version -> experiment -> run."""

    calls: list = []
    healthz: dict = {}
    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _named(self, kind: str, query: dict) -> list:
        """Items of `kind` whose display_name equals the filter's value (the only filter the client sends)."""
        items = self.state[kind]
        if "filter" in query:
            wanted = json.loads(query["filter"][0])["predicates"][0]["stringValue"]
            items = [i for i in items if i["display_name"] == wanted]
        return items

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.calls.append(("GET", url.path, query, None))
        if url.path == "/apis/v2beta1/healthz":
            return self._reply(self.healthz)
        if url.path == "/apis/v2beta1/pipelines":
            return self._reply({"pipelines": self._named("pipelines", query)})
        if url.path.startswith("/apis/v2beta1/pipelines/") and url.path.endswith("/versions"):
            return self._reply({"pipeline_versions": self._named("versions", query)})
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": self._named("experiments", query)})
        if url.path == "/apis/v2beta1/recurringruns":
            return self._reply({"recurringRuns": self._named("recurring_runs", query)})
        self.send_error(404)

    def do_POST(self):
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        query = parse_qs(url.query)
        self.calls.append(("POST", url.path, query, body))
        n = len(self.calls)
        if url.path == "/apis/v2beta1/pipelines/upload":
            item = {"pipeline_id": "pipe-1", "display_name": query["name"][0]}
            self.state["pipelines"].append(item)
            return self._reply(item)
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            item = {"pipeline_id": "pipe-1", "pipeline_version_id": f"ver-{n}", "display_name": query["name"][0]}
            self.state["versions"].append(item)
            return self._reply(item)
        if url.path == "/apis/v2beta1/experiments":
            item = {"experiment_id": "exp-1", **json.loads(body)}
            self.state["experiments"].append(item)
            return self._reply(item)
        if url.path == "/apis/v2beta1/recurringruns":
            item = {"recurring_run_id": f"rr-{n}", **json.loads(body)}
            self.state["recurring_runs"].append(item)
            return self._reply(item)
        self.send_error(404)


@pytest.fixture
def fake_kfp():
    _FakeKFP.calls = []
    _FakeKFP.healthz = {"multi_user": False, "tag_name": "2.17.0", "commit_sha": "abc"}
    _FakeKFP.state = {"pipelines": [], "versions": [], "experiments": [], "recurring_runs": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKFP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKFP.calls
    server.shutdown()
    server.server_close()


def _schedule(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_creates_recurring_run_with_one_at_a_time_and_no_catchup(fake_kfp):
    host, calls = fake_kfp
    proc = _schedule("--host", host, "--cron", "0 0 3 * * *", "--param", "config=s3://b/c.yaml",
                     "--param", "gpus_per_node=8")
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)
    assert ids["created"] is True and (ids["pipeline_id"], ids["experiment_id"]) == ("pipe-1", "exp-1")
    posts = [c for c in calls if c[0] == "POST"]
    assert [c[1] for c in posts] == ["/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version",
                                     "/apis/v2beta1/experiments", "/apis/v2beta1/recurringruns"]
    assert b"rewardtune-alignment" in posts[0][3]  # the compiled package travels in the multipart body
    run = json.loads(posts[-1][3])
    assert run["max_concurrency"] == "1" or run["max_concurrency"] == 1
    assert run["no_catchup"] is True and run["mode"] == "ENABLE"
    assert run["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": ids["version_id"]}
    assert run["runtime_config"]["parameters"] == {"config": "s3://b/c.yaml", "gpus_per_node": 8}
    assert calls[0][1] == "/apis/v2beta1/healthz"  # the server is checked before anything is uploaded
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


def test_rerun_with_the_same_tag_creates_no_second_recurring_run(fake_kfp):
    host, calls = fake_kfp
    args = ("--host", host, "--cron", "0 0 3 * * *", "--param", "config=c.yaml")
    first, second = _schedule(*args), _schedule(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["created"] is True and b["created"] is False
    assert a["recurring_run_id"] == b["recurring_run_id"] and a["version_id"] == b["version_id"]
    posts = [c[1] for c in calls if c[0] == "POST"]
    assert posts.count("/apis/v2beta1/recurringruns") == 1 and posts.count("/apis/v2beta1/pipelines/upload_version") == 1
    # another images tag (another version) under the same job name: refused, not doubled
    other = _schedule(*args, "--version", "rewardtune-alignment-9.9.9")
    assert other.returncode == 2 and "already exists for another pipeline version" in other.stderr
    assert [c[1] for c in calls if c[0] == "POST"].count("/apis/v2beta1/recurringruns") == 1


def test_old_backend_is_refused_in_one_line(fake_kfp):
    host, calls = fake_kfp
    _FakeKFP.healthz["tag_name"] = "2.15.1"
    proc = _schedule("--host", host, "--cron", "0 0 3 * * *", "--param", "config=c.yaml")
    assert proc.returncode == 2 and "older than 2.16.0" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not [c for c in calls if c[0] == "POST"]  # nothing uploaded


def test_multi_user_server_needs_a_namespace_and_uses_it(fake_kfp, tmp_path):
    host, calls = fake_kfp
    _FakeKFP.healthz["multi_user"] = True
    env = {**os.environ, "HOME": str(tmp_path)}  # no kfp context file with a default namespace
    proc = _schedule("--host", host, "--cron", "0 0 3 * * *", "--param", "config=c.yaml", env=env)
    assert proc.returncode == 2 and "pass --namespace" in proc.stderr
    proc = _schedule("--host", host, "--namespace", "rewardtune", "--cron", "0 0 3 * * *", "--param", "config=c.yaml",
                     env=env)
    assert proc.returncode == 0, proc.stderr
    experiment = next(json.loads(c[3]) for c in calls if c[0] == "POST" and c[1] == "/apis/v2beta1/experiments")
    assert experiment["namespace"] == "rewardtune"


@pytest.mark.parametrize("param,fragment", [
    ("gpus_per_node=abc", "must be an integer"), ("gpus_per_node=0", "must be >= 1"), ("num_nodes=2.5", "integer"),
    ("gpu_node_selector=abc", "must be a mapping"), ("trainer_image=0.1.0", "whole image reference"),
    ("epochs=true", "integer"), ("algorithms=ddpo", "must be a list"), ("algorithms=[ddpo, ppo]", r"unknown \['ppo'\]"),
    ("arm_overrides=[1]", "must be a mapping"),
])
def test_param_types_are_checked_against_the_pipeline(param, fragment):
    with pytest.raises(schedule.ScheduleError, match=fragment):
        schedule.parse_params(["config=c.yaml", param])


def test_typed_params_pass_through():
    params = schedule.parse_params(["config=c.yaml", "num_nodes=4", "algorithm=tdpo_r",
                                    'gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-A100"}'])
    assert params == {"config": "c.yaml", "num_nodes": 4, "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100"},
                      "algorithm": "tdpo_r"}
    arms = schedule.parse_params(["config=c.yaml", "algorithms=[ddpo, tdpo_r]",
                                  'arm_overrides={tdpo_r: ["training.learning_rate=3e-3"]}'])
    assert arms["algorithms"] == ["ddpo", "tdpo_r"] and arms["arm_overrides"] == {"tdpo_r": ["training.learning_rate=3e-3"]}


@pytest.mark.parametrize("cron", ["0 0 99 * * *", "0 60 3 * * *", "61 0 3 * * *", "0 0 3 * 13 *", "0 0 3 * * 9"])
def test_out_of_range_cron_fields_are_refused(cron):
    with pytest.raises(schedule.ScheduleError, match="out of range"):
        schedule.validate_cron(cron)


def test_valid_cron_forms_pass():
    for cron in ["0 0 3 * * *", "0 30 2 * * 1-5", "*/30 * * * * *", "0 0 0 1 1 *"]:
        assert schedule.validate_cron(cron) == cron


def test_backend_versions():
    assert schedule.parse_version("v2.17.0-rc.1") == (2, 17, 0) and schedule.parse_version("2.16") == (2, 16, 0)
    assert schedule.parse_version("unknown") is None
    with pytest.raises(schedule.ScheduleError, match="'unknown', not a release"):
        schedule.check_backend({"tag_name": "unknown"}, None)
    with pytest.raises(schedule.ScheduleError, match="multi-user: pass --namespace"):
        schedule.check_backend({"tag_name": "2.17.0", "multi_user": True}, None)
    schedule.check_backend({"tag_name": "2.16.0"}, None)
    schedule.check_backend({"tag_name": "unknown", "multi_user": True}, "ns", skip_version_check=True)
