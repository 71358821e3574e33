"""The alignment DAG: plan-arms, prepare-prompts, cache-models -> per algorithm (ParallelFor over `algorithms`):
train -> evaluate (per checkpoint) -> collect-arm, export -> one report over every arm.

Training is one pod with `gpus_per_node` GPUs when `num_nodes` is 1, and a Kubeflow Trainer TrainJob over
`num_nodes` pods (launched and awaited by the CPU step train-multinode) otherwise.

Cluster-only settings (GPUs, node selection, PVCs, secrets, /dev/shm) are kfp-kubernetes platform config:
`kfp.local` ignores them, so the same definition also runs on a laptop.

Images are whole references (`trainer_image`, `cpu_image`): the KFP driver resolves a pod-spec field that
contains `{{$.inputs.parameters['X']}}` by replacing the *whole* string with X's value, so an image must be a
literal or exactly one placeholder, never a placeholder inside a longer string.
"""

from kfp import dsl, kubernetes

from components.cache_models.component import cache_models
from components.collect_arm.component import collect_arm
from components.evaluate.component import evaluate
from components.export.component import export
from components.images import CPU_IMAGE, TRAINER_IMAGE
from components.plan_arms.component import plan_arms
from components.prepare_prompts.component import prepare_prompts
from components.record_status.component import record_status
from components.report.component import report
from components.train.component import train
from components.train_multinode.component import train_multinode

PIPELINE_NAME = "rewardtune-alignment"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
CACHE_MOUNT = "/mnt/model-cache"
S3_SECRET = "rewardtune-s3"
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
}
HF_SECRET = "rewardtune-hf"  # optional: HF_TOKEN for export's --push-to-hub
GPU_TAINT = "nvidia.com/gpu"
GPU_RESOURCE = "nvidia.com/gpu"
TRAIN_RETRIES = 3


def _use_s3(task: dsl.PipelineTask) -> None:
    """S3 credentials from the Secret template in manifests/base (optional: a PVC-only install has none)."""
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)


