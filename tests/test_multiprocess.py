"""Two processes on CPU (gloo), as a multi-GPU run uses them: replicas stay bit-identical through epochs
and neuron resets, resume is exact, statistics are global, 2 × b equals 1 × 2b, and SIGTERM to one rank
or to the launcher stops both ranks with a checkpoint and exit 143 from the stage.

Launching interpreters dominates the cost, so every check without a signal shares one launch
(tests/mp_driver.py, started with `accelerate launch --multi_gpu`, the README's command); the two
SIGTERM checks start the train stage, which launches with torchrun.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from rewardtune.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from rewardtune.config import parse_config
from rewardtune.trainer import TERMINATED_FILE, EpochTimes, Trainer
from tests.cli_runner import exec_env
from tests.conftest import tiny_config_dict
from tests.mp_driver import SAMPLE_FIELDS, capture_gradients, keep_order
from tests.test_preemption import assert_same_final_state

WORLD = 2
B = 2  # samples per process and epoch
PROMPTS = ["a cat", "a dog"]  # few prompts, so the per-prompt statistics pool samples of both ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict:
    from rewardtune.rewards.tiny import init_tiny_rewards

    root = tmp_path_factory.mktemp("mp")
    aesthetic = init_tiny_rewards(root / "rewards", names=["aesthetic"])["aesthetic"]
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def config(name: str, algorithm: dict, **sections) -> Path:
        data = tiny_config_dict(
            tiny_model_dir, model={"finetune": "lora"}, prompts={"source": str(prompts)},
            reward={"name": "aesthetic", "source": aesthetic}, algorithm=algorithm,
            sampling={"batches_per_epoch": 1, "batch_size": B, "num_steps": 4},
            training={"epochs": 2, "batch_size": 1, "gradient_accumulation_steps": 2, "seed": 3},
            checkpointing={"every_epochs": 1, "keep_last": 5},
        )
        for section, values in sections.items():
            data[section].update(values)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return {"root": root, "config": config, "prompts": prompts}


CDPO = {"name": "cdpo", "reset": {"every": 1}, "lagrange": {"learning_rate": 1.0},
        "constraints": [{"reward": {"name": "jpeg_compressibility"}, "relative_margin": 0.0}]}
# one optimizer step per epoch, no dropout: the gradient is a plain mean over the epoch's (sample, step) pairs.
# DDPO accumulates over all 4 steps; TDPO steps once per time column, so it trains one column.
GRAD_ALGORITHMS = {
    "ddpo": ({"name": "ddpo"}, 1.0),
    "tdpo": ({"name": "tdpo", "critic": {"dropout": [0.0, 0.0, 0.0, 0.0], "advantage_norm": "per_prompt"}}, 0.25),
}


def _grad_config(setup, name: str, world: int) -> Path:
    per_process = WORLD * B // world
    algorithm, fraction = GRAD_ALGORITHMS[name]
    return setup["config"](
        f"grad-{name}-{world}", algorithm, sampling={"batch_size": per_process},
        training={"gradient_accumulation_steps": per_process, "timestep_fraction": fraction, "epochs": 1,
                  "stat_tracking": {"enabled": True, "min_count": 2, "buffer_size": 16}},
    )


def _single_process_reference(setup, name: str) -> tuple[Path, dict]:
    """One process with 2b samples: the samples (stored before their advantages) and its one step's gradients."""
    trainer = Trainer(parse_config(yaml.safe_load(_grad_config(setup, name, 1).read_text())), setup["root"] / f"ref-{name}")
    samples = trainer.sample_epoch(0, EpochTimes())
    stored = {"prompts": list(samples.prompts), **{k: getattr(samples, k).clone() for k in SAMPLE_FIELDS},
              "extras": {k: v.clone() for k, v in samples.extras.items()}}
    trainer.compute_advantages(samples)
    grads = capture_gradients(trainer)
    keep_order(trainer)
    stats = trainer.train_epoch(samples, 0)
    path = setup["root"] / f"ref-{name}.pt"
    torch.save({"samples": stored}, path)
    return path, {"grads": grads, "stats": stats, "advantages": samples.advantages}


