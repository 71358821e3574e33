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
    assert {"config", "algorithm", "algorithms", "arm_overrides", "base_model", "reward", "epochs", "num_nodes",
            "gpus_per_node", "gpu_node_selector", "trainer_image", "cpu_image", "checkpoint_pvc", "model_cache_pvc",
            "model_cache_uri", "checkpoint_dir"} <= params
    kinds = pipeline_spec_pb2.ParameterType.ParameterTypeEnum
    assert pipeline.root.input_definitions.parameters["algorithms"].parameter_type == kinds.LIST
    assert pipeline.root.input_definitions.parameters["arm_overrides"].parameter_type == kinds.STRUCT
    assert "image_tag" not in params
    execs = set(pipeline.deployment_spec.fields["executors"].struct_value.fields)
    assert {f"exec-{s}" for s in ("plan-arms", "prepare-prompts", "cache-models", "train", "train-multinode", "evaluate",
                                  "collect-arm", "report", "record-status")} <= execs


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


def _component_of(pipeline, task_name):
    """The name of the DAG component that holds a task named `task_name`."""
    return next(name for name, c in pipeline.components.items() if task_name in c.dag.tasks)


def _loop(dag, items):
    """The ParallelFor task of `dag` iterating over the parameter channel `items`."""
    return next((n, t) for n, t in dag.tasks.items()
                if t.WhichOneof("iterator") == "parameter_iterator" and t.parameter_iterator.items.input_parameter == items)


def test_arms_fan_out_over_the_plan_and_fan_in_to_one_report(specs):
    """Per training branch: ParallelFor over plan-arms' list -> train (algorithm = the loop item) -> ParallelFor over
    its checkpoints -> evaluate, collect-arm (Collected evaluations), export; the report, outside the arm loop,
    takes Collected collect-arm artifacts. The KFP 2.17 driver resolves a Collected input by walking the loop's
    iteration DAGs 0..iteration_count-1 (backend/src/v2/driver/resolve.go, CollectInputs); its own test pipeline
    test_data/sdk_compiled_pipelines/valid/collected_artifacts.py nests a ParallelFor and a Collected inside an
    outer ParallelFor the same way."""
    pipeline, _ = specs
    # plan-arms sits in the exit handler, before both branches
    handler = pipeline.components[pipeline.root.dag.tasks["exit-handler-1"].component_ref.name].dag
    assert "plan-arms" in handler.tasks and "prepare-prompts" in handler.tasks
    plan_inputs = handler.tasks["plan-arms"].inputs.parameters
    for name in ("algorithms", "arm_overrides", "algorithm", "config", "epochs", "push_to_hub"):
        assert plan_inputs[name].component_input_parameter == f"pipelinechannel--{name}"
    for trainer in ("train", "train-multinode"):
        arm_component = _component_of(pipeline, trainer)
        arm_dag = pipeline.components[arm_component].dag
        branch = pipeline.components[_component_of(pipeline, arm_component.replace("comp-", "", 1))].dag
        arm_loop_name, arm_loop = _loop(branch, "pipelinechannel--plan-arms-Output")
        assert arm_loop.component_ref.name == arm_component
        assert arm_loop.parameter_iterator.item_input == "pipelinechannel--plan-arms-Output-loop-item"
        assert arm_loop.iterator_policy.parallelism_limit == 0  # arms train concurrently on the cluster
        bound = arm_dag.tasks[trainer].inputs.parameters
        assert bound["algorithm"].component_input_parameter == "pipelinechannel--plan-arms-Output-loop-item"
        assert bound["arm_overrides"].component_input_parameter == "pipelinechannel--arm_overrides"
        assert bound["run_id"].runtime_value.constant.string_value == "{{$.pipeline_job_uuid}}"  # + arm in the step

        ckpt_loop_name, ckpt_loop = _loop(arm_dag, f"pipelinechannel--{trainer}-Output")
        assert ckpt_loop.iterator_policy.parallelism_limit == 2
        # kfp.local 2.17 (orchestrator/task_spec_utils.py, create_parameter_loop_iteration_task_spec) gives every
        # input of a loop task named *-loop-item the innermost loop's item: the per-checkpoint loop must not take
        # the arm's name (evaluate reads the arm's algorithm from the run's config.yaml instead)
        assert not any(name.endswith("-loop-item") for name in ckpt_loop.inputs.parameters)
        ev_dag = pipeline.components[ckpt_loop.component_ref.name].dag
        assert [t.component_ref.name.removeprefix("comp-").split("-")[0] for t in ev_dag.tasks.values()] == ["evaluate"]

        collect = next(t for n, t in arm_dag.tasks.items() if n.startswith("collect-arm"))
        assert collect.inputs.artifacts["evaluations"].task_output_artifact.producer_task == ckpt_loop_name
        assert collect.inputs.artifacts["run"].task_output_artifact.producer_task == trainer
        shipped = next(t for n, t in arm_dag.tasks.items() if n.startswith("export"))
        assert shipped.inputs.artifacts["evaluations"].task_output_artifact.producer_task == ckpt_loop_name
        assert shipped.inputs.parameters["algorithm"].component_input_parameter == "pipelinechannel--plan-arms-Output-loop-item"
        collect_name = next(n for n in arm_dag.tasks if n.startswith("collect-arm"))
        assert collect_name in shipped.dependent_tasks

        report = next(t for n, t in branch.tasks.items() if n.startswith("report"))
        fan_in = report.inputs.artifacts["arms"].task_output_artifact
        assert fan_in.producer_task == arm_loop_name
        [selector] = arm_dag.outputs.artifacts[fan_in.output_artifact_key].artifact_selectors
        assert (selector.producer_subtask, selector.output_artifact_key) == (collect_name, "arm")
    status = pipeline.root.dag.tasks["record-status"]
    assert status.trigger_policy.strategy == pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED


