"""Export and model selection: the best-heldout rule by hand, a tiny LoRA run exported merged and unmerged,
loaded back with StableDiffusionPipeline.from_pretrained and generating, the model card, and the Hub push
up to the calls it would make."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rewardtune.errors import RewardtuneError
from rewardtune.export import export_model, model_card, select_checkpoint
from rewardtune.indicators import best_heldout_index
from tests.cli_runner import run_cli
from tests.conftest import REPO
from tests.test_evaluate import tiny_eval_config


def test_best_heldout_takes_the_best_train_reward_the_unseen_rewards_allow():
    train = [0.0, 1.0, 2.0, 3.0]
    unseen = {"gold": [0.5, 0.48, 0.45, 0.2], "fid": [0.9, 0.95, 0.91, 0.92]}
    low = {"gold": 0.44, "fid": 0.85}  # base CI lower bounds: checkpoint 3 drops gold below it
    assert best_heldout_index(train, unseen, low) == 2
    assert best_heldout_index(train, unseen, {"gold": 0.47, "fid": 0.85}) == 1
    assert best_heldout_index(train, unseen, {"gold": 0.6, "fid": 0.85}) == 0  # nothing qualifies: base
    assert best_heldout_index([0.0, 1.0, 1.0], {"g": [1, 1, 1]}, {"g": 0.5}) == 1  # ties: the earliest
    with pytest.raises(ValueError, match="unseen reward g has 2 checkpoints but train has 3"):
        best_heldout_index([0.0, 1.0, 1.0], {"g": [1, 1]}, {"g": 0.5})


def _record(name, epoch, train, gold, gold_low=0.0):
    stats = lambda m, lo=None: {"mean": m, "std": 0.1, "ci95": [lo if lo is not None else m - 0.05, m + 0.05], "n": 4}  # noqa: E731
    return {"checkpoint": name, "epoch": epoch, "train_reward": "brightness",
            "rewards": {"brightness": {"role": "train", "heldout": stats(train), "train": None},
                        "gold": {"role": "unseen", "heldout": stats(gold, gold_low if name == "base" else None), "train": None}},
            "diversity": {"heldout": stats(0.3)}, "drift": {"heldout": stats(0.1)}}


def test_select_checkpoint_rules_and_reasons(tmp_path):
    records = [_record("base", 0, 0.1, 0.5, gold_low=0.45), _record("epoch-000001", 1, 0.3, 0.47),
               _record("epoch-000002", 2, 0.6, 0.30)]
    (tmp_path / "checkpoints" / "epoch-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "epoch-000001").mkdir()
    name, reason = select_checkpoint(tmp_path, records, "best-heldout")
    assert name == "epoch-000001" and "among the 2 of 3 evaluated checkpoints" in reason and "gold" in reason
    assert select_checkpoint(tmp_path, records, "best-proxy")[0] == "epoch-000002"
    with pytest.raises(RewardtuneError, match="needs the evaluation of base"):
        select_checkpoint(tmp_path, [], "best-heldout")


def test_model_card_carries_license_base_and_the_heldout_table(tiny_model_dir):
    cfg = tiny_eval_config(tiny_model_dir)
    records = [_record("base", 0, 0.1, 0.5, gold_low=0.45), _record("epoch-000001", 1, 0.3, 0.47)]
    card = model_card(cfg, "epoch-000001", "because", records, merged=True, license_id="creativeml-openrail-m")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "creativeml-openrail-m" and front["base_model"] == str(tiny_model_dir)
    assert front["library_name"] == "diffusers" and "ddpo" in front["tags"]
    assert "| gold | unseen | 0.47 [0.42, 0.52] | 0.5 [0.45, 0.55] |" in card
    assert "**Checkpoint:** epoch-000001: because." in card and "| epoch-000001 (chosen) | 1 |" in card


# ------------------------------------------------------------------------------------------- end to end
LORA_RUN = {"model": {"finetune": "lora", "lora_rank": 4}, "training": {"learning_rate": 3e-2, "clip_range": 1.0},
            "eval_rewards": [{"name": "jpeg_incompressibility"}]}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A 2-epoch tiny LoRA run on brightness, evaluated on held-out prompts with an unseen reward."""
    from rewardtune.evaluate import evaluate_run
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# tiny\n")  # the base card's license
    cfg = tiny_eval_config(base, epochs=2, **LORA_RUN)
    Trainer(cfg, root / "run").run()
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "heldout.txt").write_text("zebra\nkoala\nllama\nwalrus\n")
    evaluate_run(cfg, root / "run", prompts, root / "eval")
    return root, cfg


def _unet_out(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, 4, 4, generator=gen)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


