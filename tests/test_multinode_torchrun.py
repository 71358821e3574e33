"""Two "nodes" on localhost, launched exactly as a Kubeflow Trainer TrainJob launches them.

Each node is its own `torchrun` (one process each) that reads nnodes / node rank / master address and port
only from the PET_* variables the Trainer's torch plugin injects, with the command `build_trainjob` puts in the
TrainJob. With one shared run directory, a run interrupted after epoch 1 and resumed ends bit-identical to an
uninterrupted one; with a directory per node, both nodes stop with one clear error instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rewardtune.trainjob import torchrun_command
from tests.conftest import tiny_config_dict

TIMING = ("images_per_s", "time_sampling_s", "time_reward_s", "time_reward_wait_s", "time_training_s")
NODE_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    data = tiny_config_dict(
        tiny_model_dir, sampling={"batches_per_epoch": 1, "batch_size": 2, "num_steps": 3},
        training={"epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "seed": 5},
        checkpointing={"every_epochs": 1, "keep_last": 2},
    )
    path = tmp_path_factory.mktemp("multinode") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _two_nodes(config: Path, out_dirs: tuple[Path, Path], *extra: str) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 at once, as the TrainJob's two pods; returns both results."""
    port = _free_port()
    procs = []
    for rank, out in enumerate(out_dirs):
        command = torchrun_command(str(config), str(out), grace_s=25)
        assert command[0] == "torchrun"
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command[1:], *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=NODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a node did not finish within {NODE_TIMEOUT_S} s (deadlock?)")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(checkpoint: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint, from its manifest (the trainer verifies them on load)."""
    return json.loads((checkpoint / "manifest.json").read_text())["files"]


def test_a_directory_per_node_is_refused_not_deadlocked(config, tmp_path):
    results = _two_nodes(config, (tmp_path / "node0", tmp_path / "node1"))
    for rank, result in enumerate(results):
        assert result.returncode != 0
        line = next(ln for ln in result.stderr.splitlines() if ln.startswith("error: "))
        assert "is not shared between the training processes" in line and "ReadWriteMany" in line, rank
        assert "rank 1" in line
    assert not (tmp_path / "node0" / "checkpoints").exists()


def test_two_nodes_resume_bit_identically_from_a_shared_directory(config, tmp_path):
    full = tmp_path / "full"
    for result in _two_nodes(config, (full, full)):
        assert result.returncode == 0, result.stderr[-3000:]
    part = tmp_path / "part"
    for result in _two_nodes(config, (part, part), "--set", "training.epochs=1"):
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(_metrics(part)) == 1
    for result in _two_nodes(config, (part, part)):  # the relaunched TrainJob: same command, --resume
        assert result.returncode == 0, result.stderr[-3000:]
    assert _metrics(part) == _metrics(full) and len(_metrics(full)) == 2
    assert _metrics(full)[0]["samples"] == 2 * 2  # two nodes x sampling.batch_size 2: both processes sampled
    first, last = (_files(full / "checkpoints" / f"epoch-00000{e}") for e in (1, 2))
    weights = next(k for k in last if k.startswith("unet/") and k.endswith(".safetensors"))
    assert first[weights] != last[weights]  # epoch 2 trained: the equality below is not of untouched weights
    assert _files(part / "checkpoints" / "epoch-000002") == last
