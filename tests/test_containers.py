"""Every stage in real containers of the built images, exactly as the README's container block tells a user.

Needs a container runtime (podman, or a docker daemon) and both images (`make images`); without them every
test skips and says which is missing. `make test` deselects the marker (`make test-containers` runs it): the
images take minutes to build and CI machines start without a runtime (docs/containers.md has the times).

What a pod would hit and a subprocess run never does: the image's entrypoint and venv, its non-root user
writing a mounted volume, stages chained only through files in that volume, `podman kill` (SIGKILL, as
`docker kill` and an evicted pod's last resort) mid-epoch and the same command again.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "images"))
import build as images_build  # noqa: E402  (images/build.py: the one place names and tags live)

sys.path.remove(str(REPO / "images"))

CPU = images_build.image_ref("cpu")
TRAINER = images_build.image_ref("trainer")
IMAGE_UID = 1000  # USER 1000:1000 in both Dockerfiles
README_MARK = "<!-- containers: the stages under podman run (tests/test_containers.py runs this block) -->"
TIMING = ("images_per_s", "time_sampling_s", "time_reward_s", "time_reward_wait_s", "time_training_s")


def _skip_reason() -> str | None:
    runtime = images_build.detect_runtime()
    if runtime is None:
        return "no container runtime (podman, or docker with a daemon): bash ../shared/tools/container-runtime.sh"
    missing = [ref for ref in (CPU, TRAINER) if not images_build.image_exists(runtime, ref)]
    if missing:
        return f"{runtime} has no image {', '.join(missing)}: build them with `make images`"
    return None


SKIP = _skip_reason()
RUNTIME = images_build.detect_runtime() or "podman"
pytestmark = [pytest.mark.containers, pytest.mark.skipif(SKIP is not None, reason=str(SKIP)),
              pytest.mark.timeout(1800)]


def readme_block() -> str:
    """The README's container block (the bash fence after README_MARK), for the runtime at hand."""
    text = (REPO / "README.md").read_text()
    assert README_MARK in text, "README lost the container block this test runs"
    block = re.search(r"```bash\n(.*?)```", text.split(README_MARK, 1)[1], re.S).group(1)
    return block if RUNTIME == "podman" else block.replace("podman run", f"{RUNTIME} run")


def container_env(work: Path) -> dict[str, str]:
    return {**os.environ, "W": str(work)}


