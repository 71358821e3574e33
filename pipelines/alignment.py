"""The alignment DAG: prepare-prompts -> cache-models -> train -> evaluate (per checkpoint) -> report.

Cluster-only settings (GPUs, node selection, PVCs, secrets, /dev/shm) are kfp-kubernetes platform config:
`kfp.local` ignores them, so the same definition also runs on a laptop.
"""

from kfp import dsl, kubernetes
from kfp.dsl import Model

from components.cache_models.component import cache_models
from components.evaluate.component import evaluate
from components.export.component import export
from components.images import DEFAULT_TAG, image_repo
from components.prepare_prompts.component import prepare_prompts
from components.record_status.component import record_status
from components.report.component import report
from components.train.component import train

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


def _image(task: dsl.PipelineTask, key: str, tag: str) -> dsl.PipelineTask:
    """The stage's image, run as the images' non-root user (KFP adds drop-ALL and no privilege escalation).

    readOnlyRootFilesystem cannot be expressed through kfp-kubernetes 2.17 (set_security_context has only the
    identity fields); the standalone Jobs in manifests/jobs/ set it, and a cluster policy can enforce it here.
    """
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    return task.set_container_image(f"{image_repo(key)}:{tag}")


@dsl.pipeline(name=PIPELINE_NAME, description="Reward fine-tuning (DDPO / TDPO / TDPO-R / CDPO) with evaluation and report.")
def alignment_pipeline(
    config: str,
    algorithm: str = "",
    base_model: str = "",
    reward: str = "",
    epochs: int = 0,
    gpu_count: int = 1,
    gpu_node_selector: dict = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},  # noqa: B006 - KFP parameter default
    image_tag: str = DEFAULT_TAG,
    checkpoint_pvc: str = "rewardtune-checkpoints",
    model_cache_pvc: str = "rewardtune-model-cache",
    model_cache_uri: str = CACHE_MOUNT,
    export_select: str = "best-heldout",
    push_to_hub: str = "",
):
    """`config` is YAML text or a URI (path, file://, s3://); empty algorithm/base_model/reward/epochs keep the config's.

    `model_cache_uri` is where cache-models writes: the mounted cache PVC (default) or an s3:// prefix.
    """
    status = record_status()
    _image(status, "cpu", image_tag)
    with dsl.ExitHandler(status, name="alignment"):
        prep = prepare_prompts(config=config, base_model=base_model)
        _image(prep, "cpu", image_tag)
        _use_s3(prep)

        cache = cache_models(config=config, cache_uri=model_cache_uri, base_model=base_model, reward=reward)
        _image(cache, "trainer", image_tag).set_retry(num_retries=2, backoff_duration="60s")
        kubernetes.mount_pvc(cache, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
        _use_s3(cache)

        trained = train(
            config=config, prompts=prep.outputs["prompts"], algorithm=algorithm, base_model=base_model, reward=reward,
            epochs=epochs, num_gpus=gpu_count, workdir=CHECKPOINT_MOUNT, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).after(cache)
        _image(trained, "trainer", image_tag)
        # A retried pod finds its checkpoints on the PVC and resumes; a cached result would skip training entirely.
        trained.set_caching_options(False).set_retry(num_retries=TRAIN_RETRIES, backoff_duration="120s", backoff_factor=2.0)
        trained.set_memory_request("32G").set_cpu_request("8")
        _on_gpu(trained, gpu_count, gpu_node_selector)
        kubernetes.mount_pvc(trained, pvc_name=checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        kubernetes.mount_pvc(trained, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
        _use_s3(trained)

        with dsl.ParallelFor(trained.outputs["Output"], parallelism=2, name="per-checkpoint") as checkpoint:
            ev = evaluate(config=config, checkpoints=trained.outputs["checkpoints"], prompts=prep.outputs["prompts"],
                          checkpoint=checkpoint)
            _image(ev, "trainer", image_tag).set_retry(num_retries=2, backoff_duration="60s")
            _on_gpu(ev, 1, gpu_node_selector)
            kubernetes.mount_pvc(ev, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
            _use_s3(ev)

        rep = report(run=trained.outputs["checkpoints"], evaluations=dsl.Collected(ev.outputs["results"]))
        _image(rep, "cpu", image_tag)

        # export (issue 17): the checkpoint chosen by held-out evaluation, as a KFP Model (a diffusers pipeline)
        shipped = export(run=trained.outputs["checkpoints"], evaluations=dsl.Collected(ev.outputs["results"]),
                         select=export_select, merge=True, push_to_hub=push_to_hub).after(rep)
        _image(shipped, "trainer", image_tag)
        shipped.set_memory_request("16G")
        kubernetes.mount_pvc(shipped, pvc_name=model_cache_pvc, mount_path=CACHE_MOUNT)
        _use_s3(shipped)
        kubernetes.use_secret_as_env(shipped, secret_name=HF_SECRET, secret_key_to_env={"HF_TOKEN": "HF_TOKEN"},
                                     optional=True)


@dsl.pipeline(name=f"{PIPELINE_NAME}-train-only", description="The sub-DAG whose stages exist today: prepare-prompts -> train.")
def train_only_pipeline(config: str, base_model: str = "", epochs: int = 0) -> Model:
    """For kfp.local and smoke tests while cache-models / evaluate / report are wired in."""
    prep = prepare_prompts(config=config, base_model=base_model)
    trained = train(config=config, prompts=prep.outputs["prompts"], base_model=base_model, epochs=epochs)
    trained.set_caching_options(False)
    return trained.outputs["checkpoints"]
