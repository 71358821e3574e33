"""train: reward fine-tuning that resumes from its last checkpoint, so a retried pod continues (trainer image)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train(
    config: str,
    prompts: Input[Dataset],
    checkpoints: Output[Model],
    metrics: Output[Metrics],
    algorithm: str = "",
    base_model: str = "",
    reward: str = "",
    epochs: int = 0,
    num_gpus: int = 1,
    workdir: str = "",
    run_id: str = "",
    model_cache_uri: str = "",
) -> list[str]:
    """Trains in `workdir/run_id` (a PVC) when given, else in the artifact; returns checkpoint names for the fan-out.

    `model_cache_uri` (what cache-models filled) becomes RT_MODEL_CACHE, so models are read from the cache only."""
    import os

    from rewardtune.stages import param_overrides, train_for_pipeline

    if model_cache_uri:
        os.environ["RT_MODEL_CACHE"] = model_cache_uri

    result = train_for_pipeline(
        config, prompts.path, checkpoints.path, workdir=workdir, run_id=run_id, num_gpus=num_gpus,
        overrides=param_overrides(algorithm=algorithm, base_model=base_model, reward=reward, epochs=epochs),
    )
    for name, value in result["final_metrics"].items():
        metrics.log_metric(name, value)
    checkpoints.metadata["checkpoints"] = result["checkpoints"]
    return result["checkpoints"]
