"""One LoRA format that means the same thing everywhere: for each (rank, alpha), including alpha != rank, and
both families (sd, the flow family's SD3), a briefly trained checkpoint loaded our way (the path resume,
evaluate and export share), `load_lora_weights` on the unmerged export and the merged export give the same
denoiser output and the same fixed-seed image; an old checkpoint without adapter metadata loads at its
config's scale with a warning, and a file whose stored scale disagrees with the config is refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardtune.checkpoint import latest_checkpoint, sha256_file
from rewardtune.config import parse_config
from rewardtune.errors import CheckpointError
from rewardtune.export import _load_policy, export_model
from rewardtune.models import LORA_FILE
from rewardtune.tiny_flow import init_tiny_flow
from tests.conftest import one_epoch_lora_dict

SCALES = [(4, 4), (4, 8)]
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return init_tiny_flow(tmp_path_factory.mktemp("flow") / "sd3", "sd3")


def _config(family: str, model: Path, rank: int, alpha: float):
    sections = {"model": {"finetune": "lora", "lora_rank": rank, "lora_alpha": alpha, "family": family},
                "training": {"learning_rate": 5e-2, "clip_range": 1.0}}
    if family != "sd":
        sections["sampling"] = {"num_steps": 2, "batch_size": 2, "batches_per_epoch": 1, "resolution": 32,
                                "guidance_scale": 3.0}
    return parse_config(one_epoch_lora_dict(model, **sections))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sd3_dir, tmp_path_factory) -> dict:
    """{(family, rank, alpha): (config, run dir, the in-memory trained denoiser's output)}: one trained epoch each
    (B != 0 after one step at this rate)."""
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("lora-scale")
    found = {}
    for family, model in (("sd", tiny_model_dir), ("sd3", sd3_dir)):
        for rank, alpha in SCALES:
            cfg = _config(family, model, rank, alpha)
            out = root / f"{family}-{rank}-{alpha}"
            trainer = Trainer(cfg, out)
            trainer.run()
            found[family, rank, alpha] = cfg, out, _denoiser_out(trainer.built.pipe)  # the policy as trained, in memory
    return found


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _denoiser_out(pipe) -> torch.Tensor:
    """The denoiser on fixed random inputs (the same for every pipeline of a family)."""
    model = _denoiser(pipe)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if hasattr(pipe, "unet"):
            x = torch.randn(1, model.config.in_channels, 4, 4, generator=gen)
            ctx = torch.randn(1, 77, model.config.cross_attention_dim, generator=gen)
            return model(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        cfg = model.config
        x = torch.randn(1, cfg.in_channels, 8, 8, generator=gen)
        ctx = torch.randn(1, 7, cfg.joint_attention_dim, generator=gen)
        pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen)
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=torch.tensor([500.0])).sample


def _image(pipe):
    with torch.no_grad():
        return torch.as_tensor(pipe("a zebra", num_inference_steps=2, height=32, width=32, output_type="np",
                                    generator=torch.Generator().manual_seed(0)).images)


def _pipeline_class(family: str):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    return StableDiffusionPipeline if family == "sd" else StableDiffusion3Pipeline


def _from_pretrained(family: str, path: Path):
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    return _pipeline_class(family).from_pretrained(path, **extra)


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize(("rank", "alpha"), SCALES)
def test_trained_policy_unmerged_export_and_merged_export_agree(runs, tmp_path, family, rank, alpha):
    cfg, run, in_memory = runs[family, rank, alpha]
    checkpoint, _ = latest_checkpoint(run / "checkpoints")
    meta = json.loads(safe_open(str(checkpoint / LORA_FILE), "pt").metadata()["lora_adapter_metadata"])
    prefix = "unet" if family == "sd" else "transformer"
    assert meta[f"{prefix}.r"] == rank and meta[f"{prefix}.lora_alpha"] == alpha  # the checkpoint's file carries it
    ours = _load_policy(cfg, checkpoint)  # resume, evaluate and export load a checkpoint this way
    base_out = _denoiser_out(_load_policy(cfg, None))
    trained_out = _denoiser_out(ours)
    torch.testing.assert_close(trained_out, in_memory, **TOL)  # the checkpoint loads back as the policy trained
    assert (trained_out - base_out).abs().max() > 1e-3  # the fine-tune moved the model: the comparison can see a scale

    unmerged, merged = tmp_path / "unmerged", tmp_path / "merged"
    export_model(run, None, "last", unmerged)
    export_model(run, None, "last", merged, merge=True)
    adapter = _from_pretrained(family, unmerged)
    adapter.load_lora_weights(unmerged / "lora")
    fused = _from_pretrained(family, merged)
    direct = _from_pretrained(family, unmerged)
    direct.load_lora_weights(checkpoint)  # the README's way: a checkpoint's own LoRA file, read by diffusers
    for other in (adapter, fused, direct):
        torch.testing.assert_close(_denoiser_out(other), trained_out, **TOL)
    image = _image(ours)
    for other in (adapter, fused):
        torch.testing.assert_close(_image(other), image, **TOL)


def test_a_checkpoint_without_adapter_metadata_loads_at_the_config_scale_with_a_warning(runs, caplog):
    cfg, run, _ = runs["sd", 4, 8]
    checkpoint, _ = latest_checkpoint(run / "checkpoints")
    trained_out = _denoiser_out(_load_policy(cfg, checkpoint))
    old = run.parent / "old-run"
    shutil.copytree(run, old)
    old_ckpt = old / "checkpoints" / checkpoint.name
    file = old_ckpt / LORA_FILE
    save_file(load_file(file), file, metadata={"format": "pt"})  # as rewardtune wrote it before: no adapter metadata
    manifest = json.loads((old_ckpt / "manifest.json").read_text())
    manifest["files"][LORA_FILE] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    (old_ckpt / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="rewardtune.lora_metadata"):
        loaded = _load_policy(cfg, old_ckpt)
    assert any("has no LoRA adapter metadata" in r.getMessage() and "scale 2" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(_denoiser_out(loaded), trained_out, **TOL)
    # its unmerged export carries the scale the checkpoint file lacked
    out = run.parent / "old-export"
    export_model(old, None, "last", out)
    shipped = _from_pretrained("sd", out)
    shipped.load_lora_weights(out / "lora")
    torch.testing.assert_close(_denoiser_out(shipped), trained_out, **TOL)


def test_a_lora_file_whose_stored_scale_differs_from_the_config_is_refused(runs):
    cfg, run, _ = runs["sd", 4, 8]
    checkpoint, _ = latest_checkpoint(run / "checkpoints")
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora_alpha": 4.0})})
    with pytest.raises(CheckpointError, match=r"saved with LoRA r=4, lora_alpha=8.*set model.lora_rank/lora_alpha"):
        _load_policy(other, checkpoint)


def test_rslora_metadata_round_trips_through_load_lora_weights(tiny_model_dir, tmp_path):
    """The config has no rsLoRA switch; the file format still carries use_rslora (scale alpha / sqrt(r))."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from rewardtune.config import ModelConfig
    from rewardtune.models import load_pipeline, load_policy_weights, save_policy

    mcfg = ModelConfig(source=str(tiny_model_dir), lora_rank=4, lora_alpha=8)
    pipe = load_pipeline(mcfg)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_policy(pipe.unet, mcfg, tmp_path)
    reloaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                       requires_safety_checker=False)
    reloaded.load_lora_weights(tmp_path)
    assert reloaded.unet.peft_config["default_0"].use_rslora
    torch.testing.assert_close(_denoiser_out(reloaded), _denoiser_out(pipe), **TOL)
    plain = load_pipeline(mcfg)
    plain.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with pytest.raises(CheckpointError, match="use_rslora=True"):  # our loader will not apply the wrong scale
        load_policy_weights(plain.unet, mcfg, tmp_path)
