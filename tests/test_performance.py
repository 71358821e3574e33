"""Speed switches keep the math: log-probs, losses and gradients unchanged (to dtype rounding), the
on-policy ratio still exactly 1; and the cost model counts what torch's FlopCounterMode counts."""

import pytest
import torch

from rewardtune import cost_model as cm
from rewardtune.config import parse_config
from rewardtune.diffusion import PromptEmbeddingCache, ddim_step_with_logprob, encode_prompts
from rewardtune.trainer import EpochTimes, Trainer
from tests.conftest import tiny_config_dict

COMMON = ["model.finetune=lora", "sampling.batches_per_epoch=1", "training.gradient_accumulation_steps=1",
          "sampling.num_steps=4", "training.batch_size=4"]
BASELINE = ["performance.cache_prompt_embeds=false", "performance.sync_free_steps=false"]


def _trainer(model_dir, out, overrides=()):
    return Trainer(parse_config(tiny_config_dict(model_dir), [*COMMON, *overrides]), out)


def _one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Sample an epoch, check the on-policy ratio is exactly 1, then the loss and LoRA gradients of one chunk."""
    samples = trainer.sample_epoch(0, EpochTimes())
    trainer.compute_advantages(samples)
    batch = {name: getattr(samples, name) for name in ("latents", "next_latents", "timesteps", "prompt_embeds", "negative_embeds")}
    trainer.unet.train()
    with torch.no_grad():
        for j in range(samples.timesteps.shape[1]):
            log_prob = trainer.policy_log_prob(batch, slice(0, len(samples)), j)
            assert torch.equal(torch.exp(log_prob - samples.log_probs[:, j]), torch.ones(len(samples)))
    log_prob = trainer.policy_log_prob(batch, slice(0, len(samples)), 1)
    loss = -(log_prob * samples.advantages[:, 1]).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.trainable])
    return {"log_probs": samples.log_probs, "latents": samples.latents, "loss": loss.detach(), "grads": grads}


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    return _one_step(_trainer(tiny_model_dir, tmp_path_factory.mktemp("base"), BASELINE))


def _assert_same_math(result: dict, baseline: dict, what: str) -> None:
    # latents reach |x| ~ 25 after the steps: float32 rounding of a different kernel order is ~1e-5 absolute there
    torch.testing.assert_close(result["latents"], baseline["latents"], rtol=1e-5, atol=1e-4, msg=f"{what}: latents")
    for name in ("log_probs", "loss"):
        torch.testing.assert_close(result[name], baseline[name], rtol=1e-5, atol=1e-5, msg=f"{what}: {name}")
    torch.testing.assert_close(result["grads"], baseline["grads"], rtol=1e-3, atol=1e-6, msg=f"{what}: grads")


@pytest.mark.parametrize(("switch", "bit_identical"), [
    ("performance.channels_last=true", False),
    ("performance.attention=sdpa", True),  # diffusers' default processor on torch >= 2 is already SDPA
    ("performance.attention=eager", False),
    ("performance.cache_prompt_embeds=true", False),
    ("performance.sync_free_steps=true", True),  # only a check and a copy move out of the loop
])
def test_speed_switch_keeps_log_probs_losses_and_gradients(switch, bit_identical, baseline, tiny_model_dir, tmp_path):
    result = _one_step(_trainer(tiny_model_dir, tmp_path, [*BASELINE, switch]))
    _assert_same_math(result, baseline, switch)
    if bit_identical:
        assert all(torch.equal(result[k], baseline[k]) for k in baseline), switch


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo's graph capture and AOTAutograd's joint graph, eager kernels: in make test
    pytest.param("inductor", marks=pytest.mark.slow),  # + generated kernels: 23 min on 2 loaded cores (RESULTS.md)
])
def test_compiled_unet_keeps_the_math(backend, baseline, tiny_model_dir, tmp_path):
    """One compiled UNet samples and trains: on-policy ratio exactly 1 (checked in _one_step), the rest to rounding."""
    overrides = [*BASELINE, "performance.compile=true", f"performance.compile_backend={backend}"]
    _assert_same_math(_one_step(_trainer(tiny_model_dir, tmp_path, overrides)), baseline, f"compile ({backend})")


def test_sync_free_sampling_still_refuses_a_zero_std_schedule():
    from diffusers import DDIMScheduler

    from rewardtune.diffusion import check_schedule
    from rewardtune.tiny import sd_scheduler

    s = DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=True)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="std 0"):
        check_schedule(s, 1.0, torch.device("cpu"), (1, 4, 2, 2))
    # the unchecked step itself no longer syncs to look
    ddim_step_with_logprob(s, torch.zeros(1, 4, 2, 2), s.timesteps[-2], torch.zeros(1, 4, 2, 2), check_std=False)


def test_prompt_cache_encodes_each_prompt_once(tiny_model_dir):
    from rewardtune.config import ModelConfig
    from rewardtune.models import load_pipeline

    pipe = load_pipeline(ModelConfig(source=str(tiny_model_dir)))
    calls = []
    encoder = pipe.text_encoder

    def counting(ids):
        calls.append(ids.shape[0])
        return encoder(ids)

    counting.device = encoder.device
    cache = PromptEmbeddingCache(pipe.tokenizer, counting)
    first = cache(["a cat", "a dog", "a cat"])
    second = cache(["a dog", "a cow"])
    assert calls == [2, 1]  # distinct new prompts only
    direct = encode_prompts(pipe.tokenizer, encoder, ["a cat", "a dog", "a cat", "a cow"])
    torch.testing.assert_close(torch.cat([first, second[1:]]), direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second[0], direct[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ cost model vs FlopCounterMode
def _counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers.models.attention_processor import AttnProcessor

    from rewardtune.tiny import build_pipeline

    pipe = build_pipeline("tiny")
    # FlopCounterMode does not count the CPU's fused SDPA kernel; the eager processor's matmuls it does
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    return pipe


def test_unet_forward_flops_match_the_flop_counter(tiny_pipe):
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 1]), torch.randn(3, 77, 32)
    with torch.no_grad():
        counted = _counted(lambda: tiny_pipe.unet(x, t, encoder_hidden_states=ctx))
    assert cm.forward_cost(cm.unet_ops(tiny_pipe.unet.config, 3, 8, 8, 77), 4).flops == counted


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_unet_training_flops_match_the_flop_counter(finetune):
    """Forward + backward, with autograd's input/weight gradient pruning (frozen layers, text context)."""
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig

    from rewardtune.tiny import build_pipeline

    unet = build_pipeline("tiny").unet
    if finetune == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(cm.LORA_TARGETS)))
    unet.set_attn_processor(AttnProcessor())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 1]), torch.randn(2, 77, 32)
    counted = _counted(lambda: unet(x, t, encoder_hidden_states=ctx).sample.sum().backward())
    assert cm.train_cost(cm.unet_ops(unet.config, 2, 8, 8, 77, train=finetune), 4).flops == counted


