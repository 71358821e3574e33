"""The compiled DAG, read back through KFP's own protos: what the cluster will actually get."""

import re
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
    assert {"config", "algorithm", "base_model", "reward", "epochs", "num_nodes", "gpus_per_node", "gpu_node_selector",
            "trainer_image", "cpu_image", "checkpoint_pvc", "model_cache_pvc", "model_cache_uri"} <= params
    assert "image_tag" not in params
    execs = set(pipeline.deployment_spec.fields["executors"].struct_value.fields)
    assert {f"exec-{s}" for s in ("prepare-prompts", "cache-models", "train", "train-multinode", "evaluate", "report",
                                  "record-status")} <= execs


def test_train_gpu_resources_retry_and_no_cache(specs):
    pipeline, _ = specs
    train = pipeline.deployment_spec.fields["executors"].struct_value.fields["exec-train"].struct_value
    container = json_format.MessageToDict(train)["container"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert container["resources"]["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
    assert container["image"] == "{{$.inputs.parameters['pipelinechannel--trainer_image']}}"
    task = _dag_task(pipeline, "train")
    assert not task.caching_options.enable_cache
    assert task.retry_policy.max_retry_count == 3
    assert task.retry_policy.backoff_duration.seconds == 120
    assert task.inputs.parameters["num_gpus"].component_input_parameter == "pipelinechannel--gpus_per_node"
    # the lightweight component runs on the project image: no pip install of kfp at start-up
    assert "pip install" not in " ".join(container["command"]) and "kfp.dsl.executor_main" in " ".join(container["command"])


def test_fan_out_collect_and_exit_handler(specs):
    pipeline, _ = specs
    # one fan-out + report per training branch (kfp.local cannot select an artifact out of a dsl.OneOf)
    for trainer in ("train", "train-multinode"):
        branch = next(c.dag for c in pipeline.components.values() if trainer in c.dag.tasks)
        loop_name = next(n for n in branch.tasks if n.startswith("for-loop"))
        loop = branch.tasks[loop_name]
        assert loop.parameter_iterator.items.input_parameter == f"pipelinechannel--{trainer}-Output"
        assert loop.iterator_policy.parallelism_limit == 2
        report = next(t for n, t in branch.tasks.items() if n.startswith("report"))
        assert report.inputs.artifacts["evaluations"].task_output_artifact.producer_task == loop_name
        assert report.inputs.artifacts["run"].task_output_artifact.producer_task == trainer
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


# The KFP backend's rule (backend/src/v2/driver: resolvePodSpecInputRuntimeParameter, util.go
# inputPipelineChannelPattern): a pod-spec value matching this pattern ANYWHERE is replaced as a whole by the
# named parameter's value; anything else is used as it is.
KFP_CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
IMAGE_REF = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def _backend_resolve(value: str, inputs: dict[str, str]) -> str:
    match = KFP_CHANNEL.search(value)
    return inputs[match.group(1)] if match else value


def _executor_inputs(pipeline) -> dict[str, str]:
    """Each `pipelinechannel--P` an executor can see, bound to the root parameter P's default (what a run gets)."""
    defaults = {name: spec.default_value.string_value for name, spec in pipeline.root.input_definitions.parameters.items()}
    return {f"pipelinechannel--{name}": value for name, value in defaults.items()}


def test_every_image_resolves_to_a_whole_reference_under_the_backend_rule(specs):
    pipeline, _ = specs
    images = yaml.safe_load((REPO / "images" / "images.yaml").read_text())
    expected = {f"{images['registry']}/{spec['name']}:{images['tag']}" for spec in images["images"].values()}
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    resolved = {}
    for name, executor in executors.items():
        image = executor["container"]["image"]
        whole_placeholder = re.fullmatch(r"\{\{\$\.inputs\.parameters\['[^']+'\]\}\}", image)
        assert whole_placeholder or not KFP_CHANNEL.search(image), f"{name}: placeholder inside '{image}'"
        resolved[name] = _backend_resolve(image, _executor_inputs(pipeline))
        assert IMAGE_REF.match(resolved[name]), f"{name}: '{image}' resolves to '{resolved[name]}'"
    assert set(resolved.values()) == expected
    assert resolved["exec-train"].endswith(f"rewardtune-trainer:{images['tag']}")
    assert resolved["exec-train-multinode"].endswith(f"rewardtune-cpu:{images['tag']}")


def test_backend_rule_catches_the_old_tag_form():
    """The rule itself: a tag placeholder inside a reference resolves to the bare tag (what the old DAG did)."""
    old = "ghcr.io/rewardtune/rewardtune-trainer:{{$.inputs.parameters['pipelinechannel--image_tag']}}"
    assert _backend_resolve(old, {"pipelinechannel--image_tag": "0.1.0"}) == "0.1.0"
    assert not IMAGE_REF.match("0.1.0")


def test_multi_node_branch_launches_a_trainjob(specs):
    pipeline, executors = specs
    branches = {t: next(n for c in pipeline.components.values() for n, task in c.dag.tasks.items()
                        if n.startswith("condition-") and t in pipeline.components[task.component_ref.name].dag.tasks)
                for t in ("train", "train-multinode")}
    single, multi = (_dag_task(pipeline, branches[t]) for t in ("train", "train-multinode"))
    assert "num_nodes" in single.trigger_policy.condition and "== 1" in single.trigger_policy.condition
    assert "num_nodes" in multi.trigger_policy.condition and "!" in multi.trigger_policy.condition
    launcher = _dag_task(pipeline, "train-multinode")
    bound = {k: v.component_input_parameter for k, v in launcher.inputs.parameters.items() if v.component_input_parameter}
    assert bound["trainer_image"] == "pipelinechannel--trainer_image"
    assert bound["num_nodes"] == "pipelinechannel--num_nodes" and bound["checkpoint_pvc"] == "pipelinechannel--checkpoint_pvc"
    assert not launcher.caching_options.enable_cache and launcher.retry_policy.max_retry_count == 3
    config = executors["exec-train-multinode"]  # a CPU pod: no GPU node, only the shared checkpoint volume
    assert not config.tolerations and not config.node_selector.node_selector_json.component_input_parameter
    assert [m.mount_path for m in config.pvc_mount] == ["/mnt/checkpoints"]
    container = json_format.MessageToDict(pipeline.deployment_spec)["executors"]["exec-train-multinode"]["container"]
    assert "accelerator" not in container.get("resources", {})