def _launch_driver(spec: list[dict], path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--main_process_port", "0", "-m", "tests.mp_driver", str(path)]
    return subprocess.run(cmd, env=exec_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=900)


def _digests(directory: Path) -> list[dict]:
    ranks = [[json.loads(line) for line in (directory / f"rank-{r}.jsonl").read_text().splitlines()] for r in range(WORLD)]
    assert all(rank == ranks[0] for rank in ranks), f"replicas differ: {directory.name}"
    return ranks[0]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_stay_identical_resume_exactly_and_match_one_process(setup):
    root, config = setup["root"], setup["config"]
    runs = {"ddpo": config("ddpo", {"name": "ddpo"}),
            "tdpo_r": config("tdpo_r", {"name": "tdpo_r", "reset": {"every": 1}}),
            "cdpo": config("cdpo", CDPO),
            "grpo_kl": config("grpo_kl", {"name": "grpo", "group": {"group_size": 2, "kl_coef": 0.5}}),
            "tdpo_kl": config("tdpo_kl", {"name": "tdpo", "critic": {"kl_coef": 0.5, "kl_target": 1e-3}})}
    spec = [{"kind": "train", "config": str(path), "out": str(root / name), "digests": str(root / f"digests-{name}")}
            for name, path in runs.items()]
    split = root / "cdpo-split"
    spec += [{"kind": "train", "config": str(runs["cdpo"]), "out": str(split), "digests": str(root / "digests-split"),
              "sets": ["training.epochs=1"]},
             {"kind": "train", "config": str(runs["cdpo"]), "out": str(split), "digests": str(root / "digests-split"),
              "resume": True}]
    references = {}
    for name in GRAD_ALGORITHMS:
        reference, references[name] = _single_process_reference(setup, name)
        spec.append({"kind": "grad", "config": str(_grad_config(setup, name, WORLD)), "reference": str(reference),
                     "out": str(root / f"grad-{name}.pt")})
    started = time.monotonic()
    launched = _launch_driver(spec, root / "spec.json")
    assert launched.returncode == 0, launched.stderr[-4000:]
    print(f"driver launch: {time.monotonic() - started:.0f} s")

    for name in runs:  # every rank's policy, critic and Adam state agree after every epoch and every reset
        records = _digests(root / f"digests-{name}")
        resets = name in ("tdpo_r", "cdpo")
        critic = resets or name == "tdpo_kl"
        expected = [("reset", 0), ("epoch", 0), ("reset", 1), ("epoch", 1)] if resets else [("epoch", 0), ("epoch", 1)]
        assert [(r["phase"], r["epoch"]) for r in records] == expected, name
        assert ("critic" in records[0]) == critic
        assert len({r["policy"] for r in records if r["phase"] == "epoch"}) == 2  # it trained
        metrics = _metrics(root / name)
        assert [m["samples"] for m in metrics] == [WORLD * B, 2 * WORLD * B], "not two processes"
        if resets:
            assert all(m["reset"] and m["neurons_reset"] > 0 for m in metrics)
        if name == "grpo_kl":  # GRPO's KL to the base policy (LoRA adapters off on the unwrapped model) on 2 ranks
            assert all(math.isfinite(m["kl_to_reference"]) for m in metrics) and metrics[1]["kl_to_reference"] > 0
        if name == "tdpo_kl":  # TDPO's per-step KL penalty with the adaptive controller, fed by all ranks' samples
            assert metrics[0]["kl_mean"] == pytest.approx(0, abs=1e-6)  # epoch 0 samples the base policy itself
            assert metrics[1]["kl_mean"] != 0 and metrics[1]["kl_controller"] != metrics[0]["kl_controller"]

    # --resume with two processes continues exactly as the uninterrupted two-process run
    assert _digests(root / "digests-split") == _digests(root / "digests-cdpo")
    assert_same_final_state(split, root / "cdpo")

    for name, ref in references.items():  # 2 processes x b samples == 1 process x 2b on the same samples
        got = torch.load(root / f"grad-{name}.pt", weights_only=True)
        assert got["world"] == WORLD
        torch.testing.assert_close(got["advantages"], ref["advantages"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == ref["grads"].keys() and any("critic" in k for k in ref["grads"]) == (name == "tdpo")
        # relative to the network's whole gradient; the sums run in another order (16 micro-steps in one process,
        # 2 x 8 plus an all-reduce in two) over terms that largely cancel (standardized advantages): float32
        # rounding alone reaches ~2e-5 here (measured), hence 1e-4; a wrong reduction is off by O(1)
        for network in ("policy", "critic"):
            keys = [k for k in ref["grads"] if k.startswith(network)]
            if keys:
                expected = torch.cat([ref["grads"][k].flatten() for k in keys])
                error = (torch.cat([got["grads"][k].flatten() for k in keys]) - expected).norm() / expected.norm()
                print(f"{name} {network} gradient: relative error {float(error):.2e} over {expected.numel()} entries")
                assert 0 < expected.norm() and error <= 1e-4, (name, network, float(error))
        for key, value in ref["stats"].items():  # logged statistics are over all ranks' samples
            assert got["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)


# ------------------------------------------------------------------ SIGTERM under the launcher
def _worker_pids(tag: str) -> dict[int, int]:
    """{rank: pid} of the training processes started with RT_TEST_TAG=tag."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("RT_TEST_TAG") == tag and "LOCAL_RANK" in env and "rewardtune.cli" in (entry / "cmdline").read_text():
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_sigterm_stops_both_ranks_with_a_checkpoint_and_the_stage_exits_143(setup, tmp_path, target):
    """The pipeline's train step (`train_for_pipeline`, two processes through torchrun) gets SIGTERM itself,
    as from Kubernetes, or one rank does; both ranks finish the epoch, checkpoint it, and the step exits 143."""
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "train.txt").write_text(setup["prompts"].read_text())
    config = setup["config"](f"sigterm-{target[0]}", {"name": "ddpo"},
                             training={"epochs": 50}, checkpointing={"every_epochs": 100, "termination_grace_s": 60})
    out, tag = tmp_path / "run", uuid.uuid4().hex
    body = ("from rewardtune.stages import train_for_pipeline\n"
            f"train_for_pipeline({str(config)!r}, {str(prompts_dir)!r}, {str(out)!r}, num_gpus={WORLD})\n")
    env = exec_env({"RT_TEST_TAG": tag, "RT_DIGEST_DIR": str(tmp_path / "digests"), "OMP_NUM_THREADS": "1"})
    stage = subprocess.Popen([sys.executable, "-c", body], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()[1][-3000:]
            time.sleep(0.2)
        pids = _worker_pids(tag)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1] if target == "rank 1" else stage.pid, signal.SIGTERM)
        _, stderr = stage.communicate(timeout=200)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert stage.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("terminated: SIGTERM: stopped after epoch"), last
    done = len(_metrics(out))
    newest = latest_checkpoint(out / "checkpoints")[0]
    assert verify_checkpoint(newest)["epochs_done"] == done and newest.name in last
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [newest.name]  # only the SIGTERM one
    records = _digests(tmp_path / "digests")  # both ranks finished the stopped epoch, identically
    assert [r["epoch"] for r in records] == list(range(done))
    assert json.loads((out / TERMINATED_FILE).read_text())["epochs_done"] == done
    assert not _worker_pids(tag), "a training process outlived the stage"


# ------------------------------------------------------------------ pure helpers (fast)
def test_tensor_digest_sees_names_order_and_every_bit():
    import hashlib

    from rewardtune.digests import tensors_digest

    assert tensors_digest([]) == hashlib.sha256().hexdigest()
    a, b = torch.zeros(3), torch.ones(2)
    base = tensors_digest([("a", a), ("b", b)])
    assert base == tensors_digest([("a", a.clone()), ("b", b.clone())])
    assert base != tensors_digest([("b", b), ("a", a)])
    assert base != tensors_digest([("x", a), ("b", b)])
    flipped = a.clone()
    flipped.view(torch.int32)[1] ^= 1  # one bit of one float: the smallest possible replica drift
    assert base != tensors_digest([("a", flipped), ("b", b)])


def test_launcher_gets_a_shutdown_timeout_above_the_grace_and_starts_n_processes():
    from rewardtune.stages import SHUTDOWN_MARGIN_S, launcher_env, multi_process_command

    assert launcher_env(45.0, {})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(45 + SHUTDOWN_MARGIN_S)
    assert launcher_env(0.5, {})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(1 + SHUTDOWN_MARGIN_S)
    assert launcher_env(45.0, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"
    assert launcher_env(45.0, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "x"})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "60"
    cmd = multi_process_command(4, ["--config", "c.yaml"])
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert cmd[7:] == ["rewardtune.cli", "train", "--config", "c.yaml"] and "--cpu" not in cmd


def test_optimizer_state_errors_say_what_is_wrong(tmp_path):
    from rewardtune.errors import CheckpointError
    from rewardtune.trainer import load_optimizer_state

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(2)
    optimizer.step()
    good = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), good)
    assert torch.equal(load_optimizer_state(good)["state"][0]["exp_avg"], optimizer.state[param]["exp_avg"])
    truncated = tmp_path / "truncated" / "optimizer.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.pt could not be read") as err:
        load_optimizer_state(truncated)
    assert "weights-only" not in str(err.value)