def test_vae_decode_and_clip_tower_flops_match_the_flop_counter(tiny_pipe):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.no_grad():
        counted = _counted(lambda: tiny_pipe.vae.decode(torch.randn(2, 4, 8, 8)))
    assert cm.forward_cost(cm.vae_decoder_ops(tiny_pipe.vae.config, 2, 8, 8), 4).flops == counted
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    tower = CLIPVisionModelWithProjection._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        counted = _counted(lambda: tower(pixel_values=torch.randn(3, 3, 32, 32)))
    assert cm.forward_cost(cm.clip_tower_ops(config.to_dict(), 3, projection_dim=16), 4).flops == counted
    tiny_pipe.text_encoder.set_attn_implementation("eager")
    with torch.no_grad():
        counted = _counted(lambda: tiny_pipe.text_encoder(torch.randint(0, 100, (2, 77))))
    assert cm.forward_cost(cm.clip_tower_ops(tiny_pipe.text_encoder.config.to_dict(), 2, tokens=77), 4).flops == counted


def test_sd15_unet_flops_match_the_flop_counter_on_meta_tensors():
    """The full-size shapes, counted without memory or compute on the meta device."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from rewardtune.tiny import PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **PRESETS["sd15"]["unet"])
        x, t, ctx = torch.empty(2, 4, 64, 64), torch.empty(2, dtype=torch.long), torch.empty(2, 77, 768)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        counted = _counted(lambda: unet(x, t, encoder_hidden_states=ctx))
    assert cm.forward_cost(cm.unet_ops(unet.config, 2, 64, 64, 77), 2).flops == counted


def test_epoch_cost_scales_with_counts_and_roofline_takes_the_slower_bound():
    from rewardtune.tiny import PRESETS

    unet = {**PRESETS["tiny"]["unet"], "in_channels": 4, "out_channels": 4}
    vae = {**PRESETS["tiny"]["vae"], "latent_channels": 4, "out_channels": 3}
    shape = cm.EpochShape(images=8, sample_batch=4, steps=5, trained_steps=5, guidance=True, latent_size=8, train_batch=4)
    phases = cm.epoch_cost(shape, unet, vae)
    one_call = cm.forward_cost(cm.unet_ops(unet, 8, 8, 8, 77), 2)
    assert phases["sampling_unet"].flops == pytest.approx(one_call.flops * 5 * 2)  # 5 steps x 2 batches
    doubled = cm.epoch_cost(cm.EpochShape(**{**shape.__dict__, "images": 16}), unet, vae)
    assert doubled["training"].flops == pytest.approx(2 * phases["training"].flops)
    assert phases["critic_decode_embed"].flops == 0
    assert cm.roofline_seconds(cm.Cost(10.0, 4.0), 5.0, 1.0) == 4.0
    assert cm.roofline_seconds(cm.Cost(10.0, 4.0), 1.0, 1.0) == 10.0


def test_critic_inputs_embedded_in_the_reward_thread_are_bit_identical(tiny_model_dir, tiny_rewards, tmp_path):
    """`performance.overlap_critic_inputs`: the same critic inputs and old values as the in-loop hook (the
    trajectory's stored x_t, decoded one step at a time at the batch's shape), every sample and step."""
    tdpo = ["algorithm.name=tdpo", "reward.name=aesthetic", f"reward.source={tiny_rewards['aesthetic']}",
            "algorithm.critic.input_stride=2", "sampling.batches_per_epoch=2"]
    epochs = {}
    for overlap in (False, True):
        trainer = _trainer(tiny_model_dir, tmp_path / str(overlap), [*tdpo, f"performance.overlap_critic_inputs={overlap}"])
        assert trainer.rollout.overlaps_critic_inputs is overlap
        epochs[overlap] = trainer.sample_epoch(0, EpochTimes())
    for name in ("critic_inputs", "old_values"):
        assert torch.equal(epochs[True].extras[name], epochs[False].extras[name]), name
    assert torch.equal(epochs[True].latents, epochs[False].latents)
