"""The flow SDE with log-prob (rewardtune.flow_sde): Flow-GRPO's formulation, checked against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rewardtune.flow_sde import euler_step, flow_posterior, flow_step_with_logprob, sde_steps

# SD3's schedule at K = 10 (FlowMatchEulerDiscreteScheduler, shift 3), sigma = 1 first and sigma' = 0 last.
SD3_SIGMAS_K10 = [1.0, 0.9601293206214905, 0.9133489727973938, 0.857692301273346, 0.7903682589530945,
                  0.7072784900665283, 0.602150559425354, 0.4648760259151459, 0.2780487835407257,
                  0.008928571827709675, 0.0]
# Golden values, computed once in float64 from the published formula (issue 18, item 2) with a = 0.7 for the
# scalar state x = 0.3, velocity v = -0.8 and next state x' = 0.1: (mean, std, log N(x'; mean, std^2)) per step.
GOLDEN = [
    (0.25839654350280766, 0.7, -0.5878650841574065),
    (0.2603555294919151, 0.7429640699065426, -0.645122697226664),
    (0.3082243868675672, 0.5361522956111563, -0.3710163545460615),
    (0.3322827896453477, 0.4458971435587979, -0.2469574505951715),
    (0.3536249035280322, 0.3917942340040669, -0.19144594233996437),
    (0.378310647106786, 0.35279709853018254, -0.18823339820944351),
    (0.4113648914517446, 0.31907016690609363, -0.25273672597183927),
    (0.4604189595380659, 0.2820067558568613, -0.4698212037348479),
    (0.5406452929801291, 0.22536048640830397, -1.340465655095929),
    (0.308230695348369, 0.006278090311090728, -545.90105636801),
]


def test_sd3_schedule_is_the_fixtures_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    assert scheduler.sigmas.double().tolist() == pytest.approx(SD3_SIGMAS_K10, abs=1e-7)


@pytest.mark.parametrize("k", range(10))
def test_golden_values_at_every_step_of_an_sd3_schedule(k):
    x, v, x_next = torch.full((1, 2, 2), 0.3), torch.full((1, 2, 2), -0.8), torch.full((1, 2, 2), 0.1)
    sigma, sigma_next = SD3_SIGMAS_K10[k], SD3_SIGMAS_K10[k + 1]
    mean, std = flow_posterior(v, x, sigma, sigma_next, noise_level=0.7)
    _, log_prob = flow_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=x_next)
    want_mean, want_std, want_lp = GOLDEN[k]
    assert mean.flatten()[0].item() == pytest.approx(want_mean, rel=1e-5)
    assert std.flatten()[0].item() == pytest.approx(want_std, rel=1e-5)
    assert log_prob.item() == pytest.approx(want_lp, rel=1e-4)


def test_sigma_one_uses_the_next_sigma_in_the_denominator():
    # g = a sqrt(1 / (1 - sigma')), std = g sqrt(sigma - sigma') = a exactly when sigma = 1
    _, std = flow_posterior(torch.zeros(1, 3), torch.zeros(1, 3), 1.0, 0.75, noise_level=0.7)
    assert std.item() == pytest.approx(0.7, rel=1e-6)


def test_log_prob_is_the_normal_log_density_averaged_over_non_batch_dims():
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    mean, std = flow_posterior(v, x, sigma, sigma_next, 0.7)
    _, log_prob = flow_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=x_next)
    want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, want)


def test_cps_log_prob_and_moments():
    g = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    sigma, sigma_next, a = 0.6, 0.4, 0.7
    mean, std = flow_posterior(v, x, sigma, sigma_next, a, sde_type="cps")
    want_std = 0.4 * math.sin(0.7 * math.pi / 2)
    x0, x1 = x - 0.6 * v, x + 0.4 * v
    torch.testing.assert_close(mean, x0 * 0.6 + x1 * math.sqrt(0.4**2 - want_std**2))
    assert std.flatten()[0].item() == pytest.approx(want_std, rel=1e-6)
    _, log_prob = flow_step_with_logprob(v, x, sigma, sigma_next, a, "cps", prev_sample=x_next)
    want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2))
    torch.testing.assert_close(log_prob, want)


def test_vanishing_noise_level_gives_the_euler_step_exactly():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for sigma, sigma_next in zip(SD3_SIGMAS_K10[:-1], SD3_SIGMAS_K10[1:], strict=True):
        mean, _ = flow_posterior(v, x, sigma, sigma_next, noise_level=1e-20)
        assert torch.equal(mean, euler_step(v, x, sigma, sigma_next))
        assert torch.equal(euler_step(v, x, sigma, sigma_next), x + v * (sigma_next - sigma))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sigma=0.5, sigma_next=0.2, noise_level=0.0), "a <= 0"),
        (dict(sigma=0.5, sigma_next=0.2, noise_level=-0.1), "a <= 0"),
        (dict(sigma=0.5, sigma_next=0.0, noise_level=0.7, sde_type="cps"), "std 0"),
        (dict(sigma=0.5, sigma_next=0.5, noise_level=0.7), "denoising step"),
        (dict(sigma=0.5, sigma_next=0.2, noise_level=0.7, sde_type="ode"), "sde_type"),
    ],
)
def test_refuses_steps_without_a_density(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_posterior(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)


def test_on_policy_ratio_is_exactly_one():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    for sde_type in ("sde", "cps"):
        x_next, old = flow_step_with_logprob(v, x, 0.7, 0.6, 0.7, sde_type, generator=g)
        _, new = flow_step_with_logprob(v, x, 0.7, 0.6, 0.7, sde_type, prev_sample=x_next)
        assert torch.equal(torch.exp(new - old), torch.ones(4))


def test_log_probs_invariant_to_per_sample_time_shuffling():
    g = torch.Generator().manual_seed(4)
    sig = torch.tensor(SD3_SIGMAS_K10)
    n, k = 3, 9
    x, v, x_next = (torch.randn(n, k, 2, 4, 4, generator=g) for _ in range(3))
    columns = [flow_step_with_logprob(v[:, j], x[:, j], sig[j], sig[j + 1], 0.7, prev_sample=x_next[:, j])[1]
               for j in range(k)]
    reference = torch.stack(columns, dim=1)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])
    rows = torch.arange(n)[:, None]
    for j in range(k):  # column j of the shuffled batch holds each sample's own step perm[:, j]
        steps = perm[:, j]
        _, shuffled = flow_step_with_logprob(
            v[rows[:, 0], steps], x[rows[:, 0], steps], sig[steps], sig[steps + 1], 0.7,
            prev_sample=x_next[rows[:, 0], steps],
        )
        torch.testing.assert_close(shuffled, reference[rows[:, 0], steps], rtol=0, atol=0)


def _end_std(steps: int, s0: float, sde: bool) -> float:
    """Exact std of x_0 after the discrete chain, for data x0 ~ N(0, s0^2) and the exact velocity.

    Marginal std m(sigma) = sqrt((1-sigma)^2 s0^2 + sigma^2); the exact velocity is linear,
    v = c(sigma) x with c = (sigma - (1 - sigma) s0^2) / m^2, so every step maps x to mean_coef x + std noise
    and the variance propagates exactly: var' = mean_coef^2 var + std^2 (no Monte-Carlo noise). The
    coefficients come from `flow_posterior` itself (mean at x = 1, v = c).
    """
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    var = torch.tensor(1.0, dtype=torch.float64)
    one = torch.ones(1, 1)
    for k in range(steps):
        s, s_next = sigmas[k].item(), sigmas[k + 1].item()
        c = (s - (1 - s) * s0**2) / ((1 - s) ** 2 * s0**2 + s**2)
        if sde and k < steps - 1:  # the last step is an ODE step by default
            mean, std = flow_posterior(c * one, one, s, s_next, 0.7)
            var = mean.double().squeeze() ** 2 * var + std.double().squeeze() ** 2
        else:
            var = euler_step(c * one, one, s, s_next).double().squeeze() ** 2 * var
    return var.sqrt().item()


@pytest.mark.parametrize("steps", [200, 1000])
def test_sde_marginal_std_matches_the_ode_on_a_gaussian_target(steps):
    s0 = 0.5
    sde, ode = _end_std(steps, s0, sde=True), _end_std(steps, s0, sde=False)
    assert abs(sde - ode) < 0.01
    assert abs(ode - s0) < 0.01


def test_sde_marginal_error_shrinks_with_more_steps():
    gaps = [abs(_end_std(n, 0.5, True) - _end_std(n, 0.5, False)) for n in (50, 200, 800)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_sde_samples_follow_the_propagated_std():
    # Monte-Carlo check of the same chain through flow_step_with_logprob's own noise
    s0, steps, n = 0.5, 100, 10000
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, generator=g)
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        v = x * (s - (1 - s) * s0**2) / ((1 - s) ** 2 * s0**2 + s**2)
        x = flow_step_with_logprob(v, x, s, s_next, 0.7, generator=g)[0] if k < steps - 1 else euler_step(v, x, s, s_next)
    assert abs(x.std().item() - _end_std(steps, s0, sde=True)) < 4 * s0 / math.sqrt(2 * n)


def test_sde_steps_window_and_last_step():
    assert sde_steps(4) == [True, True, True, False]
    assert sde_steps(4, train_last_step=True) == [True] * 4
    assert sde_steps(10, window=(2, 3)) == [False, False, True, True, True] + [False] * 5
    with pytest.raises(ValueError, match="window"):
        sde_steps(10, window=(8, 2))
    with pytest.raises(ValueError, match="at least 2"):
        sde_steps(1)