def test_export_best_heldout_merged_loads_generates_and_equals_the_adapter(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from rewardtune.export import _load_policy
    from rewardtune.models import load_pipeline

    root, cfg = lora_run
    out = tmp_path / "shipped"
    result = run_cli(["export", "--run", str(root / "run"), "--eval", str(root / "eval"), "--select", "best-heldout",
                      "--out", str(out), "--merge"])
    assert result.returncode == 0, result.stderr
    assert "kept in float32" not in result.stderr  # diffusers' spurious dtype-cast warning (export.cast_components)
    summary = json.loads((out / "rewardtune_export.json").read_text())
    chosen = summary["checkpoint"]
    assert chosen.startswith("epoch-") and summary["merged"] and f"exported {chosen}" in result.stdout
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert not (out / "lora").exists() and not getattr(pipe.unet, "peft_config", None)
    adapted = _load_policy(cfg, root / "run" / "checkpoints" / chosen)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(adapted.unet), rtol=1e-4, atol=1e-5)
    base = load_pipeline(cfg.model)
    assert not torch.allclose(_unet_out(pipe.unet), _unet_out(base.unet), atol=1e-6)  # the fine-tune is in it
    image = pipe("a zebra", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and image.min() >= 0 and image.max() <= 1
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["license"] == "creativeml-openrail-m"  # carried from the base model's card
    assert f"## Held-out evaluation of {chosen}" in (out / "README.md").read_text()


def test_export_unmerged_keeps_base_unet_and_the_adapter(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from rewardtune.models import load_pipeline

    root, cfg = lora_run
    out = tmp_path / "adapter"
    summary = export_model(root / "run", root / "eval", "last", out)
    assert summary["checkpoint"] == "epoch-000002" and not summary["merged"]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(load_pipeline(cfg.model).unet))
    pipe.load_lora_weights(out / "lora")
    merged = tmp_path / "merged"
    export_model(root / "run", root / "eval", "last", merged, merge=True)
    shipped = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(shipped.unet), rtol=1e-4, atol=1e-5)


def test_export_refuses_an_existing_out_and_a_missing_run(lora_run, tmp_path):
    root, _ = lora_run
    tmp_path.joinpath("taken").mkdir()
    result = run_cli(["export", "--run", str(root / "run"), "--select", "last", "--out", str(tmp_path / "taken")])
    assert result.returncode == 2 and result.stderr_lines() == [
        f"error: --out {tmp_path / 'taken'} already exists and holds files; remove it or choose another path"]
    result = run_cli(["export", "--run", str(tmp_path), "--select", "last", "--out", str(tmp_path / "x")])
    assert result.returncode == 2 and "has no config.yaml" in result.stderr


class _RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Commit()


def test_push_to_hub_makes_the_create_and_upload_requests(lora_run, tmp_path, monkeypatch):
    import huggingface_hub

    root, _ = lora_run
    _RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    summary = export_model(root / "run", root / "eval", "last", tmp_path / "p", merge=True, push_to_hub="me/tiny-ddpo")
    assert summary["pushed"] == "https://huggingface.co/me/tiny-ddpo/commit/abc"
    init, create, upload = _RecordingHfApi.calls
    assert init == ("init", "hf_test_token")
    assert create == ("create_repo", "me/tiny-ddpo", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1]["repo_id"] == "me/tiny-ddpo" and upload[1]["folder_path"] == str(tmp_path / "p")
    assert {"README.md", "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(upload[2])
    with pytest.raises(RewardtuneError, match="give a repo id like 'user/model-name'"):
        export_model(root / "run", root / "eval", "last", tmp_path / "q", push_to_hub="no-slash")


def test_the_dag_exports_a_model_artifact_per_arm_after_its_collect_arm():
    sys.path.insert(0, str(REPO))
    pipeline_doc, _ = yaml.safe_load_all((REPO / "pipelines" / "alignment.yaml").read_text())
    # one export per arm in each training branch (single-node train, multi-node launcher), after the arm's
    # collect-arm (the report fans in over the arms, outside the arm loop, so nothing in the loop can follow it)
    exports = [(tasks[name], tasks) for c in pipeline_doc["components"].values()
               for tasks in [c.get("dag", {}).get("tasks", {})] for name in tasks if name.startswith("export")]
    assert len(exports) == 2
    for export, tasks in exports:
        collect = next(n for n in export["dependentTasks"] if n.startswith("collect-arm"))
        loop = export["inputs"]["artifacts"]["evaluations"]["taskOutputArtifact"]["producerTask"]
        assert loop.startswith("for-loop") and loop == tasks[collect]["inputs"]["artifacts"]["evaluations"][
            "taskOutputArtifact"]["producerTask"]
        outputs = pipeline_doc["components"][export["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
        assert outputs["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert {"export_select", "push_to_hub"} <= set(pipeline_doc["root"]["inputDefinitions"]["parameters"])
