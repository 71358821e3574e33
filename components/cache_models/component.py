"""cache-models: fetch the base model and learned-reward weights once into the shared cache (trainer image)."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def cache_models(config: str, cache_uri: str, cache: Output[Model], base_model: str = "", reward: str = ""):
    """Fills `cache_uri` (a mounted PVC path or s3:// prefix) and records it on the output artifact."""
    from rewardtune.cache import cache_models as run_cache
    from rewardtune.model_refs import config_model_refs
    from rewardtune.stages import param_overrides, resolve_config

    cfg = resolve_config(config, param_overrides(base_model=base_model, reward=reward))
    run_cache(config_model_refs(cfg), cache_uri)
    cache.metadata["cache_uri"] = cache_uri
