"""plan-arms: the validated list of algorithms the DAG trains side by side (CPU image); runs before any training."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_arms(
    config: str,
    algorithms: list = [],  # noqa: B006 - KFP parameter default
    arm_overrides: dict = {},  # noqa: B006 - KFP parameter default
    algorithm: str = "",
    base_model: str = "",
    reward: str = "",
    epochs: int = 0,
    push_to_hub: str = "",
) -> list[str]:
    """Returns the arms for the training fan-out (`algorithms`, or the one `algorithm` / config algorithm); an
    unknown or repeated name, or an arm whose config does not validate, fails here with the field named."""
    from rewardtune.arms import plan_arms as plan
    from rewardtune.stages import param_overrides

    return plan(config, algorithm, algorithms, arm_overrides,
                param_overrides(base_model=base_model, reward=reward, epochs=epochs), push_to_hub)
