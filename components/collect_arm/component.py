"""collect-arm: one arm's run summary and merged per-checkpoint evaluations as one artifact (CPU image)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def collect_arm(run: Input[Model], evaluations: Input[list[Dataset]], arm: Output[Dataset]):
    """Packs config.yaml + metrics.jsonl (no weights) and the evaluations, so the report fans in one artifact per
    arm and never has to pair two lists."""
    from rewardtune.arms import arm_algorithm, pack_arm

    pack_arm(run.path, [e.path for e in evaluations], arm.path)
    arm.metadata["algorithm"] = arm_algorithm(arm.path)
