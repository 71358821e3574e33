"""Preemption: SIGKILL at exact points of a CDPO run (critic, Lagrange multipliers, neuron resets), resume,
and demand bit-identical results; SIGTERM checkpoints at the next safe point within the grace period.

Kill points come from `rewardtune.faults`: an uninterrupted reference run records every point it passes
(`RT_FAULT_TRACE`), trials pick points from that trace and set `RT_FAULT_AT=<phase>:<n>`, so each kill
really lands where it says (sampling, mid optimizer step, mid critic update, mid checkpoint write, mid
pruning, right before/inside a neuron reset). Timing fields of the metrics log are wall-clock and are
the only values compared loosely (they must exist, not match).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rewardtune.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from rewardtune.faults import FAULT_ENV, TRACE_ENV
from tests.cli_runner import cli_command, exec_env, run_cli, start_cli
from tests.conftest import tiny_config_dict

EPOCHS = 4
TIMING = ("images_per_s", "time_sampling_s", "time_reward_s", "time_reward_wait_s", "time_training_s")
# What each default-suite trial must cover (one random point from each group).
DEFAULT_GROUPS = [("checkpoint_files", "checkpoint_rename", "checkpoint_delete"),
                  ("critic_update", "optimizer_step", "sample"),
                  ("reset", "pre_reset_saved", "metrics")]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    """CDPO (critic per reward, Lagrange multiplier, neuron reset every 2 epochs), 4 epochs, seconds per run."""
    from rewardtune.rewards.tiny import init_tiny_rewards

    root = tmp_path_factory.mktemp("preempt")
    aesthetic = init_tiny_rewards(root / "rewards", names=["aesthetic"])["aesthetic"]
    data = tiny_config_dict(
        tiny_model_dir,
        model={"finetune": "lora"},
        reward={"name": "aesthetic", "source": aesthetic},
        algorithm={"name": "cdpo", "reset": {"every": 2},
                   "constraints": [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}],
                   "lagrange": {"learning_rate": 1.0}},
        sampling={"batches_per_epoch": 1, "batch_size": 2, "num_steps": 4},
        training={"epochs": EPOCHS, "batch_size": 1, "gradient_accumulation_steps": 2, "seed": 3},
        checkpointing={"every_epochs": 1, "keep_last": 1},
    )
    path = root / "cdpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run and the trace of every fault point it passed, in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trace = out.parent / "trace.txt"
    result = run_cli(["train", "--config", str(config), "--out", str(out)], env={TRACE_ENV: str(trace)})
    assert result.returncode == 0, result.stderr
    points = trace.read_text().split()
    phases = {p.split(":")[0] for p in points}
    assert {"sample", "optimizer_step", "critic_update", "reset", "pre_reset_saved", "checkpoint_files",
            "checkpoint_rename", "checkpoint_delete", "metrics"} <= phases
    return out, points


def _metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert all(record[key] is not None for key in TIMING)
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_equal_tensors(a: object, b: object, where: str) -> None:
    """Exact (bitwise) equality of nested optimizer state: tensors, numbers, lists, dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_final_state(run: Path, ref: Path, same_checkpoints: bool = True) -> None:
    """Policy (LoRA), critics, optimizer, trainer state (duals, thresholds, stat trackers) and metrics, bit for bit."""
    assert _metrics(run) == _metrics(ref)
    names = [p.name for p in list_checkpoints(ref / "checkpoints")]
    if same_checkpoints:
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == names
    else:
        names = [latest_checkpoint(ref / "checkpoints")[0].name]
    for name in names:
        a, b = run / "checkpoints" / name, ref / "checkpoints" / name
        verify_checkpoint(a)
        for file in ("pytorch_lora_weights.safetensors", "critic.safetensors"):
            x, y = load_file(a / file), load_file(b / file)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name}/{file}"
        _assert_equal_tensors(torch.load(a / "optimizer.pt", weights_only=True),
                              torch.load(b / "optimizer.pt", weights_only=True), f"{name}/optimizer")
        state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
        assert state_a == state_b and state_a["dual"]["multipliers"], name


def assert_no_partial_checkpoint_visible(run: Path) -> None:
    """Everything under a loadable name is complete; leftovers of the killed writer are hidden names."""
    for path in list_checkpoints(run / "checkpoints"):
        verify_checkpoint(path)


