"""export: the checkpoint chosen by held-out evaluation as a diffusers pipeline + model card (trainer image)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def export(
    run: Input[Model],
    evaluations: Input[list[Dataset]],
    model: Output[Model],
    select: str = "best-heldout",
    merge: bool = True,
    push_to_hub: str = "",
    algorithm: str = "",
) -> str:
    """Writes the pipeline directory into the `model` artifact (loadable with StableDiffusionPipeline.from_pretrained)
    and, when `push_to_hub` names a repo, uploads it (token: HF_TOKEN from the optional Secret); returns the
    chosen checkpoint's name. `{algorithm}` in `push_to_hub` becomes the arm's `algorithm` (one repo per arm)."""
    import os

    from rewardtune.arms import arm_repo_id
    from rewardtune.stages import export_stage

    if os.path.isdir(model.path) and not os.listdir(model.path):
        os.rmdir(model.path)  # export writes a fresh directory and renames it into place
    summary = export_stage(run.path, [e.path for e in evaluations], model.path, select=select, merge=merge,
                           push_to_hub=arm_repo_id(push_to_hub, algorithm))
    model.metadata.update({k: v for k, v in summary.items() if isinstance(v, str | bool)})
    return summary["checkpoint"]
