"""prepare-prompts: the seeded train/held-out prompt split as a KFP `Dataset` (CPU image)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_prompts(config: str, prompts: Output[Dataset], base_model: str = "", prompt_source: str = "") -> int:
    """Writes train.txt / heldout.txt / prompts.json into the artifact; returns the number of training prompts."""
    from rewardtune.stages import param_overrides, prepare_prompts_from_config, resolve_config

    cfg = resolve_config(config, param_overrides(base_model=base_model, prompt_source=prompt_source))
    summary = prepare_prompts_from_config(cfg, prompts.path)
    prompts.metadata.update({k: v for k, v in summary.items() if v is not None})
    return summary["num_train"]