def _on_gpu(task: dsl.PipelineTask, gpu_count, node_selector) -> None:
    """GPUs on nodes that carry them (the GPU model is picked by the node selector); the GPU taint keeps CPU work
    off those nodes, so tolerate it. The resource name is a literal: kfp.local cannot resolve a pipeline
    parameter in a task's accelerator type inside an ExitHandler or ParallelFor sub-DAG."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpu_count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration(task, key=GPU_TAINT, operator="Exists", effect="NoSchedule")
    # NCCL and DataLoader workers share tensors through /dev/shm, which is 64 MiB by default in a pod.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="16Gi")


RUN_AS = 1000  # the images' `rewardtune` user (images/*.Dockerfile: USER 1000:1000)


def _image(task: dsl.PipelineTask, image) -> dsl.PipelineTask:
    """The stage's image, run as the images' non-root user (KFP adds drop-ALL and no privilege escalation).

    readOnlyRootFilesystem cannot be expressed through kfp-kubernetes 2.17 (set_security_context has only the
    identity fields); the standalone Jobs in manifests/jobs/ set it, and a cluster policy can enforce it here.
    """
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    return task.set_container_image(image)


def _evaluate_and_export(trained: dsl.PipelineTask, arm, config, prep, trainer_image, cpu_image, gpu_node_selector,
                         model_cache_pvc, model_cache_uri, export_select, push_to_hub) -> dsl.PipelineTask:
    """One arm after training: evaluate every checkpoint of `trained` (ParallelFor + Collected), pack the arm for the
    report (collect-arm), then export the checkpoint chosen by held-out evaluation as a KFP Model (a diffusers
    pipeline). Returns collect-arm, whose artifact the report fans in over the arms.

    Nothing in the per-checkpoint fan-out takes the per-arm loop item: kfp.local 2.17 gives every `*-loop-item`
    input of a loop task the innermost loop's item (task_spec_utils.create_parameter_loop_iteration_task_spec)."""
    with dsl.ParallelFor(trained.outputs["Output"], parallelism=2, name="per-checkpoint") as checkpoint:
        ev = evaluate(config=config, checkpoints=trained.outputs["checkpoints"], prompts=prep.outputs["prompts"],
                      checkpoint=checkpoint, model_cache_uri=model_cache_uri)
        _image(ev, trainer_image).set_retry(num_retries=2, backoff_duration="60s")
        _on_gpu(ev, 1, gpu_node_selector)
        kubernetes.mount_pvc(ev, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
        _use_s3(ev)
    packed = collect_arm(run=trained.outputs["checkpoints"], evaluations=dsl.Collected(ev.outputs["results"]))
    _image(packed, cpu_image)

    shipped = export(run=trained.outputs["checkpoints"], evaluations=dsl.Collected(ev.outputs["results"]),
                     select=export_select, merge=True, push_to_hub=push_to_hub, algorithm=arm).after(packed)
    _image(shipped, trainer_image)
    shipped.set_memory_request("16G")
    kubernetes.mount_pvc(shipped, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
    _use_s3(shipped)
    kubernetes.use_secret_as_env(shipped, secret_name=HF_SECRET, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"},
                                 optional=True)
    return packed


def _report(arms: dsl.PipelineTask, cpu_image) -> None:
    """One report over every arm (plots overlaid): the fan-in of each arm's collect-arm artifact."""
    _image(report(arms=dsl.Collected(arms.outputs["arm"])), cpu_image)


@dsl.pipeline(name=PIPELINE_NAME, description="Reward fine-tuning (DDPO / TDPO / TDPO-R / CDPO) with evaluation and report.")
def alignment_pipeline(
    config: str,
    algorithm: str = "",
    algorithms: list = [],  # noqa: B006 - KFP parameter default
    arm_overrides: dict = {},  # noqa: B006 - KFP parameter default
    base_model: str = "",
    reward: str = "",
    epochs: int = 0,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    gpu_node_selector: dict = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},  # noqa: B006 - KFP parameter default
    trainer_image: str = TRAINER_IMAGE,
    cpu_image: str = CPU_IMAGE,
    checkpoint_pvc: str = "rewardtune-checkpoints",
    model_cache_pvc: str = "rewardtune-model-cache",
    model_cache_uri: str = CACHE_MOUNT,
    checkpoint_dir: str = CHECKPOINT_MOUNT,
    export_select: str = "best-heldout",
    push_to_hub: str = "",
):
    """`config` is YAML text or a URI (path, file://, s3://); empty algorithm/base_model/reward/epochs keep the config's.

    `algorithms` (e.g. ["ddpo", "tdpo_r"]) trains one arm per algorithm side by side on the same config, prompts and
    seed, and the report overlays them; `arm_overrides` maps an algorithm to its own `section.key=value` settings
    (e.g. {"tdpo_r": ["training.learning_rate=3e-3"]}). Empty `algorithms`: one arm, `algorithm` or the config's.
    Each arm exports its own model; with several arms `push_to_hub` must hold `{algorithm}` (one repo per arm).

    `model_cache_uri` is where cache-models writes and train/evaluate read: the mounted cache PVC (default) or an
    s3:// prefix. `checkpoint_dir` is where train keeps each arm's run so that a retried pod resumes it: the checkpoint
    PVC's mount (default; on a cluster keep it there or below it) or, under kfp.local, a local directory. `num_nodes` > 1 needs a ReadWriteMany `checkpoint_pvc` and the TrainingRuntime in manifests/.
    """
    status = record_status()
    _image(status, cpu_image)
    with dsl.ExitHandler(status, name="alignment"):
        plan = plan_arms(config=config, algorithms=algorithms, arm_overrides=arm_overrides, algorithm=algorithm,
                         base_model=base_model, reward=reward, epochs=epochs, push_to_hub=push_to_hub)
        _image(plan, cpu_image)

        prep = prepare_prompts(config=config, base_model=base_model)
        _image(prep, cpu_image)
        _use_s3(prep)

        cache = cache_models(config=config, cache_uri=model_cache_uri, base_model=base_model, reward=reward)
        _image(cache, trainer_image).set_retry(num_retries=2, backoff_duration="60s")
        kubernetes.mount_pvc(cache, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
        _use_s3(cache)

        with dsl.If(num_nodes == 1, name="single-node"):
            with dsl.ParallelFor(plan.output, name="per-algorithm") as arm:
                trained = train(
                    config=config, prompts=prep.outputs["prompts"], algorithm=arm, arm_overrides=arm_overrides,
                    base_model=base_model, reward=reward, epochs=epochs, num_gpus=gpus_per_node,
                    workdir=checkpoint_dir, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, model_cache_uri=model_cache_uri,
                ).after(cache)
                _image(trained, trainer_image)
                # A retried pod finds its checkpoints on the PVC and resumes; a cached result would skip training.
                trained.set_caching_options(False).set_retry(num_retries=TRAIN_RETRIES, backoff_duration="120s", backoff_factor=2.0)
                trained.set_memory_request("32G").set_cpu_request("8")
                _on_gpu(trained, gpus_per_node, gpu_node_selector)
                kubernetes.mount_pvc(trained, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
                kubernetes.mount_pvc(trained, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
                _use_s3(trained)
                packed = _evaluate_and_export(trained, arm, config, prep, trainer_image, cpu_image, gpu_node_selector,
                                              model_cache_pvc, model_cache_uri, export_select, push_to_hub)
            _report(packed, cpu_image)
        with dsl.Else(name="multi-node"):
            with dsl.ParallelFor(plan.output, name="per-algorithm") as arm:
                launched = train_multinode(
                    config=config, prompts=prep.outputs["prompts"], trainer_image=trainer_image, num_nodes=num_nodes,
                    gpus_per_node=gpus_per_node, node_selector=gpu_node_selector, checkpoint_pvc=checkpoint_pvc,
                    model_cache_pvc=model_cache_pvc, workdir=checkpoint_dir, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    algorithm=arm, arm_overrides=arm_overrides, base_model=base_model, reward=reward, epochs=epochs,
                    model_cache_uri=model_cache_uri,
                ).after(cache)
                _image(launched, cpu_image)
                # The launcher only waits: a retry re-attaches to the TrainJob (or replaces a Failed one, which resumes).
                launched.set_caching_options(False).set_retry(num_retries=TRAIN_RETRIES, backoff_duration="120s", backoff_factor=2.0)
                kubernetes.mount_pvc(launched, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
                packed = _evaluate_and_export(launched, arm, config, prep, trainer_image, cpu_image, gpu_node_selector,
                                              model_cache_pvc, model_cache_uri, export_select, push_to_hub)
            _report(packed, cpu_image)
