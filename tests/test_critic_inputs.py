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


# ---------------------------------------------------------------- the official critic-input preprocessing
def _smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Photo-like (smooth, in [0, 1]) images: upsampled noise."""
    coarse = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize(("h", "w", "size"), [(512, 512, 224), (48, 64, 32), (40, 30, 32)])
def test_clip_processor_path_matches_the_pil_processor_the_official_code_ran(h, w, size):
    """The official critic: uint8 images through CLIPProcessor (PIL resize then). Ours: the same processor's
    batched torchvision backend, on the device. Tolerance, in uint8 levels after the resize: measured on these
    images 99.3% of values equal, 0.7% one level apart, 2 of 451,584 two levels apart (512 -> 224)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from rewardtune.rewards.towers import CLIP_MEAN, CLIP_STD, clip_processor_preprocess

    images = _smooth_images(3, h, w)
    ours = clip_processor_preprocess(images, size, CLIP_MEAN, CLIP_STD, torch.float32)
    pil = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    reference = pil(images=list(uint8), return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (3, 3, size, size)
    levels = ((ours - reference).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255).round()
    assert levels.max() <= 2
    assert (levels > 0).float().mean() < 0.02
    assert (levels > 1).float().mean() < 1e-4


def test_clip_processor_quantizes_to_uint8_by_hand():
    from rewardtune.rewards.towers import clip_processor_preprocess

    # no resize (already the tower's size): 0.3 -> round(76.5) = 76 (half to even), then (76/255 - mean)/std
    images = torch.full((1, 3, 8, 8), 0.3)
    out = clip_processor_preprocess(images, 8, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0), torch.float32)
    expected = torch.tensor([(76 / 255 - 0.5) / 0.5, (76 / 255 - 0.25) / 0.5, 76 / 255]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    torch.testing.assert_close(out, expected)


def test_tower_preprocessing_option(tiny_rewards):
    from rewardtune.rewards.towers import load_clip_image_tower

    images = _smooth_images(4, 64, 48)
    plain = load_clip_image_tower(tiny_rewards["pickscore"], "cpu")
    official = load_clip_image_tower(tiny_rewards["pickscore"], "cpu", preprocessing="clip_processor")
    assert plain.preprocessing == "float" and official.preprocessing == "clip_processor"
    a, b = plain.embed(images), official.embed(images)
    assert not torch.equal(a, b)
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(4))
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    with pytest.raises(ValueError, match="unknown tower preprocessing 'pil'"):
        load_clip_image_tower(tiny_rewards["pickscore"], "cpu", preprocessing="pil")


def test_paper_presets_use_the_official_critic_input():
    from rewardtune.config import load_config
    from tests.conftest import REPO

    for path in sorted((REPO / "configs").glob("sd15-*.yaml")):
        cfg = load_config(path)
        if cfg.algorithm.uses_critic:
            assert cfg.algorithm.critic.preprocessing == "clip_processor", path.name
            assert cfg.algorithm.critic.reward_clip == 0.0, path.name
