"""Multi-node training through Kubeflow Trainer v2.3: what the cluster would get, checked offline.

Every generated TrainJob and the shipped TrainingRuntime are validated against the vendored v2.3.0 CRDs'
openAPIV3Schema with unknown fields refused (additionalProperties: false injected wherever the schema lists
properties), the CEL name rules are applied directly, and the launcher runs against a fake CustomObjectsApi.
"""

import gzip
import logging
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from rewardtune.errors import RewardtuneError
from rewardtune.multinode import launch_for_pipeline, stage_run
from rewardtune.trainjob import (
    PET_ENV,
    TrainJobRequest,
    build_trainjob,
    ensure_trainjob,
    shutdown_timings,
    trainjob_name,
    wait_trainjob,
)
from tests.conftest import REPO, tiny_config_dict

CRDS = REPO / "tests" / "data" / "kubeflow-trainer-v2.3.0"
RUNTIME = REPO / "manifests" / "components" / "multinode" / "training-runtime.yaml"


def _crd(plural: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1.5 MB of YAML
    return yaml.load(gzip.decompress((CRDS / f"trainer.kubeflow.org_{plural}.yaml.gz").read_bytes()), Loader=loader)


def _closed(schema):
    """The schema with unknown fields refused: what the API server's pruning plus `kubectl --validate=strict` do."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def trainjob_crd():
    crd = _crd("trainjobs")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return crd, jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def _cel_name_rules(crd) -> tuple[re.Pattern, int]:
    """The CRD's two CEL rules on metadata.name, read from the CRD itself (not restated)."""
    rules = [r["rule"] for r in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]]
    pattern = next(re.search(r"matches\('(.+)'\)", r).group(1) for r in rules if "matches(" in r)
    size = next(int(re.search(r"<= (\d+)", r).group(1)) for r in rules if "size(" in r)
    return re.compile(pattern), size


def _request(**overrides) -> TrainJobRequest:
    base = dict(name=trainjob_name("3f6c1d2e-9a7b-4c1d-8e2f-0a1b2c3d4e5f"), namespace="rewardtune",
                image="ghcr.io/rewardtune/rewardtune-trainer:0.1.0", config_file="/mnt/checkpoints/run/config.yaml",
                run_dir="/mnt/checkpoints/run", num_nodes=2, gpus_per_node=8, checkpoint_pvc="rewardtune-checkpoints",
                model_cache_pvc="rewardtune-model-cache", node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                grace_s=45)
    return TrainJobRequest(**{**base, **overrides})


def _pod(body):
    return body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("nodes,gpus", [(2, 8), (4, 1), (16, 4)])
def test_trainjob_validates_against_the_v2_3_crd(trainjob_crd, nodes, gpus):
    crd, validator = trainjob_crd
    body = build_trainjob(_request(num_nodes=nodes, gpus_per_node=gpus))
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert (crd["spec"]["group"], crd["spec"]["scope"]) == ("trainer.kubeflow.org", "Namespaced")
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == crd["spec"]["names"]["kind"]


def test_closed_schema_refuses_an_unknown_field(trainjob_crd):
    """The check has teeth: a misspelt field (as an older/newer Trainer would silently drop) is an error."""
    _, validator = trainjob_crd
    body = build_trainjob(_request())
    body["spec"]["trainer"]["numNode"] = 2
    _pod(body)["tolerationz"] = []
    paths = {tuple(e.path) for e in validator.iter_errors(body)}
    assert ("spec", "trainer") in paths and len(paths) == 2


def test_official_sdk_models_round_trip_the_trainjob():
    """kubeflow-trainer-api 2.3.0 (the SDK's own models) reads the manifest back unchanged."""
    models = pytest.importorskip("kubeflow_trainer_api.models")
    body = build_trainjob(_request())
    parsed = models.TrainerV1alpha1TrainJob.from_dict(body)
    assert parsed.spec.trainer.num_nodes == 2 and parsed.spec.runtime_ref.kind == "TrainingRuntime"
    assert parsed.to_dict() == body


@pytest.mark.parametrize("run_id", ["3f6c1d2e-9a7b-4c1d-8e2f-0a1b2c3d4e5f", "Run_ID.With--Odd  chars" * 5, "9999", "-"])
def test_name_passes_the_crd_cel_rules(trainjob_crd, run_id):
    crd, _ = trainjob_crd
    pattern, size = _cel_name_rules(crd)
    name = trainjob_name(run_id)
    assert pattern.match(name) and len(name) <= min(size, 24), name
    assert trainjob_name(run_id) == name  # a retried launcher finds the same job
    assert trainjob_name(run_id + "x") != name
    with pytest.raises(RewardtuneError, match="RFC 1035"):
        _request(name="Bad_Name")


