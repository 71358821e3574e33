"""Reward models: the real loaders on tiny stand-ins of the real architecture classes."""

from __future__ import annotations

import shutil

import pytest
import torch

from rewardtune.config import RewardSpec
from rewardtune.errors import RewardError
from rewardtune.rewards import build_reward, critic_tower_source, reward_model_refs

LEARNED = ["aesthetic", "pickscore", "clipscore", "hpsv2", "imagereward"]
PROMPTS = ["a photo of a cat", "a dog", "the horse in a painting"]


def _images(seed: int = 0, n: int = 3, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tiny_rewards):
    return {name: build_reward(RewardSpec(name=name, source=tiny_rewards[name]), "cpu") for name in LEARNED}


@pytest.mark.parametrize("name", LEARNED)
def test_tiny_reward_deterministic_and_batched_equals_single(built, tiny_rewards, name):
    reward = built[name]
    images = _images()
    batched = reward(images, PROMPTS)
    assert batched.shape == (3,) and batched.dtype == torch.float32 and torch.isfinite(batched).all()
    assert not batched.requires_grad
    torch.testing.assert_close(reward(images, PROMPTS), batched, rtol=0, atol=0)
    single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-5)
    rebuilt = build_reward(RewardSpec(name=name, source=tiny_rewards[name]), "cpu")
    torch.testing.assert_close(rebuilt(images, PROMPTS), batched, rtol=0, atol=0)


def test_scores_depend_on_image_and_prompt(built):
    images = _images()
    for name in ("pickscore", "hpsv2", "imagereward"):
        a = built[name](images, PROMPTS)
        assert not torch.allclose(a, built[name](images, PROMPTS[::-1])), name
    a = built["aesthetic"](images, PROMPTS)
    assert not torch.allclose(a, built["aesthetic"](_images(1), PROMPTS))


def test_pickscore_and_clipscore_formulas(built):
    images = _images()
    pick = built["pickscore"]
    cos = pick.cosine(images, PROMPTS)
    assert cos.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(pick(images, PROMPTS), pick.model.logit_scale.exp() * cos)
    clip = built["clipscore"]
    torch.testing.assert_close(clip(images, PROMPTS), 100.0 * clip.cosine(images, PROMPTS).clamp(min=0))


def test_jpeg_ranks_noise_above_flat():
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([noise, flat])
    incompressible = build_reward(RewardSpec(name="jpeg_incompressibility"))(images, ["x", "y"])
    compressible = build_reward(RewardSpec(name="jpeg_compressibility"))(images, ["x", "y"])
    assert incompressible[0] > incompressible[1] > 0
    assert compressible[0] < compressible[1] < 0


