"""Retried stages are idempotent (KFP retries a failed pod with the same inputs): `export`, `report` and
`prepare-prompts` run twice into the same output give the same result, and an export killed mid-write
(fault point `export_write`) then run again gives exactly a clean export's files, with no temporary
directory of the killed attempt left. (`evaluate` killed and retried: tests/test_preemption.py; `train`:
the resume tests.)"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import yaml

from rewardtune.faults import FAULT_ENV
from tests.cli_inproc import run_main
from tests.cli_runner import run_cli
from tests.conftest import one_epoch_lora_dict


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A 1-epoch LoRA run (alpha != rank) and its evaluation."""
    from rewardtune.config import parse_config
    from rewardtune.evaluate import evaluate_run
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("idempotent")
    data = one_epoch_lora_dict(tiny_model_dir, model={"finetune": "lora", "lora_rank": 4, "lora_alpha": 8},
                               training={"learning_rate": 3e-2, "clip_range": 1.0},
                               evaluation={"num_heldout_prompts": 2, "num_train_prompts": 1, "images_per_prompt": 2,
                                           "grid_prompts": 1},
                               eval_rewards=[{"name": "jpeg_incompressibility"}])
    cfg = parse_config(data)
    Trainer(cfg, root / "run").run()
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "heldout.txt").write_text("zebra\nkoala\n")
    evaluate_run(cfg, root / "run", prompts, root / "eval")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    return {"root": root, "run": root / "run", "eval": root / "eval", "config": config}


def _content(path: Path) -> str:
    """sha256 of a file's content: its bytes, or for safetensors its header metadata and tensors (safetensors
    writes the `__metadata__` map in hash-map order, which differs between processes: a LoRA file's two keys,
    `format` and diffusers' `lora_adapter_metadata`, come out in either order)."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as handle:
        digest.update(json.dumps(handle.metadata(), sort_keys=True).encode())
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key)
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, str]:
    """{relative path: content digest} of every file under `directory`."""
    return {str(p.relative_to(directory)): _content(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _export_argv(e: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["export", "--run", str(e["run"]), "--eval", str(e["eval"]), "--select", "best-proxy", "--out", str(out),
            *extra]


def test_export_twice_into_the_same_out_keeps_the_first_result(evaluated, tmp_path):
    out = tmp_path / "shipped"
    first = run_main(_export_argv(evaluated, out))
    assert first.returncode == 0, first.stderr
    files, mtimes = _files(out), {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = json.loads((out / "rewardtune_export.json").read_text())
    assert summary["run_id"] and summary["checkpoint"] == "epoch-000001" and summary["checkpoint_digest"]
    again = run_main(_export_argv(evaluated, out))
    assert again.returncode == 0, again.stderr
    assert _files(out) == files and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    # the same --out with other inputs (merged this time) is not "the same result": refused in one line
    other = run_main(_export_argv(evaluated, out, "--merge"))
    assert other.returncode == 2 and other.stderr_lines() == [
        f"error: --out {out} already exists and holds another export (other run, checkpoint, selection or merge); "
        "remove it or choose another path"]
    assert _files(out) == files


def test_export_killed_mid_write_then_retried_gives_a_clean_exports_files(evaluated, tmp_path):
    clean = tmp_path / "clean"
    assert run_main(_export_argv(evaluated, clean)).returncode == 0
    out = tmp_path / "retried"
    killed = run_cli(_export_argv(evaluated, out), env={FAULT_ENV: "export_write:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and list(tmp_path.glob(".retried.tmp-*")), "the killed attempt wrote only a temp dir"
    again = run_main(_export_argv(evaluated, out))
    assert again.returncode == 0, again.stderr
    assert _files(out) == _files(clean)
    assert not list(tmp_path.glob(".retried.tmp-*")), "the killed attempt's temp dir is gone"


def test_report_twice_into_the_same_out_gives_the_same_files(evaluated, tmp_path):
    out = tmp_path / "report"
    argv = ["report", "--run", str(evaluated["run"]), "--eval", str(evaluated["eval"]), "--out", str(out)]
    assert run_main(argv).returncode == 0
    first = _files(out)
    assert set(first) == {"report.html", "report.md", "headline.json"}
    assert run_main(argv).returncode == 0
    assert _files(out) == first


def test_prepare_prompts_twice_into_the_same_out_gives_the_same_files(evaluated, tmp_path):
    out = tmp_path / "prompts"
    argv = ["prepare-prompts", "--config", str(evaluated["config"]), "--out", str(out)]
    assert run_main(argv).returncode == 0
    first = _files(out)
    assert {"train.txt", "heldout.txt", "prompts.json"} <= set(first)
    assert run_main(argv).returncode == 0
    assert _files(out) == first