def test_trainjob_content():
    body = build_trainjob(_request(grace_s=45))
    trainer = body["spec"]["trainer"]
    assert body["spec"]["runtimeRef"] == {"name": "rewardtune-torch", "apiGroup": "trainer.kubeflow.org",
                                          "kind": "TrainingRuntime"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"cpu", "memory"} <= set(trainer["resourcesPerNode"]["requests"])
    # torchrun gets nnodes / rank / master from the PET_* variables the torch plugin injects, and refuses to
    # take them from the user: the TrainJob must not set them, nor pass the matching flags.
    env = {e["name"]: e for e in trainer["env"]}
    assert not PET_ENV & set(env)
    assert PET_ENV == {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    command = trainer["command"]
    assert command[0] == "torchrun" and not any(a.startswith(("--nnodes", "--node", "--master", "--nproc")) for a in command)
    assert command[command.index("-m") + 1:command.index("-m") + 3] == ["rewardtune.cli", "train"]
    assert "--resume" in command and "checkpointing.termination_grace_s=45" in command
    assert command[command.index("--out") + 1] == "/mnt/checkpoints/run"
    # graceful preemption: trainer grace < torchrun's shutdown timeout < the pod's termination grace
    pod = _pod(body)
    assert 45 < int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]) < pod["terminationGracePeriodSeconds"]
    assert shutdown_timings(45) == (int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]), pod["terminationGracePeriodSeconds"])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == "rewardtune-pipeline"
    volumes = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"]}
    assert volumes == {"checkpoints": {"claimName": "rewardtune-checkpoints"},
                       "model-cache": {"claimName": "rewardtune-model-cache", "readOnly": True}}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"/mnt/checkpoints": "checkpoints", "/mnt/model-cache": "model-cache"}
    assert env["RT_MODEL_CACHE"]["value"] == "/mnt/model-cache"
    s3_cache = build_trainjob(_request(model_cache_uri="s3://bucket/models"))["spec"]["trainer"]["env"]
    assert {"name": "RT_MODEL_CACHE", "value": "s3://bucket/models"} in s3_cache
    s3 = [e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e]
    assert {r["key"] for r in s3} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(r["name"] == "rewardtune-s3" and r["optional"] for r in s3)


def test_shipped_training_runtime_validates_and_matches_the_trainjob():
    crd = _crd("trainingruntimes")
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"]["openAPIV3Schema"]
    runtime = yaml.safe_load(RUNTIME.read_text())
    errors = list(jsonschema.Draft7Validator(_closed(schema)).iter_errors(runtime))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert runtime["kind"] == "TrainingRuntime" and "torch" in runtime["spec"]["mlPolicy"]
    body = build_trainjob(_request())
    assert runtime["metadata"]["name"] == body["spec"]["runtimeRef"]["name"]
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    patch = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    # the torch plugin finds the trainer by this label and injects PET_* into the container named `node`
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert job["name"] == patch["name"] == "node"
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == _pod(body)["containers"][0]["name"]
    models = pytest.importorskip("kubeflow_trainer_api.models")
    assert models.TrainerV1alpha1TrainingRuntime.from_dict(runtime).to_dict() == runtime


class _ApiError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeCustomObjects:
    """The four CustomObjectsApi calls the launcher uses, over one dict; `script` plays the controller."""

    def __init__(self, existing=None, script=()):
        self.objects = dict(existing or {})
        self.calls = []
        self.script = list(script)  # conditions to report on successive gets of a created job

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", body["metadata"]["name"]))
        key = (namespace, body["metadata"]["name"])
        if key in self.objects:
            raise _ApiError(409)
        self.objects[key] = {**body, "status": {}}
        return self.objects[key]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        if (namespace, name) not in self.objects:
            raise _ApiError(404)
        obj = self.objects[(namespace, name)]
        if self.script:
            obj["status"] = self.script.pop(0)
        return obj

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        self.calls.append(("delete", name))
        del self.objects[(namespace, name)]


def _status(kind=None, message="", active=0):
    conditions = [{"type": kind, "status": "True", "message": message}] if kind else []
    return {"conditions": conditions, "jobsStatus": [{"name": "node", "active": active, "ready": active}]}


def _existing(body, status):
    return {(body["metadata"]["namespace"], body["metadata"]["name"]): {**body, "status": status}}


def test_launcher_creates_then_waits_until_complete(caplog):
    body = build_trainjob(_request())
    api = FakeCustomObjects(script=[_status(active=0), _status(active=2), _status(active=2), _status("Complete")])
    assert ensure_trainjob(api, body) == "created"
    with caplog.at_level(logging.INFO, logger="rewardtune.trainjob"):
        caplog.clear()  # an earlier test may have left the logger at INFO, so "created" was captured too
        done = wait_trainjob(api, "rewardtune", body["metadata"]["name"], sleep=lambda s: None)
    assert done["status"]["conditions"][0]["type"] == "Complete"
    progress = [r.getMessage() for r in caplog.records]
    assert len(progress) == 3  # logged when it changed: pending, 2 active, complete
    assert "active 2 ready 2" in progress[1] and "Complete" in progress[2]


def test_launcher_reattaches_on_409_to_a_running_job():
    body = build_trainjob(_request())
    api = FakeCustomObjects(existing=_existing(body, _status(active=2)))
    assert ensure_trainjob(api, body) == "attached"
    assert [c[0] for c in api.calls] == ["create", "get"]


