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
    arm_overrides: dict = {},  # noqa: B006 - KFP parameter default
) -> list[str]:
    """Trains in `workdir/<run_id>-<algorithm>` (a PVC) when given, else in the artifact; returns checkpoint names
    for the fan-out. `algorithm` is this arm's; `arm_overrides[algorithm]` are its own `section.key=value` settings.

    `model_cache_uri` (what cache-models filled) becomes RT_MODEL_CACHE, so models are read from the cache only."""
    import os

    from rewardtune.arms import arm_overrides as arm_sets
    from rewardtune.arms import arm_run_id
    from rewardtune.stages import param_overrides, train_for_pipeline

    if model_cache_uri:
        os.environ["RT_MODEL_CACHE"] = model_cache_uri

    result = train_for_pipeline(
        config, prompts.path, checkpoints.path, workdir=workdir, run_id=arm_run_id(run_id, algorithm), num_gpus=num_gpus,
        overrides=param_overrides(base_model=base_model, reward=reward, epochs=epochs)
        + (arm_sets(algorithm, arm_overrides) if algorithm else []),
    )
    for name, value in result["final_metrics"].items():
        metrics.log_metric(name, value)
    checkpoints.metadata["checkpoints"] = result["checkpoints"]
    return result["checkpoints"]