def kill_and_resume(config: Path, ref: Path, point: str, out: Path) -> None:
    killed = run_cli(["train", "--config", str(config), "--out", str(out)], env={FAULT_ENV: point})
    assert killed.returncode == -signal.SIGKILL, f"{point}: not killed (rc {killed.returncode})\n{killed.stderr}"
    assert_no_partial_checkpoint_visible(out)
    expected = latest_checkpoint(out / "checkpoints")  # the newest complete, resumable checkpoint
    resumed = run_cli(["train", "--config", str(config), "--out", str(out), "--resume"])
    assert resumed.returncode == 0, f"{point}: {resumed.stderr}"
    match = re.search(r"resumed from (\S+) at epoch (\d+)", resumed.stderr)
    if expected is None:
        assert match is None, point  # killed before the first checkpoint: started over
    else:
        assert match and Path(match.group(1)) == expected[0] and int(match.group(2)) == expected[1]["epochs_done"], point
        assert re.fullmatch(r"epoch-\d{6}(-post-reset)?", expected[0].name), point
    assert "Traceback" not in resumed.stderr
    assert_same_final_state(out, ref)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "stale temp dirs left"


def _stratified(points: list[str], groups: list[tuple[str, ...]], rng: random.Random) -> list[str]:
    return [rng.choice([p for p in points if p.split(":")[0] in group]) for group in groups]


def test_three_kills_resume_bit_identically(config, reference, tmp_path):
    ref, points = reference
    for i, point in enumerate(_stratified(points, DEFAULT_GROUPS, random.Random(7))):
        kill_and_resume(config, ref, point, tmp_path / f"trial-{i}")


@pytest.mark.slow
def test_twenty_random_kills_resume_bit_identically(config, reference, tmp_path):
    ref, points = reference
    rng = random.Random(20)
    phases = sorted({p.split(":")[0] for p in points})
    chosen = _stratified(points, [(phase,) for phase in phases], rng)  # every phase at least once
    chosen += rng.sample([p for p in points if p not in chosen], 20 - len(chosen))
    for i, point in enumerate(chosen):
        kill_and_resume(config, ref, point, tmp_path / f"trial-{i}")


@pytest.mark.slow
def test_kill_during_resumed_run_then_resume_again(config, reference, tmp_path):
    """Two preemptions in a row, the second right in the first resumed process's checkpoint write."""
    ref, points = reference
    out = tmp_path / "run"
    first = run_cli(["train", "--config", str(config), "--out", str(out)], env={FAULT_ENV: "optimizer_step:6"})
    assert first.returncode == -signal.SIGKILL
    second = run_cli(["train", "--config", str(config), "--out", str(out), "--resume"], env={FAULT_ENV: "checkpoint_files:2"})
    assert second.returncode == -signal.SIGKILL
    assert_no_partial_checkpoint_visible(out)
    assert run_cli(["train", "--config", str(config), "--out", str(out), "--resume"]).returncode == 0
    assert_same_final_state(out, ref)


def _optimizer_steps_per_epoch(points: list[str]) -> int:
    return sum(p.startswith("optimizer_step:") for p in points) // EPOCHS


def test_sigterm_checkpoints_at_the_end_of_the_epoch(config, reference, tmp_path):
    """Regular checkpoints off (every 10 epochs): the epoch-3 checkpoint exists only because of SIGTERM."""
    ref, points = reference
    per_epoch = _optimizer_steps_per_epoch(points)
    out = tmp_path / "run"
    overrides = ["--set", "checkpointing.every_epochs=10", "--set", "checkpointing.termination_grace_s=120"]
    stopped = run_cli(["train", "--config", str(config), "--out", str(out), *overrides],
                      env={FAULT_ENV: f"term@optimizer_step:{2 * per_epoch + 1}"})  # early in epoch index 2
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr_lines()[-1].startswith("terminated: SIGTERM: stopped after epoch 2 with checkpoint epoch-000003")
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names[-1] == "epoch-000003" and "epoch-000001" not in names
    assert len(_metrics(out)) == 3
    resumed = run_cli(["train", "--config", str(config), "--out", str(out), "--resume", *overrides])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "epoch-000003 at epoch 3" in resumed.stderr
    assert_same_final_state(out, ref, same_checkpoints=False)


def test_sigterm_without_time_to_finish_stops_at_once(config, reference, tmp_path):
    """Grace 0: no new checkpoint is started; the newest valid one is named; resume is still exact."""
    ref, points = reference
    per_epoch = _optimizer_steps_per_epoch(points)
    out = tmp_path / "run"
    grace = ["--set", "checkpointing.termination_grace_s=0"]
    stopped = run_cli(["train", "--config", str(config), "--out", str(out), *grace],
                      env={FAULT_ENV: f"term@optimizer_step:{2 * per_epoch + 1}"})
    assert stopped.returncode == 143, stopped.stderr
    assert "cannot finish within the 0 s grace" in stopped.stderr and "newest is epoch-000002-post-reset" in stopped.stderr
    assert latest_checkpoint(out / "checkpoints")[0].name == "epoch-000002-post-reset"
    assert len(_metrics(out)) == 2
    assert run_cli(["train", "--config", str(config), "--out", str(out), "--resume", *grace]).returncode == 0
    assert_same_final_state(out, ref)


