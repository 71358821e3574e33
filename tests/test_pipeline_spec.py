"""The compiled DAG, read back through KFP's own protos: what the cluster will actually get."""

import subprocess
import sys

import pytest
import yaml
from google.protobuf import json_format

from tests.conftest import REPO

pytest.importorskip("kfp")
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2  # noqa: E402
from kfp.pipeline_spec import pipeline_spec_pb2  # noqa: E402

COMPILED = REPO / "pipelines" / "alignment.yaml"


@pytest.fixture(scope="module")
def specs():
    pipeline_doc, platform_doc = yaml.safe_load_all(COMPILED.read_text())
    pipeline = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    executors = {
        name: json_format.ParseDict(json_format.MessageToDict(cfg), k8s_pb2.KubernetesExecutorConfig())
        for name, cfg in platform.platforms["kubernetes"].deployment_spec.executors.items()
    }
    return pipeline, executors


def _dag_task(pipeline, name):
    for dag in [pipeline.root.dag, *(c.dag for c in pipeline.components.values())]:
        if name in dag.tasks:
            return dag.tasks[name]
    raise KeyError(name)


def test_compile_reproduces_committed_yaml(tmp_path):
    fresh = tmp_path / "alignment.yaml"
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "compile.py"), "--out", str(fresh)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/alignment.yaml drifted: run `python pipelines/compile.py`"


def test_parameters_and_stages(specs):
    pipeline, _ = specs
    params = set(pipeline.root.input_definitions.parameters)
    assert {"config", "algorithm", "base_model", "reward", "epochs", "gpu_count", "gpu_node_selector", "image_tag",
            "checkpoint_pvc", "model_cache_pvc", "model_cache_uri"} <= params
    execs = set(pipeline.deployment_spec.fields["executors"].struct_value.fields)
    assert {f"exec-{s}" for s in ("prepare-prompts", "cache-models", "train", "evaluate", "report", "record-status")} <= execs


def test_train_gpu_resources_retry_and_no_cache(specs):
    pipeline, _ = specs
    train = pipeline.deployment_spec.fields["executors"].struct_value.fields["exec-train"].struct_value
    container = json_format.MessageToDict(train)["container"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert container["resources"]["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpu_count']}}"
    assert "rewardtune-trainer:{{$.inputs.parameters['pipelinechannel--image_tag']}}" in container["image"]
    task = _dag_task(pipeline, "train")
    assert not task.caching_options.enable_cache
    assert task.retry_policy.max_retry_count == 3
    assert task.retry_policy.backoff_duration.seconds == 120
    assert task.inputs.parameters["num_gpus"].component_input_parameter == "pipelinechannel--gpu_count"
    # the lightweight component runs on the project image: no pip install of kfp at start-up
    assert "pip install" not in " ".join(container["command"]) and "kfp.dsl.executor_main" in " ".join(container["command"])


def test_fan_out_collect_and_exit_handler(specs):
    pipeline, _ = specs
    loop = _dag_task(pipeline, "for-loop-2")
    assert loop.parameter_iterator.items.input_parameter.endswith("train-Output")
    assert loop.iterator_policy.parallelism_limit == 2
    report = _dag_task(pipeline, "report")
    assert report.inputs.artifacts["evaluations"].task_output_artifact.producer_task == "for-loop-2"
    status = pipeline.root.dag.tasks["record-status"]
    assert status.trigger_policy.strategy == pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED


def test_kubernetes_executor_configs(specs):
    _, executors = specs
    train = executors["exec-train"]
    assert train.node_selector.node_selector_json.component_input_parameter == "pipelinechannel--gpu_node_selector"
    assert [(t.key, t.operator, t.effect) for t in train.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    mounts = {m.mount_path: m.pvc_name_parameter.component_input_parameter for m in train.pvc_mount}
    assert mounts == {"/mnt/checkpoints": "pipelinechannel--checkpoint_pvc", "/mnt/model-cache": "pipelinechannel--model_cache_pvc"}
    shm = train.empty_dir_mounts[0]
    assert (shm.mount_path, shm.medium) == ("/dev/shm", "Memory")
    secret = train.secret_as_env[0]
    assert secret.secret_name == "rewardtune-s3"
    assert {k.env_var for k in secret.key_to_env} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert executors["exec-evaluate"].tolerations and not executors["exec-prepare-prompts"].tolerations
    report = executors["exec-report"]  # CPU step: no GPU node, no secrets
    assert not report.tolerations and not report.secret_as_env
    for name, executor in executors.items():  # every stage runs as the images' non-root user
        context = executor.security_context
        assert (context.run_as_user, context.run_as_group, context.run_as_non_root) == (1000, 1000, True), name
    assert set(executors) >= {"exec-train", "exec-evaluate", "exec-report", "exec-prepare-prompts", "exec-cache-models"}


def test_component_images_come_from_images_yaml():
    sys.path.insert(0, str(REPO))
    from components.images import CPU_IMAGE, TRAINER_IMAGE
    from components.prepare_prompts.component import prepare_prompts
    from components.train.component import train

    spec = yaml.safe_load((REPO / "images" / "images.yaml").read_text())
    assert TRAINER_IMAGE == f"{spec['registry']}/{spec['images']['trainer']['name']}:{spec['tag']}"
    assert train.component_spec.implementation.container.image == TRAINER_IMAGE
    assert prepare_prompts.component_spec.implementation.container.image == CPU_IMAGE
