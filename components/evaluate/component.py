"""evaluate: score one checkpoint on the held-out prompts (trainer image); fanned out with dsl.ParallelFor."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(config: str, checkpoints: Input[Model], prompts: Input[Dataset], checkpoint: str, results: Output[Dataset],
             model_cache_uri: str = ""):
    """Writes the evaluation of `checkpoint` (a name under checkpoints/) into the `results` artifact; models come
    from `model_cache_uri` (RT_MODEL_CACHE) when given. The arm's algorithm comes from the run's own config.yaml:
    this step runs inside the per-checkpoint fan-out, which must not take the per-arm loop item (kfp.local 2.17
    would replace it by the checkpoint name)."""
    import os

    from rewardtune.arms import evaluation_config
    from rewardtune.evaluate import evaluate_run

    if model_cache_uri:
        os.environ["RT_MODEL_CACHE"] = model_cache_uri
    evaluate_run(evaluation_config(config, checkpoints.path), checkpoints.path, prompts.path, results.path, checkpoint=checkpoint)
    results.metadata["checkpoint"] = checkpoint
