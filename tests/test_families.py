"""The model-family seam: `sd` reproduces today's sampler bit for bit; `flow` reproduces the diffusers
SD3/FLUX pipelines at noise level 0 and has an exact on-policy log-prob; LoRA round trips."""

from __future__ import annotations

import pytest
import torch

from rewardtune.config import FlowSamplingConfig
from rewardtune.diffusion import sample_trajectories
from rewardtune.families import PolicyFamily, make_family
from rewardtune.families.flow import FlowFamily, load_flow_pipeline
from rewardtune.families.rollout import sample_rollout
from rewardtune.families.sd import SDFamily
from rewardtune.models import load_pipeline
from rewardtune.tiny_flow import init_tiny_flow
from tests.conftest import tiny_config_dict

PROMPTS = ["a photo of a cat", "the dog"]


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family: init_tiny_flow(root / family, family) for family in ("sd3", "flux")}


def test_sd_family_reproduces_sample_trajectories_bit_for_bit(tiny_model_dir):
    from rewardtune.config import parse_config

    cfg = parse_config(tiny_config_dict(tiny_model_dir))
    pipe = load_pipeline(cfg.model)
    family = make_family(pipe, eta=1.0)
    assert isinstance(family, SDFamily) and isinstance(family, PolicyFamily)
    cond = family.encode(PROMPTS)
    kwargs = dict(num_steps=4, guidance_scale=5.0, resolution=32)
    old = sample_trajectories(pipe.unet, pipe.vae, pipe.scheduler, cond["embeds"], cond["negative_embeds"],
                              eta=1.0, generator=torch.Generator().manual_seed(7), **kwargs)
    new = sample_rollout(family, cond, generator=torch.Generator().manual_seed(7), **kwargs)
    for name in ("latents", "timesteps", "log_probs", "images"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
    assert new.stochastic.all()
    # the training-time recomputation through the seam gives the stored log-prob exactly (ratio 1)
    step = new.step(2)
    out = family.forward(new.latents[:, 2], step, cond, 5.0)
    _, log_prob = family.step_with_logprob(out, step, new.latents[:, 2], prev=new.latents[:, 3])
    assert torch.equal(log_prob, new.log_probs[:, 2])


def _pipeline_latents(family_name, pipe, latents, steps):
    kwargs = dict(num_inference_steps=steps, height=32, width=32, guidance_scale=4.5, max_sequence_length=16,
                  output_type="latent", latents=latents)
    return pipe(PROMPTS, **kwargs).images


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_sampler_at_noise_level_zero_reproduces_the_pipeline(flow_dirs, name):
    pipe = load_flow_pipeline(flow_dirs[name], name)
    pipe.set_progress_bar_config(disable=True)
    family = FlowFamily(pipe, noise_level=0.0, max_sequence_length=16)
    assert isinstance(family, PolicyFamily) and family.name == name
    cond = family.encode(PROMPTS)
    rollout = sample_rollout(family, cond, num_steps=4, guidance_scale=4.5, resolution=32,
                             generator=torch.Generator().manual_seed(3))
    want = _pipeline_latents(name, pipe, rollout.latents[:, 0].clone(), 4)
    assert torch.equal(rollout.latents[:, -1], want)
    assert not rollout.stochastic.any()
    assert rollout.sigmas[0, 0].item() == 1.0 and rollout.sigmas_next[0, -1].item() == 0.0
    assert rollout.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_rollout_log_probs_recompute_exactly(flow_dirs, name):
    pipe = load_flow_pipeline(flow_dirs[name], name)
    family = make_family(pipe, flow=FlowSamplingConfig(max_sequence_length=16))
    assert isinstance(family, FlowFamily) and family.noise_level == 0.7
    cond = family.encode(PROMPTS)
    clean = []
    rollout = sample_rollout(family, cond, num_steps=4, guidance_scale=4.5, resolution=32,
                             generator=torch.Generator().manual_seed(4),
                             after_model=lambda step, x, out: clean.append(family.predicted_clean(out, step, x)))
    assert len(clean) == 4 and clean[0].shape == rollout.latents[:, 0].shape
    # x0_hat = x_t - sigma v: at sigma = 1 it is x_T minus the velocity
    assert family.decode(clean[-1]).shape == rollout.images.shape
    assert rollout.stochastic.tolist() == [True, True, True, False]  # last step not trained by default
    assert torch.all(rollout.log_probs[:, -1] == 0)
    # shuffled per-sample steps: sample 0 at step 2, sample 1 at step 0; stored sigmas, not float matching
    k = torch.tensor([2, 0])
    rows = torch.arange(2)
    step = rollout.step(k)
    x, x_next = rollout.latents[rows, k], rollout.latents[rows, k + 1]
    out = family.forward(x, step, cond, 4.5)
    _, log_prob = family.step_with_logprob(out, step, x, prev=x_next)
    torch.testing.assert_close(log_prob, rollout.log_probs[rows, k], rtol=1e-5, atol=1e-5)


def test_sd3_loads_without_t5(flow_dirs):
    pipe = load_flow_pipeline(flow_dirs["sd3"], "sd3", with_t5=False)
    assert pipe.text_encoder_3 is None
    cond = FlowFamily(pipe, max_sequence_length=16).encode(PROMPTS)
    assert cond["embeds"].shape[-1] == pipe.transformer.config.joint_attention_dim


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_lora_round_trip_through_load_lora_weights(flow_dirs, name, tmp_path):
    pipe = load_flow_pipeline(flow_dirs[name], name)
    family = FlowFamily(pipe, max_sequence_length=16)
    params = family.add_lora(rank=2, alpha=None)
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    family.save_lora(tmp_path / "ckpt")
    cond = family.encode(PROMPTS)
    x = torch.randn(2, *((16, 64) if name == "flux" else (16, 8, 8)))
    step = family.steps(4, 32)[1]
    trained = family.forward(x, step, cond, 4.5)

    fresh = load_flow_pipeline(flow_dirs[name], name)
    base = FlowFamily(fresh, max_sequence_length=16)
    base.steps(4, 32)
    assert not torch.allclose(base.forward(x, step, cond, 4.5), trained)  # the adapters matter
    fresh.load_lora_weights(tmp_path / "ckpt")  # the diffusers user path
    loaded = FlowFamily(fresh, max_sequence_length=16)
    loaded.steps(4, 32)
    torch.testing.assert_close(loaded.forward(x, step, cond, 4.5), trained)

    again = FlowFamily(load_flow_pipeline(flow_dirs[name], name), max_sequence_length=16)
    again.add_lora(rank=2, alpha=None)
    again.load_lora(tmp_path / "ckpt")  # the resume path
    again.steps(4, 32)
    torch.testing.assert_close(again.forward(x, step, cond, 4.5), trained)


def test_cli_init_tiny_family(tmp_path, name="sd3"):  # flux goes through the same code (init_tiny_flow, fixture)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from tests.cli_runner import run_cli

    out = tmp_path / name
    result = run_cli(["init-tiny", "--family", name, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    cls = StableDiffusion3Pipeline if name == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor > 0
    refused = run_cli(["init-tiny", "--family", name, "--preset", "sd15", "--out", str(tmp_path / "x")])
    assert refused.returncode == 2 and "only for --family sd" in refused.stderr


def test_flux_without_distilled_guidance_reproduces_true_cfg():
    from diffusers import FluxTransformer2DModel

    from rewardtune.tiny_flow import build_flux

    pipe = build_flux(seed=1)
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.eval()  # built in memory, not through from_pretrained
    pipe.set_progress_bar_config(disable=True)
    family = FlowFamily(pipe, noise_level=0.0, max_sequence_length=16)
    cond = family.encode(PROMPTS)
    assert "negative_embeds" in cond
    rollout = sample_rollout(family, cond, num_steps=3, guidance_scale=4.5, resolution=32,
                             generator=torch.Generator().manual_seed(2))
    want = pipe(PROMPTS, negative_prompt=[""] * 2, true_cfg_scale=4.5, num_inference_steps=3, height=32, width=32,
                max_sequence_length=16, output_type="latent", latents=rollout.latents[:, 0].clone()).images
    assert torch.equal(rollout.latents[:, -1], want)


def test_flow_window_and_cps_through_the_family(flow_dirs):
    pipe = load_flow_pipeline(flow_dirs["sd3"], "sd3")
    flow = FlowSamplingConfig(sde_type="cps", sde_window={"start": 1, "size": 2}, max_sequence_length=16)
    family = make_family(pipe, flow=flow)
    cond = family.encode(PROMPTS)
    rollout = sample_rollout(family, cond, num_steps=4, guidance_scale=4.5, resolution=32,
                             generator=torch.Generator().manual_seed(5))
    assert rollout.stochastic.tolist() == [False, True, True, False]
    assert torch.all(rollout.log_probs[:, [0, 3]] == 0) and torch.all(rollout.log_probs[:, [1, 2]] != 0)
    step = rollout.step(0)  # an ODE step: exactly x + v dt
    out = family.forward(rollout.latents[:, 0], step, cond, 4.5)
    x_next, log_prob = family.step_with_logprob(out, step, rollout.latents[:, 0])
    assert log_prob is None and torch.equal(x_next, rollout.latents[:, 1])


def test_rollout_step_reads_stored_inputs_and_refuses_mixed_batches():
    from rewardtune.families import Rollout

    b, k = 2, 3
    rollout = Rollout(
        latents=torch.zeros(b, k + 1, 1), timesteps=torch.tensor([[900.0, 500.0, 100.0]] * b),
        log_probs=torch.zeros(b, k), stochastic=torch.tensor([True, True, False]), conditioning={},
        images=torch.zeros(b, 3, 1, 1), sigmas=torch.tensor([[0.9, 0.5, 0.1]] * b),
        sigmas_next=torch.tensor([[0.5, 0.1, 0.0]] * b),
    )
    step = rollout.step(torch.tensor([1, 0]))  # per-sample (shuffled) steps
    assert torch.equal(step.sigma, torch.tensor([0.5, 0.9])) and torch.equal(step.sigma_next, torch.tensor([0.1, 0.5]))
    assert step.stochastic and torch.equal(step.timestep, torch.tensor([500.0, 900.0]))
    assert rollout.step(2).stochastic is False
    with pytest.raises(ValueError, match="mixes SDE and ODE"):
        rollout.step(torch.tensor([2, 0]))


def test_sd35m_shapes_match_the_published_weights():
    """The random-weight timing preset has SD3.5-Medium's sizes. Published bf16/fp16 weight files of
    stabilityai/stable-diffusion-3.5-medium: transformer 4.94 GB (incl. the 384x384 positional-embedding
    buffer), CLIP-L 247 MB, CLIP-G 1.39 GB, T5-XXL encoder 9.52 GB, i.e. 2 bytes per element."""
    from rewardtune.tiny_flow import build_sd35m

    with torch.device("meta"):
        pipe = build_sd35m()

    def stored_gb(module: torch.nn.Module) -> float:  # tied weights once, persistent buffers included
        params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
        buffers = sum(t.numel() for name, t in module.state_dict().items() if name not in params)
        return (sum(p.numel() for p in module.parameters()) + buffers) * 2 / 1e9

    size_gb = {name: stored_gb(getattr(pipe, name)) for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    published = {"transformer": 4.94, "text_encoder": 0.247, "text_encoder_2": 1.39, "text_encoder_3": 9.52}
    for name, gb in published.items():
        assert size_gb[name] == pytest.approx(gb, rel=0.01), name
    assert pipe.transformer.config.dual_attention_layers == tuple(range(13))
