"""The overoptimization testbed: world, exact rewards, committed base model and proxy, compare command.

Documented thresholds (docs/testbed.md): the committed base model's samples reach mean prompt fidelity
>= FIDELITY_MIN on training prompts and on never-pretrained combinations (chance level, guessing every
attribute, is about 0.32), and the committed proxy's Spearman correlation with gold on fresh base-model
samples is >= SPEARMAN_MIN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardtune.config import RewardSpec, load_config
from rewardtune.prompts import load_prompts
from rewardtune.rewards import build_reward
from rewardtune.testbed import world
from rewardtune.testbed.assets import model_dir, proxy_dir
from rewardtune.testbed.gold import analyze, attribute_checks, fidelity, gold_aesthetic
from rewardtune.testbed.proxy import gold_scores, label_images, spearman

FIDELITY_MIN = 0.45
CHANCE_FIDELITY = 0.32
SPEARMAN_MIN = 0.7
ROOT = Path(__file__).resolve().parents[1]


def _flat(fg: tuple[float, float, float], bg: tuple[float, float, float], shape: str = "circle",
          center: tuple[float, float] = (16.0, 16.0), radius: float = 8.0) -> np.ndarray:
    cover = world.shape_mask(shape, *center, radius)[None]
    return cover * np.array(fg)[:, None, None] + (1 - cover) * np.array(bg)[:, None, None]


# ------------------------------------------------------------------------------------------- world
def test_world_is_deterministic_and_varied():
    spec = world.all_specs()[17]
    a, b = world.render(spec, seed=3), world.render(spec, seed=3)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render(spec, seed=4))  # jitter: many images per prompt
    assert np.array_equal(world.render_batch(world.all_specs()[:5], 1), world.render_batch(world.all_specs()[:5], 1))
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_split_holds_out_combinations_not_values():
    train, heldout = world.split_specs()
    assert train and heldout and not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(world.all_specs()) == 360
    for field in ("size", "color", "shape", "background", "position"):
        assert {getattr(s, field) for s in heldout} <= {getattr(s, field) for s in train}
    assert world.split_specs() == (train, heldout)


def test_prompts_round_trip_and_builtin_set():
    specs = world.all_specs()
    assert all(world.parse_prompt(s.prompt) == s for s in specs)
    assert world.parse_prompt("a photo of a cat") is None
    assert load_prompts("testbed") == [s.prompt for s in specs]


# ------------------------------------------------------------------------------------------- gold rewards
def test_fidelity_is_exact_on_world_renders():
    specs = world.all_specs()
    images = world.render_batch(specs, seed=0).astype(np.float64)
    scores = [fidelity(im, s.prompt) for im, s in zip(images, specs, strict=True)]
    assert np.mean(scores) >= 0.99
    spec = world.Spec("large", "red", "circle", "black", "center")
    image = world.render(spec, 0).astype(np.float64)
    wrong = world.Spec("small", "blue", "triangle", "white", "top left")
    assert fidelity(image, spec.prompt) == 1.0
    assert fidelity(image, wrong.prompt) == 0.0
    assert attribute_checks(image, "a large blue circle on a black background, center") == {
        "background": True, "color": False, "shape": True, "size": True, "position": True}
    assert fidelity(image, "a photo of a cat") == 0.0


def test_gold_orders_hand_made_images():
    fg, bg = (0.86, 0.16, 0.16), (0.94, 0.94, 0.94)  # luma contrast ~0.57, near the pleasant 0.5
    ideal = _flat(fg, bg, radius=8.0)
    off_center = _flat(fg, bg, center=(8.0, 8.0), radius=8.0)
    huge = _flat(fg, bg, shape="square", radius=15.0)
    tiny = _flat(fg, bg, radius=3.0)
    low_contrast = _flat((0.55, 0.45, 0.45), (0.5, 0.5, 0.5), radius=8.0)
    noisy = np.clip(ideal + np.random.default_rng(0).normal(0, 0.15, ideal.shape), 0, 1)
    blank = np.full((3, 32, 32), 0.5)
    g = {k: gold_aesthetic(v) for k, v in dict(ideal=ideal, off=off_center, huge=huge, tiny=tiny, low=low_contrast,
                                               noisy=noisy, blank=blank).items()}
    assert g["ideal"] > 0.8
    for worse in ("off", "huge", "tiny", "low", "noisy"):
        assert g["ideal"] > g[worse] + 0.1, (worse, g)
    assert g["blank"] == 0.0
    assert analyze(ideal).clean > 0.95 > analyze(noisy).clean


def test_registered_rewards_score_batches():
    specs = world.all_specs()[:6]
    images = torch.from_numpy(world.render_batch(specs, 0))
    prompts = [s.prompt for s in specs]
    for name in ("testbed_gold", "testbed_fidelity", "testbed_proxy"):
        scores = build_reward(RewardSpec(name=name), "cpu")(images, prompts)
        assert scores.shape == (6,) and torch.isfinite(scores).all(), name
    fid = build_reward(RewardSpec(name="testbed_fidelity"), "cpu")(images, prompts)
    assert torch.allclose(fid, torch.ones(6))
    big = torch.nn.functional.interpolate(images, size=64, mode="nearest")  # any resolution is accepted
    assert torch.allclose(build_reward(RewardSpec(name="testbed_fidelity"), "cpu")(big, prompts), fid)


# ------------------------------------------------------------------------------------------- committed weights
@pytest.fixture(scope="module")
def base_pipe():
    from rewardtune.config import ModelConfig
    from rewardtune.models import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(ModelConfig(source="testbed"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_testbed_source_resolves_to_committed_pipeline():
    cfg = load_config(ROOT / "configs" / "testbed.yaml")
    assert cfg.model.source == str(model_dir())
    assert (model_dir() / "model_index.json").is_file() and (proxy_dir() / "proxy.safetensors").is_file()
    size = sum(p.stat().st_size for p in model_dir().parent.rglob("*") if p.is_file())
    # 5 MB for the model and the training proxy, plus the two unseen proxies of the cross-reward table (276 KB)
    assert size <= 6 * 2**20, f"committed testbed weights are {size} bytes (> 6 MB)"
    assert {r.name for r in cfg.eval_rewards} == {"testbed_gold", "testbed_fidelity"}
    assert cfg.reward.name == "testbed_proxy"


def test_pretrained_model_follows_prompts(base_pipe):
    from rewardtune.testbed.pretrain import fidelity_report

    train, heldout = world.split_specs()
    seen = fidelity_report(base_pipe, train, 48, seed=11, steps=10, guidance=4.0)
    unseen = fidelity_report(base_pipe, heldout, 48, seed=12, steps=10, guidance=4.0)
    assert seen["fidelity"] >= FIDELITY_MIN, seen
    assert unseen["fidelity"] >= FIDELITY_MIN, unseen
    assert seen["attribute_accuracy"]["background"] >= 0.7  # 1/3 by chance


def test_chance_fidelity_is_what_the_docs_say():
    """Random flat images scored against random prompts land near CHANCE_FIDELITY (the baseline to beat)."""
    rng = np.random.default_rng(0)
    specs = world.all_specs()
    scores = []
    for i in range(300):
        drawn = specs[rng.integers(len(specs))]
        image = world.render(drawn, seed=i).astype(np.float64)
        scores.append(fidelity(image, specs[rng.integers(len(specs))].prompt))
    assert abs(np.mean(scores) - CHANCE_FIDELITY) < 0.05


def test_proxy_tracks_gold_in_distribution(base_pipe):
    images = label_images(base_pipe, 64, 0, seed=999, steps=10, guidance=4.0)
    proxy = build_reward(RewardSpec(name="testbed_proxy"), "cpu")
    rho = spearman(proxy(images, [""] * len(images)).numpy(), gold_scores(images))
    assert rho >= SPEARMAN_MIN, rho
    summary = json.loads((proxy_dir() / "testbed_proxy.json").read_text())
    assert summary["spearman_heldout_base_samples"] >= SPEARMAN_MIN


def test_spearman_matches_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_proxy_is_a_critic_tower():
    from rewardtune.rewards import critic_tower_source
    from rewardtune.rewards.towers import load_clip_image_tower

    tower = load_clip_image_tower(critic_tower_source(RewardSpec(name="testbed_proxy")), "cpu")
    emb = tower.embed(torch.rand(3, 3, 32, 32))
    assert emb.shape == (3, tower.dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_proxy_goes_through_the_model_cache(tmp_path, monkeypatch):
    from rewardtune.cache import MANIFEST, ModelRef, cache_key, cache_models

    monkeypatch.setenv("RT_MODEL_DIR", str(tmp_path / "work"))
    [result] = cache_models([ModelRef(str(proxy_dir()))], str(tmp_path / "cache"))
    entry = tmp_path / "cache" / cache_key(ModelRef(str(proxy_dir())))
    manifest = json.loads((entry / MANIFEST).read_text())
    assert "proxy.safetensors" in manifest["files"]
    images = torch.from_numpy(world.render_batch(world.all_specs()[:4], 0))
    direct = build_reward(RewardSpec(name="testbed_proxy"), "cpu")(images, [""] * 4)
    cached = build_reward(RewardSpec(name="testbed_proxy", source=str(entry)), "cpu")(images, [""] * 4)
    assert torch.allclose(direct, cached)
    (entry / "files" / "proxy.safetensors").write_bytes(b"corrupt")
    with pytest.raises(Exception, match="sha256"):
        build_reward(RewardSpec(name="testbed_proxy", source=str(entry)), "cpu")
    assert result.status


def test_pretrain_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from rewardtune.testbed.pretrain import PretrainSettings, pretrain

    tiny = PretrainSettings(images_per_spec=1, vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4, eval_images=2)
    pretrain(tmp_path / "a", tiny)
    pretrain(tmp_path / "b", tiny)
    a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- commands
def test_pretrain_quick_writes_a_loadable_testbed(tmp_path):
    from rewardtune.cli import main

    out = tmp_path / "tb"
    assert main(["testbed", "pretrain", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "model" / "testbed_pretrain.json").read_text())
    assert summary["unet_steps"] == 3 and "fidelity" in summary["evaluation"]["train_prompts"]
    scores = build_reward(RewardSpec(name="testbed_proxy", source=str(out / "proxy")), "cpu")(
        torch.rand(2, 3, 32, 32), ["", ""])
    assert scores.shape == (2,)
    assert main(["testbed", "pretrain", "--quick", "--out", str(out)]) == 2  # refuses to overwrite


def _tiny_compare_args(out) -> list[str]:
    return ["testbed", "compare", "--seeds", "1", "--out", str(out),
            "--set", "training.epochs=2", "--set", "sampling.batch_size=4", "--set", "sampling.batches_per_epoch=1",
            "--set", "training.batch_size=4", "--set", "training.gradient_accumulation_steps=1",
            "--set", "sampling.num_steps=4", "--checkpoint-every", "1", "--set", "algorithm.reset.every=1",
            "--set", "evaluation.num_heldout_prompts=3", "--set", "evaluation.images_per_prompt=2"]


def test_compare_end_to_end_minimal(tmp_path):
    from rewardtune.cli import main

    out = tmp_path / "cmp"
    assert main([*_tiny_compare_args(out), "--algorithms", "ddpo,cdpo"]) == 0
    data = json.loads((out / "comparison.json").read_text())
    summary = data["summary"]["algorithms"]
    assert set(summary) == {"ddpo", "cdpo"}
    for alg in ("ddpo", "cdpo"):
        curve = data["curves"][alg][0]
        assert curve["checkpoint"][0] == "base" and len(curve["gold"]) == 3  # base + 2 epochs
        assert all(math.isfinite(v) for v in curve["gold"] + curve["proxy"] + curve["fidelity"])
        assert summary[alg]["gold_at_best_proxy"]["mean"] is not None
    assert all(v is not None for v in data["curves"]["cdpo"][0]["lambda"])  # CDPO logs its multiplier
    assert "gold at equal proxy" in (out / "comparison.md").read_text()
    assert "<img" in (out / "comparison.html").read_text()


@pytest.mark.slow
def test_compare_all_algorithms(tmp_path):
    from rewardtune.cli import main

    out = tmp_path / "cmp"
    assert main([*_tiny_compare_args(out), "--algorithms", "ddpo,tdpo,tdpo_r,cdpo"]) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert set(data["summary"]["algorithms"]) == {"ddpo", "tdpo", "tdpo_r", "cdpo"}
    assert data["curves"]["tdpo_r"][0]["reset_epochs"] == [0, 1]  # reset.every=1


def test_testbed_rewards_are_never_default_unseen_rewards():
    from rewardtune.evaluate import unseen_reward_specs

    cfg = load_config(ROOT / "configs" / "testbed.yaml", ["eval_rewards=[]", "reward.name=brightness"])
    names = {s.name for s in unseen_reward_specs(cfg)}
    assert names and not any(n.startswith("testbed_") for n in names)
    explicit = load_config(ROOT / "configs" / "testbed.yaml")
    assert [s.name for s in unseen_reward_specs(explicit)] == ["testbed_gold", "testbed_fidelity"]