def test_launcher_replaces_a_failed_job_and_recreates_it():
    body = build_trainjob(_request())
    api = FakeCustomObjects(existing=_existing(body, _status("Failed", "node-1 OOMKilled")))
    assert ensure_trainjob(api, body, sleep=lambda s: None) == "recreated"
    assert [c[0] for c in api.calls] == ["create", "get", "delete", "get", "create"]
    assert api.objects[("rewardtune", body["metadata"]["name"])]["spec"] == body["spec"]


def test_launcher_finds_a_complete_job_done_and_reports_a_failure():
    body = build_trainjob(_request())
    assert ensure_trainjob(FakeCustomObjects(existing=_existing(body, _status("Complete"))), body) == "complete"
    api = FakeCustomObjects(script=[_status("Failed", "node-0 exit code 2")])
    ensure_trainjob(api, body)
    with pytest.raises(RewardtuneError, match="failed: node-0 exit code 2; a retry"):
        wait_trainjob(api, "rewardtune", body["metadata"]["name"], sleep=lambda s: None)
    other = FakeCustomObjects()
    other.create_namespaced_custom_object = lambda *a: (_ for _ in ()).throw(_ApiError(403))
    with pytest.raises(_ApiError):  # anything but 409 is not ours to handle
        ensure_trainjob(other, body)


class _FakeCore:
    def __init__(self, modes):
        self.modes = modes

    def read_namespaced_persistent_volume_claim(self, name, namespace):
        from types import SimpleNamespace

        return SimpleNamespace(spec=SimpleNamespace(access_modes=self.modes))


@pytest.fixture
def tiny_config_path(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "model")))
    return path


def _prompts(tmp_path) -> Path:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.txt").write_text("a cat\na dog\n")
    return prompts


def test_launch_for_pipeline_stages_the_run_and_publishes_checkpoints(tmp_path, tiny_config_path):
    run_id = "3f6c1d2e-9a7b-4c1d-8e2f-0a1b2c3d4e5f"
    run_dir = tmp_path / "pvc" / run_id

    class NodesWrite(FakeCustomObjects):
        def get_namespaced_custom_object(self, *args):
            obj = super().get_namespaced_custom_object(*args)
            if obj["status"].get("conditions"):  # "the nodes" wrote a checkpoint before completing
                ckpt = run_dir / "checkpoints" / "epoch-000001"
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / "manifest.json").write_text("{}")
                (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "reward_mean": 0.5}\n')
            return obj

    api = NodesWrite(script=[_status(active=2), _status("Complete")])
    result = launch_for_pipeline(
        str(tiny_config_path), _prompts(tmp_path), tmp_path / "out", workdir=str(tmp_path / "pvc"), run_id=run_id,
        image="ghcr.io/rewardtune/rewardtune-trainer:0.1.0", num_nodes=2, gpus_per_node=4,
        checkpoint_pvc="rewardtune-checkpoints", model_cache_pvc="rewardtune-model-cache",
        overrides=["training.epochs=1"], namespace="rewardtune", model_cache_uri="s3://bucket/models", custom_api=api, core_api=_FakeCore(["ReadWriteMany"]),
        poll_s=0,
    )
    assert result["checkpoints"] == ["epoch-000001"] and result["final_metrics"]["reward_mean"] == 0.5
    assert (tmp_path / "out" / "checkpoints" / "epoch-000001" / "manifest.json").is_file()
    created = api.objects[("rewardtune", result["trainjob"])]
    assert {"name": "RT_MODEL_CACHE", "value": "s3://bucket/models"} in created["spec"]["trainer"]["env"]
    command = created["spec"]["trainer"]["command"]
    staged = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
    assert staged["prompts"]["source"] == str(run_dir / "prompts" / "train.txt") and staged["training"]["epochs"] == 1
    assert (run_dir / "prompts" / "train.txt").read_text() == "a cat\na dog\n"


def test_launch_refuses_a_checkpoint_pvc_nodes_cannot_share(tmp_path, tiny_config_path):
    api = FakeCustomObjects()
    with pytest.raises(RewardtuneError, match="needs ReadWriteMany"):
        launch_for_pipeline(str(tiny_config_path), _prompts(tmp_path), tmp_path / "out", workdir=str(tmp_path),
                            run_id="r1", image="x/y:z", num_nodes=2, gpus_per_node=1, checkpoint_pvc="c",
                            model_cache_pvc="m", namespace="ns", custom_api=api, core_api=_FakeCore(["ReadWriteOnce"]))
    assert api.calls == []  # nothing was created


def test_stage_run_is_idempotent(tmp_path, tiny_config_path):
    first = stage_run(str(tiny_config_path), _prompts(tmp_path), tmp_path / "run", ["training.epochs=2"])
    text = first.read_text()
    assert stage_run(str(tiny_config_path), tmp_path / "prompts", tmp_path / "run", ["training.epochs=2"]) == first
    assert first.read_text() == text