def test_real_sigterm_to_a_fresh_process_exits_within_the_grace(config, tmp_path):
    """What Kubernetes does: SIGTERM from outside to `python -m rewardtune.cli train`, then wait for the exit."""
    out = tmp_path / "run"
    grace = 20.0
    argv = ["train", "--config", str(config), "--out", str(out), "--set", "training.epochs=50",
            "--set", f"checkpointing.termination_grace_s={grace}"]
    proc = subprocess.Popen(cli_command(argv), env=exec_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=grace + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert took < grace, f"exit took {took:.1f} s"
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("terminated: SIGTERM")
    done = len(_metrics(out))
    newest = latest_checkpoint(out / "checkpoints")[0]
    assert verify_checkpoint(newest)["epochs_done"] == done  # every finished epoch is checkpointed


EVAL_SETTINGS = ["--set", "evaluation.num_heldout_prompts=2", "--set", "evaluation.num_train_prompts=1",
                 "--set", "evaluation.images_per_prompt=2", "--set", "evaluation.grid_prompts=1"]


def _eval_results(out: Path) -> dict[str, object]:
    """Every result file of every evaluated checkpoint, timing and hardware aside."""
    found: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_dir() or rel == "eval_settings.json":
            continue
        if path.name == "metrics.json":
            data = json.loads(path.read_text())
            found[rel] = {k: v for k, v in data.items() if k not in ("timing", "hardware")}
        else:
            found[rel] = path.read_bytes()
    return found


def test_evaluate_killed_mid_write_resumes_and_skips_finished_checkpoints(config, reference, tmp_path):
    ref, _ = reference
    straight = tmp_path / "straight"
    argv = ["evaluate", "--config", str(config), "--run", str(ref), *EVAL_SETTINGS]
    assert run_cli([*argv, "--out", str(straight)]).returncode == 0
    expected = _eval_results(straight)
    assert sum(name.endswith("metrics.json") for name in expected) >= 3

    out = tmp_path / "killed"
    killed = run_cli([*argv, "--out", str(out)], env={FAULT_ENV: "eval_write:3"})  # third checkpoint, before metrics.json
    assert killed.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(visible) == 2 and all((out / name / "metrics.json").is_file() for name in visible)
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")], "the killed write was in a temp dir"
    before = {name: (out / name / "metrics.json").stat().st_mtime_ns for name in visible}

    again = run_cli([*argv, "--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert all(f"checkpoint {name} already evaluated; skipped" in again.stderr for name in visible)
    assert {name: (out / name / "metrics.json").stat().st_mtime_ns for name in visible} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert _eval_results(out) == expected


def test_a_second_trainer_waits_for_the_run_directory_lock(config, tmp_path):
    """A retried pod starting while the old one still holds --out (its SIGTERM grace) waits, then refuses."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    holder = open(out / ".rewardtune.lock", "w")  # noqa: SIM115 - held across the calls below
    fcntl.flock(holder, fcntl.LOCK_EX)
    argv = ["train", "--config", str(config), "--out", str(out), "--set", "training.epochs=1"]
    refused = run_cli([*argv, "--set", "checkpointing.lock_wait_s=0"])
    assert refused.returncode == 2 and not (out / "checkpoints").exists()
    [line] = refused.stderr_lines()
    assert "is in use by another `rewardtune train`" in line and "choose another --out" in line

    waiting = start_cli([*argv, "--set", "checkpointing.lock_wait_s=120"])
    deadline = time.monotonic() + 100
    while "is locked by another run; waiting up to 120 s" not in waiting.stderr_so_far():
        assert time.monotonic() < deadline and waiting.process.is_alive(), waiting.stderr_so_far()
        time.sleep(0.1)
    assert not (out / "checkpoints").exists()  # it waits without writing
    holder.close()  # the old pod exits; the waiting one proceeds
    waited = waiting.wait()
    assert waited.returncode == 0, waited.stderr
    assert verify_checkpoint(out / "checkpoints" / "epoch-000001")["epochs_done"] == 1


def test_the_multi_gpu_launcher_passes_sigterm_on(tmp_path):
    """train_stage runs `accelerate launch` as a child: Kubernetes' SIGTERM to the stage must reach it."""
    import os
    import sys
    import threading

    from rewardtune.stages import run_forwarding_sigterm

    ready, got = tmp_path / "ready", tmp_path / "got-sigterm"
    child = (
        "import pathlib, signal, sys, time\n"
        f"def stop(*_):\n    pathlib.Path({str(got)!r}).touch(); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def terminate_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the forwarding handler is installed right after the child starts
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet does to the stage's process

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_ready, daemon=True).start()
    started = time.monotonic()
    assert run_forwarding_sigterm([sys.executable, "-c", child]) == 143
    assert got.exists() and time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back in place
