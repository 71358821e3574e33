"""The KL penalty's estimators and controller against hand-derived values (the official TDPO formulas)."""

import math

import pytest
import torch

from rewardtune.kl import KLController, adaptive_kl_update, gaussian_kl_same_std, kl_penalty, sample_kl

# log pi_ref = -0.5 with log pi = 0 (d = +0.5) or log pi = -1 (d = -0.5);
# js: m = ½(e^lp + e^ref), js = ½[max(lp - log m, 0) + max(ref - log m, 0)]
_M_POS = math.log(0.5 * (1.0 + math.exp(-0.5)))
_M_NEG = math.log(0.5 * (math.exp(-1.0) + math.exp(-0.5)))
CASES = [
    ("kl", 0.5, -0.5),
    ("abs", 0.5, 0.5),
    ("square", 0.125, 0.125),
    ("clip", 0.5, 0.0),
    ("approx", math.exp(0.5) - 1 - 0.5, math.exp(-0.5) - 1 + 0.5),  # (e^d - 1) - d
    ("js", 0.5 * (0.0 - _M_POS), 0.5 * (-0.5 - _M_NEG)),
]


@pytest.mark.parametrize(("kind", "positive", "negative"), CASES)
def test_estimators_by_hand(kind, positive, negative):
    got = kl_penalty(torch.tensor([0.0, -1.0]), torch.tensor([-0.5, -0.5]), kind)
    assert math.isclose(got[0].item(), positive, rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(got[1].item(), negative, rel_tol=1e-6, abs_tol=1e-7)


def test_js_is_symmetric_and_zero_on_equal_policies():
    a, b = torch.tensor([0.3, -2.0]), torch.tensor([-1.0, 0.5])
    torch.testing.assert_close(kl_penalty(a, b, "js"), kl_penalty(b, a, "js"))
    assert torch.all(kl_penalty(a, a, "js") == 0)


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k3")


def test_controller_measurement_sums_steps_then_averages_samples():
    log_prob = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    torch.testing.assert_close(sample_kl(log_prob, torch.zeros(2, 2)), torch.tensor([0.3, 0.3]))


def test_adaptive_update_by_hand():
    # beta * (1 + clip(kl/target - 1, ±0.2) * n / horizon), 256 samples, horizon 2000
    assert math.isclose(adaptive_kl_update(0.2, 1.1, 1.0, 256, 2000), 0.2 * (1 + 0.1 * 0.128))
    assert math.isclose(adaptive_kl_update(0.2, 5.0, 1.0, 256, 2000), 0.2 * (1 + 0.2 * 0.128))  # error clipped
    assert math.isclose(adaptive_kl_update(0.2, 0.0, 1.0, 256, 2000), 0.2 * (1 - 0.2 * 0.128))
    assert adaptive_kl_update(0.2, 1.0, 1.0, 256, 2000) == 0.2


def test_fixed_controller_never_moves_and_state_round_trips():
    fixed = KLController(0.2)
    fixed.update(100.0, 256)
    assert fixed.value == 0.2
    adaptive = KLController(0.2, target=1.0, horizon=2000)
    adaptive.update(2.0, 256)
    restored = KLController(0.2, target=1.0, horizon=2000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value == 0.2 * (1 + 0.2 * 0.128)


def test_gaussian_kl_same_std_is_the_closed_form():
    """Mean gap 0.3 at std 0.5: 0.3² / (2·0.25) = 0.18 per element; torch's Normal KL agrees elementwise."""
    mean = torch.full((2, 3, 4), 0.3)
    mean[1] = -0.1  # gap 0.1: 0.01 / 0.5 = 0.02
    std = torch.full_like(mean, 0.5)
    kl = gaussian_kl_same_std(mean, torch.zeros_like(mean), std)
    assert kl.shape == (2,) and torch.allclose(kl, torch.tensor([0.18, 0.02]))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, std))
    assert torch.allclose(kl, ref.mean(dim=(1, 2)))