def _official_imagereward_keys(depth_v: int, depth_t: int) -> list[str]:
    """The key names of the official ImageReward.pt (timm ViT + BLIP med BERT + MLP), written out by hand."""
    keys = ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
            "blip.visual_encoder.patch_embed.proj.bias", "blip.visual_encoder.norm.weight", "blip.visual_encoder.norm.bias"]
    for i in range(depth_v):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blip.visual_encoder.blocks.{i}.{part}.{p}" for p in ("weight", "bias")]
    t = "blip.text_encoder."
    keys += [t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
             t + "embeddings.LayerNorm.weight", t + "embeddings.LayerNorm.bias", t + "embeddings.position_ids"]
    for i in range(depth_t):
        for att in ("attention", "crossattention"):
            for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{t}encoder.layer.{i}.{att}.{part}.{p}" for p in ("weight", "bias")]
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{t}encoder.layer.{i}.{part}.{p}" for p in ("weight", "bias")]
    keys += [f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    keys += ["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"]
    return keys


def test_imagereward_key_mapping_loads_official_names_strictly():
    from rewardtune.rewards.imagereward import ImageRewardModel, map_official_keys, text_config
    from rewardtune.rewards.tiny import TINY_BLIP_VISION

    med = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=40, encoder_width=32)
    model = ImageRewardModel(TINY_BLIP_VISION, text_config(med))
    target = model.state_dict()
    official = _official_imagereward_keys(2, 2)
    mapped_names = map_official_keys({k: torch.zeros(1) for k in official})
    assert set(mapped_names) == set(target)  # every official weight has a home, every model weight a source
    synthetic = {}
    for key in official:  # official names, values shaped like the model's, all distinct
        mapped = next(iter(map_official_keys({key: torch.zeros(1)})), None)
        synthetic[key] = torch.randn(target[mapped].shape) if mapped else torch.zeros(3)
    fresh = ImageRewardModel(TINY_BLIP_VISION, text_config(med))
    fresh.load_state_dict(map_official_keys(synthetic), strict=True)
    assert torch.equal(fresh.vision.embeddings.class_embedding, synthetic["blip.visual_encoder.cls_token"])
    assert torch.equal(fresh.vision.encoder.layers[1].self_attn.projection.weight,
                       synthetic["blip.visual_encoder.blocks.1.attn.proj.weight"])
    assert torch.equal(fresh.text.encoder.layer[0].crossattention.self.key.weight,
                       synthetic["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    with pytest.raises(RewardError, match="unexpected key 'blip.mystery"):
        map_official_keys({"blip.mystery.weight": torch.zeros(1)})


def test_hps_loader_accepts_state_dict_layout(tiny_rewards, tmp_path):
    from rewardtune.rewards.open_clip_files import load_hps_state, load_open_clip

    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    original = torch.load(f"{tiny_rewards['hpsv2']}/HPS_v2.1_compressed.pt", weights_only=True)
    assert set(original) == {"state_dict"}
    state = original["state_dict"]
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, ckpt)  # DDP-saved variant
    loaded = load_hps_state(ckpt)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    shutil.copy(f"{tiny_rewards['hpsv2']}/open_clip_model.json", tmp_path)
    model, _ = load_open_clip(tmp_path, {}, torch.device("cpu"), torch.float32)
    assert torch.equal(model.logit_scale, state["logit_scale"])


def test_aesthetic_loads_official_pth_layout(tmp_path):
    from collections import OrderedDict

    from rewardtune.rewards.aesthetic import load_head

    dims = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = OrderedDict()
    for idx, (out, inp) in zip((0, 2, 4, 6, 7), dims, strict=True):
        state[f"layers.{idx}.weight"] = torch.randn(out, inp) * 0.01
        state[f"layers.{idx}.bias"] = torch.randn(out) * 0.01
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    head = load_head(path, torch.device("cpu"))
    x = torch.nn.functional.normalize(torch.randn(2, 768), dim=-1)
    expected = x
    for idx in (0, 2, 4, 6, 7):
        expected = expected @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(head(x), expected)


class _NotWeights:
    pass


def test_untrusted_pickle_is_refused(tmp_path):
    from rewardtune.rewards.aesthetic import load_head

    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": _NotWeights()}, path)
    with pytest.raises(RewardError, match="weights-only"):
        load_head(path, torch.device("cpu"))


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_critic_tower_api(tiny_rewards, name):
    from rewardtune.rewards.towers import load_clip_image_tower

    spec = RewardSpec(name=name, source=tiny_rewards[name])
    source = critic_tower_source(spec)
    assert source is not None
    tower = load_clip_image_tower(source, "cpu")
    emb = tower.embed(_images(h=64, w=64))
    assert emb.shape == (3, tower.dim) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_aesthetic_uses_the_shared_tower(built, tiny_rewards):
    from rewardtune.rewards.towers import ClipImageTower, load_clip_image_tower

    reward = built["aesthetic"]
    assert isinstance(reward.tower, ClipImageTower)
    tower = load_clip_image_tower(critic_tower_source(RewardSpec(name="aesthetic", source=tiny_rewards["aesthetic"])), "cpu")
    images = _images()
    torch.testing.assert_close(reward.head(tower.embed(images)).squeeze(-1), reward(images, PROMPTS))


def test_default_sources_and_towers():
    assert critic_tower_source(RewardSpec(name="aesthetic")) == "openai/clip-vit-large-patch14"
    assert critic_tower_source(RewardSpec(name="imagereward")) == "openai/clip-vit-large-patch14"
    assert critic_tower_source(RewardSpec(name="pickscore")) == "yuvalkirstain/PickScore_v1"
    assert critic_tower_source(RewardSpec(name="hpsv2")) == "xswu/HPSv2"
    assert critic_tower_source(RewardSpec(name="jpeg_compressibility")) is None
    refs = {r.source: r for r in reward_model_refs(RewardSpec(name="hpsv2"))}
    assert refs["xswu/HPSv2"].files == ("HPS_v2.1_compressed.pt",)
    assert {r.source for r in reward_model_refs(RewardSpec(name="imagereward"))} == {"THUDM/ImageReward", "bert-base-uncased"}
    assert reward_model_refs(RewardSpec(name="jpeg_compressibility")) == []


def test_bfloat16_reward_runs(tiny_rewards):
    reward = build_reward(RewardSpec(name="aesthetic", source=tiny_rewards["aesthetic"], options={"dtype": "bfloat16"}), "cpu")
    assert reward.tower.module.dtype == torch.bfloat16
    out = reward(_images(), PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_misspelled_reward_option_is_a_config_error(tiny_model_dir):
    from rewardtune.config import parse_config
    from rewardtune.errors import ConfigError
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(tiny_model_dir, reward={"name": "aesthetic", "options": {"clip_sorce": "x"}})
    with pytest.raises(ConfigError, match=r"reward.*no option 'clip_sorce' \(did you mean 'clip_source'\?\)"):
        parse_config(data)
    data = tiny_config_dict(tiny_model_dir, reward={"name": "clipscore", "options": {"w": 2.5}})
    assert parse_config(data).reward.options == {"w": 2.5}


def test_cli_init_tiny_rewards_out(tiny_rewards, capsys):
    from pathlib import Path

    from rewardtune.cli import main

    parent = Path(tiny_rewards["aesthetic"]).parent
    assert main(["init-tiny", "--rewards-out", str(parent)]) == 0  # existing models are kept, not rebuilt
    out = capsys.readouterr().out
    assert all(f"tiny reward {name}: source {parent / name}" in out for name in LEARNED)


@pytest.fixture(scope="module")
def hps_both_versions(tiny_rewards, tmp_path_factory):
    """A source holding both HPS checkpoints (v2.1 = the tiny stand-in, v2.0 = other weights), as xswu/HPSv2 does."""
    from rewardtune.rewards.open_clip_files import _register_arch, create_open_clip

    directory = tmp_path_factory.mktemp("hps") / "hpsv2"
    shutil.copytree(tiny_rewards["hpsv2"], directory)
    torch.manual_seed(1234)
    model = create_open_clip(_register_arch(directory, {}))
    torch.save({"state_dict": model.state_dict()}, directory / "HPS_v2_compressed.pt")
    return directory


def _first_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.visual.conv1.weight


def test_hps_version_picks_the_checkpoint_for_reward_and_critic_tower(hps_both_versions):
    from rewardtune.rewards import critic_tower_checkpoint
    from rewardtune.rewards.towers import load_clip_image_tower

    v20 = torch.load(hps_both_versions / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]["visual.conv1.weight"]
    v21 = torch.load(hps_both_versions / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]["visual.conv1.weight"]
    assert not torch.equal(v20, v21)
    assert critic_tower_checkpoint(RewardSpec(name="hpsv2", options={"version": "2.1"})) == "HPS_v2.1_compressed.pt"
    for options, expected, checkpoint in (({"version": "2.0"}, v20, "HPS_v2_compressed.pt"), ({}, v21, None)):
        spec = RewardSpec(name="hpsv2", source=str(hps_both_versions), options=options)
        assert torch.equal(_first_weight(build_reward(spec, "cpu").model), expected)
        assert critic_tower_checkpoint(spec) == checkpoint
        tower = load_clip_image_tower(critic_tower_source(spec), "cpu", checkpoint=critic_tower_checkpoint(spec))
        assert torch.equal(_first_weight(tower.module), expected)


def test_hps_version_on_the_hub_fetches_only_that_file():
    from rewardtune.config import load_config
    from rewardtune.model_refs import config_model_refs
    from tests.conftest import REPO

    spec = RewardSpec(name="hpsv2", options={"version": "2.0"})
    assert [r.files for r in reward_model_refs(spec)] == [("HPS_v2_compressed.pt",)]
    cfg = load_config(REPO / "configs" / "sd15-hpsv2-tdpo_r.yaml")  # the official preset: v2.0 for reward and tower
    assert cfg.reward.options["version"] == "2.0"
    hps = [r for r in config_model_refs(cfg) if r.source == "xswu/HPSv2"]
    assert hps and all(r.files == ("HPS_v2_compressed.pt",) for r in hps)
    from rewardtune.rewards.towers import tower_ref

    assert tower_ref("xswu/HPSv2", "HPS_v2_compressed.pt").files == ("HPS_v2_compressed.pt",)
    assert tower_ref("xswu/HPSv2").files == ("HPS_v2.1_compressed.pt",)


def test_unknown_hps_version_is_a_config_error(tiny_model_dir):
    from rewardtune.config import parse_config
    from rewardtune.errors import ConfigError
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(tiny_model_dir, reward={"name": "hpsv2", "options": {"version": "3"}})
    with pytest.raises(ConfigError, match=r"hpsv2 options.version: unknown HPS version '3'; use one of 2.0, 2.1"):
        parse_config(data)
    data = tiny_config_dict(tiny_model_dir, reward={"name": "hpsv2", "options": {"version": 2.0}})  # unquoted YAML
    assert parse_config(data).reward.options["version"] == 2.0
