"""Config sections of the flow family and GRPO: `sampling.flow`, `algorithm.group` (validated)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rewardtune.config import FlowSamplingConfig, GroupConfig, format_validation_error


def test_defaults_are_flow_grpos():
    flow = FlowSamplingConfig()
    assert (flow.noise_level, flow.sde_type, flow.train_last_step) == (0.7, "sde", False)
    assert flow.stochastic_steps(10) == [True] * 9 + [False]
    assert GroupConfig().group_size == 24


def test_window():
    flow = FlowSamplingConfig.model_validate({"sde_window": {"start": 1, "size": 3}})
    assert flow.stochastic_steps(10) == [False, True, True, True] + [False] * 6
    with pytest.raises(ValueError, match="window"):
        flow.stochastic_steps(4)


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (FlowSamplingConfig, {"noise_level": 0}, "noise_level"),
        (FlowSamplingConfig, {"noise_level": float("nan")}, "noise_level"),
        (FlowSamplingConfig, {"sde_type": "ode"}, "sde_type"),
        (FlowSamplingConfig, {"sde_window": {"start": 0, "size": 0}}, "sde_window.size"),
        (FlowSamplingConfig, {"sde_type": "cps", "train_last_step": True}, "<root>"),
        (FlowSamplingConfig, {"noise_levle": 0.5}, "noise_levle"),
        (GroupConfig, {"group_size": 1}, "group_size"),
        (GroupConfig, {"std": "batch"}, "std"),
    ],
)
def test_bad_values_name_the_field(model, data, field):
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    message = format_validation_error(err.value)
    assert message.startswith(f"config error at {field}") and "\n" not in message

