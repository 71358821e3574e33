"""The DDIM log-prob step against hand formulas, torch.distributions and diffusers' own step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rewardtune.diffusion import ddim_step_with_logprob
from rewardtune.tiny import sd_scheduler


@pytest.fixture
def scheduler() -> DDIMScheduler:
    s = sd_scheduler()
    s.set_timesteps(10)
    return s


def test_log_prob_matches_hand_formula_and_normal(scheduler):
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = int(scheduler.timesteps[3])
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(1))

    a_t = scheduler.alphas_cumprod[t].item()
    a_prev = scheduler.alphas_cumprod[t - 100].item()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    hand = (-((prev - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    normal = torch.distributions.Normal(mu, sigma).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob, normal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 4, 9])
def test_prev_sample_equals_diffusers_step_with_same_noise(scheduler, step):
    torch.manual_seed(step)
    x_t, eps, noise = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    t = scheduler.timesteps[step]
    ours, _ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_equal_scalar_steps(scheduler):
    torch.manual_seed(3)
    x_t, eps, prev = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ts = scheduler.timesteps[[0, 5, 9]]
    _, batched = ddim_step_with_logprob(scheduler, eps, ts, x_t, prev_sample=prev)
    single = torch.cat([ddim_step_with_logprob(scheduler, eps[i : i + 1], ts[i], x_t[i : i + 1], prev_sample=prev[i : i + 1])[1] for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_log_prob_is_differentiable_wrt_model_output(scheduler):
    eps = torch.randn(1, 4, 2, 2, requires_grad=True)
    x_t, prev = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, scheduler.timesteps[2], x_t, prev_sample=prev)
    log_prob.sum().backward()
    assert eps.grad is not None and torch.isfinite(eps.grad).all() and eps.grad.abs().sum() > 0


def test_zero_eta_is_refused(scheduler):
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 2, 2), scheduler.timesteps[0], torch.zeros(1, 4, 2, 2), eta=0.0)


def test_zero_std_last_step_is_refused():
    s = DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=True)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="std 0"):
        ddim_step_with_logprob(s, torch.zeros(1, 4, 2, 2), s.timesteps[-1], torch.zeros(1, 4, 2, 2))


def test_guided_noise_pred_gives_the_unet_embeddings_in_the_latents_dtype():
    """Full fine-tune with `model.dtype: float16`: half embeddings from the frozen text encoder, float32 UNet.
    A UNet returning x + mean(embeddings): eps_u = 0 (zero negative), eps_c = 2, so 0 + 3 (2 − 0) = 6."""
    from types import SimpleNamespace

    from rewardtune.diffusion import guided_noise_pred

    seen = []

    class Unet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen.append(encoder_hidden_states.dtype)
            return SimpleNamespace(sample=x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))

    x = torch.zeros(1, 4, 2, 2)
    cond, negative = torch.full((1, 3, 8), 2.0, dtype=torch.float16), torch.zeros(1, 3, 8, dtype=torch.float16)
    out = guided_noise_pred(Unet(), x, torch.tensor(5), cond, negative, 3.0)
    assert seen == [torch.float32] and torch.equal(out, torch.full_like(x, 6.0))
