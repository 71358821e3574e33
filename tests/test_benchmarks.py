"""benchmarks/gpu_suite.sh does not rot: its phase commands parse, and without CUDA it stops at once."""

import importlib.util
import os
import shlex
import subprocess

import pytest

from tests.conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def _rl_epoch():
    spec = importlib.util.spec_from_file_location("rl_epoch", REPO / "benchmarks" / "rl_epoch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", [[], ["--tiny"]])
def test_every_phase_command_parses(mode, monkeypatch):
    result = subprocess.run(["bash", str(SUITE), "--dry-run", *mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == (3 if mode else 4)  # compare_trl, speedups, critic (+ the sd35m flow phase on a GPU)
    rl_epoch = _rl_epoch()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # parse the GPU commands on a CPU machine
    parsed = [rl_epoch.parse_args(shlex.split(c)[1:]) for c in commands]
    assert parsed[0].compare_trl and parsed[1].speedups and "tdpo_r" in parsed[2].algorithm
    if not mode:  # the COMPASS setting of the side-by-side
        first = parsed[0]
        assert (first.preset, first.steps, first.images_per_epoch, first.sample_batch, first.mixed_precision) == (
            "sd15", 50, 32, 8, "bf16")
        assert parsed[2].critic_input_strides == "1,5,10" and parsed[2].steps == 50
        flow = parsed[3]  # Flow-GRPO's SD3.5-M setting: 10 steps
        assert (flow.preset, flow.steps, flow.algorithm, flow.mixed_precision) == ("sd35m", 10, "grpo,tdpo_r", "bf16")


def test_without_cuda_it_fails_fast_with_one_error_line(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHON": "/bin/false"}  # no nvidia-smi, no torch with CUDA
    result = subprocess.run(["bash", str(SUITE), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: gpu_suite.sh needs a CUDA GPU") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_rl_epoch_refuses_unknown_switch_names():
    with pytest.raises(SystemExit):
        _rl_epoch().parse_args(["--speedups", "--skip", "warp_drive"])


def test_rl_epoch_sd35m_runs_our_flow_trainer_only():
    rl_epoch = _rl_epoch()
    with pytest.raises(SystemExit):  # TRL's DDPOTrainer has no flow pipeline
        rl_epoch.parse_args(["--preset", "sd35m", "--compare-trl"])
    args = rl_epoch.parse_args(["--preset", "sd35m", "--algorithm", "grpo"])
    args.tower = None
    cfg = rl_epoch.build_config(args, REPO / "unused", "grpo")
    assert cfg["model"]["family"] == "sd3" and cfg["model"]["lora_rank"] == 32
    assert (cfg["sampling"]["resolution"], cfg["sampling"]["guidance_scale"], cfg["sampling"]["num_steps"]) == (512, 4.5, 10)
