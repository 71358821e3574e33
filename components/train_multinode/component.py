"""train-multinode: runs training as a Kubeflow Trainer TrainJob over several GPU nodes and waits for it (CPU image).

Used instead of `train` when the DAG's num_nodes > 1. A retried launcher re-attaches to the same TrainJob (its
name comes from the run id) or replaces a Failed one, which resumes from the shared checkpoint volume.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_multinode(
    config: str,
    prompts: Input[Dataset],
    checkpoints: Output[Model],
    metrics: Output[Metrics],
    trainer_image: str,
    num_nodes: int,
    gpus_per_node: int,
    node_selector: dict,
    checkpoint_pvc: str,
    model_cache_pvc: str,
    workdir: str,
    run_id: str,
    algorithm: str = "",
    base_model: str = "",
    reward: str = "",
    epochs: int = 0,
    model_cache_uri: str = "",
    arm_overrides: dict = {},  # noqa: B006 - KFP parameter default
) -> list[str]:
    """Returns the checkpoint names for the evaluation fan-out, like `train` (one TrainJob per arm: the job name
    comes from `<run_id>-<algorithm>`)."""
    import logging

    from rewardtune.arms import arm_overrides as arm_sets
    from rewardtune.arms import arm_run_id
    from rewardtune.multinode import launch_for_pipeline
    from rewardtune.stages import param_overrides

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = launch_for_pipeline(
        config, prompts.path, checkpoints.path, workdir=workdir, run_id=arm_run_id(run_id, algorithm), image=trainer_image,
        num_nodes=num_nodes, gpus_per_node=gpus_per_node, checkpoint_pvc=checkpoint_pvc,
        model_cache_pvc=model_cache_pvc, node_selector=node_selector, model_cache_uri=model_cache_uri,
        overrides=param_overrides(base_model=base_model, reward=reward, epochs=epochs)
        + (arm_sets(algorithm, arm_overrides) if algorithm else []),
    )
    for name, value in result["final_metrics"].items():
        metrics.log_metric(name, value)
    checkpoints.metadata["checkpoints"] = result["checkpoints"]
    checkpoints.metadata["trainjob"] = result["trainjob"]
    return result["checkpoints"]
