"""The strided critic-input mode: which steps are embedded and how the rest are filled in."""

import pytest
import torch

from rewardtune.critic import embedded_steps, interpolate_step_embeddings


@pytest.mark.parametrize(
    ("num_steps", "stride", "expected"),
    [(4, 1, [0, 1, 2, 3]), (4, 2, [0, 2, 3]), (5, 2, [0, 2, 4]), (50, 10, [0, 10, 20, 30, 40, 49]), (3, 7, [0, 2])],
)
def test_embedded_steps(num_steps, stride, expected):
    assert embedded_steps(num_steps, stride) == expected


def test_interpolation_is_linear_then_unit_norm():
    e0 = torch.tensor([1.0, 0.0])
    e3 = torch.tensor([0.0, 1.0])
    filled = interpolate_step_embeddings([0, 3], torch.stack([e0, e3])[None], 4)
    assert filled.shape == (1, 4, 2)
    torch.testing.assert_close(filled[0, 0], e0)
    torch.testing.assert_close(filled[0, 3], e3)
    # step 1 is 2/3 e0 + 1/3 e3 = (2/3, 1/3), normalized by sqrt(5)/3 -> (2, 1)/sqrt(5)
    torch.testing.assert_close(filled[0, 1], torch.tensor([2.0, 1.0]) / 5**0.5)
    torch.testing.assert_close(filled[0, 2], torch.tensor([1.0, 2.0]) / 5**0.5)


def test_stride_one_is_the_identity():
    embeddings = torch.nn.functional.normalize(torch.randn(2, 5, 3), dim=-1)
    assert interpolate_step_embeddings(list(range(5)), embeddings, 5) is embeddings


def test_mismatched_steps_are_refused():
    with pytest.raises(ValueError, match="must start at 0"):
        interpolate_step_embeddings([1, 3], torch.zeros(1, 2, 2), 4)