def run(args: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def writable_by_image(path: Path) -> Path:
    """A host directory the image's uid can write: owned by it when we can chown (root), else open to all."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    else:
        path.chmod(0o777)
    return path


def stage(work: Path, image: str, *args: str, cache: bool = False, name: str | None = None,
          extra: tuple[str, ...] = ()) -> list[str]:
    """The README's `$RUN [$CACHE] IMAGE stage ...` as an argv."""
    cmd = [RUNTIME, "run", "--rm", "-v", f"{work}:/work", *extra]
    if name:
        cmd += ["--name", name]
    if cache:
        cmd += ["-e", "RT_MODEL_CACHE=/work/model-cache"]
    return [*cmd, image, *args]


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def checkpoint_digests(run_dir: Path) -> dict[str, dict]:
    """{checkpoint: {file: sha256}} from each checkpoint's manifest (written last, verified on load)."""
    out = {}
    for manifest in sorted((run_dir / "checkpoints").glob("epoch-*/manifest.json")):
        files = json.loads(manifest.read_text())["files"]
        out[manifest.parent.name] = {name: entry["sha256"] for name, entry in files.items()}
    return out


@pytest.fixture(scope="module")
def chained(tmp_path_factory) -> Path:
    """The README's container block run by bash as written: every stage in its own container, one mount."""
    work = tmp_path_factory.mktemp("containers") / "work"
    script = work.parent / "stages.sh"
    script.write_text("set -euxo pipefail\n" + readme_block())
    start = time.perf_counter()
    proc = run(["bash", str(script)], timeout=1500, cwd=REPO, env=container_env(work))
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    print(f"README container block: {elapsed:.0f} s")
    return work


def test_images_hold_kfp_run_non_root_and_the_cpu_image_has_no_cuda():
    probe = ("import importlib.metadata as m, os, kfp, torch; "
             "print(os.getuid(), kfp.__version__, torch.__version__, "
             "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')))")
    for image in (CPU, TRAINER):
        proc = run([RUNTIME, "run", "--rm", "--entrypoint", "python", image, "-c", probe], timeout=300)
        assert proc.returncode == 0, proc.stderr
        uid, kfp_version, torch_version, nvidia = proc.stdout.split(" ", 3)
        assert int(uid) == IMAGE_UID and kfp_version == "2.17.0", proc.stdout
        if image == CPU:
            assert torch_version.endswith("+cpu") and nvidia.strip() == "[]", proc.stdout
    proc = run([RUNTIME, "run", "--rm", CPU, "--help"], timeout=300)  # the entrypoint is the CLI
    assert proc.returncode == 0 and "prepare-prompts" in proc.stdout


def test_every_stage_chains_through_one_mount(chained):
    work = chained
    assert (work / "tiny-sd" / "model_index.json").is_file()
    assert (work / "prompts" / "train.txt").read_text().strip() and (work / "prompts" / "heldout.txt").is_file()
    assert list((work / "model-cache").glob("*/rewardtune-manifest.json")), "cache-models wrote no complete entry"
    records = metrics(work / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3], "train (2 epochs) then train --resume (to 4)"
    assert set(checkpoint_digests(work / "run")) == {f"epoch-{i:06d}" for i in (1, 2, 3, 4)}
    assert {p.name for p in (work / "eval").iterdir() if p.is_dir()} == {"base", *checkpoint_digests(work / "run")}
    assert "<html" in (work / "report" / "report.html").read_text()[:2000].lower()
    assert json.loads((work / "report" / "headline.json").read_text())
    assert (work / "model" / "model_index.json").is_file() and (work / "model" / "rewardtune_export.json").is_file()
    owners = {p.stat().st_uid for p in (work / "run").rglob("*")}
    assert owners == {IMAGE_UID}, f"files written by uids {owners}: the stages must run as the image's user"


def test_an_unwritable_mount_is_one_error_line_naming_the_fix(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o755)  # owned by this (host) user, not by the image's uid 1000
    if os.geteuid() == IMAGE_UID:
        pytest.skip("the host user is the image's uid: every mount it owns is writable in the container")
    (locked / "config.yaml").write_text((REPO / "configs" / "containers.yaml").read_text())
    for image, args in ((CPU, ["prepare-prompts", "--config", "/work/config.yaml", "--out", "/work/prompts"]),
                        (TRAINER, ["init-tiny", "--out", "/work/tiny-sd"])):
        proc = run(stage(locked, image, *args), timeout=600)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr
        assert sum(line.startswith("error:") for line in lines) == 1
        assert "/work/" in lines[-1] and " -u " in lines[-1] and "fsGroup" in lines[-1], lines[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(tmp_path):
    """A moto S3 server on the host's loopback (the containers share the host's network: --network host)."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield endpoint, bucket, client
    server.stop()


def test_cache_models_to_s3_then_train_from_it(chained, s3, tmp_path):
    endpoint, bucket, client = s3
    work = writable_by_image(tmp_path / "work")
    (work / "config.yaml").write_text((REPO / "configs" / "containers.yaml").read_text())
    run(["cp", "-a", str(chained / "tiny-sd"), str(work / "tiny-sd")], timeout=60)
    aws = ("--network", "host", "-e", f"AWS_ENDPOINT_URL={endpoint}", "-e", "AWS_ACCESS_KEY_ID=testing",
           "-e", "AWS_SECRET_ACCESS_KEY=testing", "-e", "AWS_DEFAULT_REGION=us-east-1")
    uri = f"s3://{bucket}/cache"
    proc = run(stage(work, TRAINER, "cache-models", "--config", "/work/config.yaml", "--cache", uri, extra=aws))
    assert proc.returncode == 0, proc.stderr[-4000:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("rewardtune-manifest.json") for k in keys) and any(k.endswith(".safetensors") for k in keys), keys
    proc = run(stage(work, TRAINER, "train", "--config", "/work/config.yaml", "--out", "/work/run", "--set",
                     "training.epochs=1", extra=(*aws, "-e", f"RT_MODEL_CACHE={uri}")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["epoch"] for r in metrics(work / "run")] == [0]


def test_train_killed_mid_epoch_then_the_same_command_resumes_bit_identically(chained, tmp_path):
    """`podman kill` (SIGKILL) while epoch k+1 runs, then the same `train --resume` again: it continues from
    epoch-k and ends with the checkpoints (sha256 of every file) and metrics of an uninterrupted run."""
    work = writable_by_image(tmp_path / "work")
    (work / "config.yaml").write_text((REPO / "configs" / "containers.yaml").read_text())
    for name in ("tiny-sd", "prompts", "model-cache"):
        run(["cp", "-a", str(chained / name), str(work / name)], timeout=120)
    epochs = 6
    args = ("train", "--config", "/work/config.yaml", "--set", "prompts.source=/work/prompts/train.txt",
            "--set", f"training.epochs={epochs}", "--resume")
    reference = run(stage(work, TRAINER, *args, "--out", "/work/reference", cache=True))
    assert reference.returncode == 0, reference.stderr[-4000:]
    ref_records = metrics(work / "reference")
    raw = [json.loads(line) for line in (work / "reference" / "metrics.jsonl").read_text().splitlines()]
    epoch_s = sum(r[k] or 0 for r in raw for k in TIMING[1:]) / epochs

    name = f"rt-kill-{uuid.uuid4().hex[:8]}"
    command = stage(work, TRAINER, *args, "--out", "/work/killed", cache=True, name=name)
    started = run([*command[:2], "-d", *command[2:]], timeout=120)
    assert started.returncode == 0, started.stderr
    metrics_file = work / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # two epochs done and checkpointed, the third under way
        if metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the detached train container wrote no second epoch in 600 s")
    time.sleep(max(0.2, epoch_s / 2))
    kill = run([RUNTIME, "kill", name], timeout=60)
    assert kill.returncode == 0, kill.stderr
    done = len(metrics_file.read_text().splitlines())
    assert done < epochs, f"killed too late: {done} of {epochs} epochs were already done"
    kept = checkpoint_digests(work / "killed")
    assert kept, "killed before the first checkpoint"
    run([RUNTIME, "wait", name], timeout=60)  # --rm: gone once it has exited; the name is free again
    run([RUNTIME, "rm", "-f", name], timeout=60)

    resumed = run(command, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    match = re.search(r"resumed from (\S+) at epoch (\d+)", resumed.stderr)
    assert match and Path(match.group(1)).name == max(kept), resumed.stderr[-3000:]
    assert metrics(work / "killed") == ref_records
    print(f"podman kill after {done} of {epochs} epochs, then: {match.group(0)}")
    assert checkpoint_digests(work / "killed") == checkpoint_digests(work / "reference")