def test_per_arm_steps_get_the_cluster_settings_of_their_stage(specs):
    """Every arm's train pod is the same GPU pod (image, GPUs, PVCs, retries, no cache); the new per-arm and plan
    steps are CPU pods with no GPU node, no secrets and no volumes."""
    pipeline, executors = specs
    containers = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    for name in ("exec-plan-arms", "exec-collect-arm", "exec-collect-arm-2", "exec-report", "exec-report-2"):
        assert containers[name]["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--cpu_image']}}", name
        assert "accelerator" not in containers[name]["container"].get("resources", {}), name
        config = executors.get(name, k8s_pb2.KubernetesExecutorConfig())
        assert not config.tolerations and not config.secret_as_env and not config.pvc_mount, name
    assert containers["exec-train"]["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--trainer_image']}}"
    assert [m.mount_path for m in executors["exec-train"].pvc_mount] == ["/mnt/checkpoints", "/mnt/model-cache"]
    train = _dag_task(pipeline, "train")
    assert not train.caching_options.enable_cache and train.retry_policy.max_retry_count == 3
    # train keeps its run where the checkpoint PVC is mounted (by default), so a retried pod finds it and resumes
    for task in (train, _dag_task(pipeline, "train-multinode")):
        assert task.inputs.parameters["workdir"].component_input_parameter == "pipelinechannel--checkpoint_dir"
    assert pipeline.root.input_definitions.parameters["checkpoint_dir"].default_value.string_value == "/mnt/checkpoints"


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
    def holds(component, task):  # the task sits in this component's DAG or a DAG nested in it
        dag = pipeline.components[component].dag
        return task in dag.tasks or any(holds(t.component_ref.name, task) for t in dag.tasks.values()
                                        if pipeline.components[t.component_ref.name].WhichOneof("implementation") == "dag")

    branches = {t: next(n for c in pipeline.components.values() for n, task in c.dag.tasks.items()
                        if re.fullmatch(r"condition-\d+", n) and holds(task.component_ref.name, t))
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
