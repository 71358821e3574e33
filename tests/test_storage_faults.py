"""Storage faults against the loopback S3 server, injected by a proxy in front of it (tests/faulty_proxy.py).

Transient faults (500, 503, slow answers past the read timeout, dropped connections, truncated bodies)
must be absorbed by botocore's standard retry mode; a fault that outlasts the attempts must fail with
one line naming the object, leaving the previous state valid (no manifest for a half-uploaded model,
the previous local copy of a model untouched). A corrupted file is never handed to a loader.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from pathlib import Path

import pytest

from rewardtune.cache import (
    FILES,
    MANIFEST,
    CacheError,
    ModelRef,
    S3Cache,
    cache_key,
    cache_models,
    materialize,
    sha256_file,
)
from tests.faulty_proxy import FaultyProxy
from tests.test_cache import aws_env, s3_endpoint  # noqa: F401  (fixtures)

ATTEMPTS = 3
READ_TIMEOUT_S = 3.0


def _tree_sha(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def proxy(aws_env, s3_endpoint, monkeypatch):  # noqa: F811
    """Clients talk to the proxy; the retry budget and read timeout are small so faults cost seconds.

    The read timeout must still clear a pass-through upload on a loaded machine: at 0.5 s, a model file's PUT
    that took 1.05 s in a full suite run counted as a failed attempt. A "slow" answer stays well past it."""
    with FaultyProxy(s3_endpoint, slow_s=2 * READ_TIMEOUT_S) as faulty:
        monkeypatch.setenv("RT_S3_ENDPOINT_URL", faulty.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(ATTEMPTS))
        monkeypatch.setenv("RT_S3_READ_TIMEOUT_S", str(READ_TIMEOUT_S))
        monkeypatch.setenv("RT_S3_CONNECT_TIMEOUT_S", "2")
        yield faulty


@pytest.fixture
def bucket(proxy, s3_endpoint) -> str:  # noqa: F811
    import boto3

    name = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)  # straight to the server
    return name


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small model directory with five files (the tiny aesthetic reward)."""
    from rewardtune.rewards.tiny import init_tiny_rewards

    return Path(init_tiny_rewards(tmp_path_factory.mktemp("faults"), names=["aesthetic"])["aesthetic"])


def test_retry_policy_is_botocores_standard_mode(bucket):
    cache = S3Cache(f"s3://{bucket}/c")
    config = cache.client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": ATTEMPTS}
    assert config.read_timeout == READ_TIMEOUT_S and config.connect_timeout == 2


def test_upload_survives_500_503_slow_and_dropped_puts(model, bucket, proxy):
    rule = proxy.add("PUT", "/files/", ["500", "pass", "503", "pass", "drop", "pass", "slow", "pass"])
    head = proxy.add("HEAD", "/files/", ["503"])
    manifest_put = proxy.add("PUT", MANIFEST, ["drop"])
    uri = f"s3://{bucket}/c"
    [result] = cache_models([ModelRef(str(model))], uri)
    assert result.status == "cached" and result.uploaded == 5
    assert rule.faults_injected == 4 and head.faults_injected == 1 and manifest_put.faults_injected == 1
    proxy.clear()
    local = materialize(S3Cache(uri), result.key, label="m")
    assert _tree_sha(local) == _tree_sha(model)


def test_download_survives_503_dropped_truncated_and_slow_gets(model, bucket, proxy, tmp_path):
    uri = f"s3://{bucket}/c"
    [result] = cache_models([ModelRef(str(model))], uri)
    rule = proxy.add("GET", "/files/", ["503", "pass", "drop", "pass", "truncate", "pass", "slow", "pass"])
    manifest_get = proxy.add("GET", MANIFEST, ["500"])
    local = materialize(S3Cache(uri), result.key, dest_root=tmp_path / "work", label="m")
    assert rule.faults_injected == 4 and manifest_get.faults_injected == 1
    assert _tree_sha(local) == _tree_sha(model)


def test_upload_that_keeps_failing_names_the_object_and_writes_no_manifest(model, bucket, proxy, tmp_path, capsys):
    uri = f"s3://{bucket}/c"
    other = tmp_path / "other"  # a model cached before the outage: must stay valid
    other.mkdir()
    (other / "weights.bin").write_bytes(b"w" * 100)
    [previous] = cache_models([ModelRef(str(other))], uri)

    failing = proxy.add("PUT", "/files/", ["pass", "pass", *["503"] * ATTEMPTS])
    key = cache_key(ModelRef(str(model)))
    with pytest.raises(CacheError) as err:
        cache_models([ModelRef(str(model))], uri)
    message = str(err.value)
    assert failing.faults_injected == ATTEMPTS  # one request per attempt, then it gave up
    failed_rel = message.split(f"uploading s3://{bucket}/c/{key}/files/")[1].split(" ")[0]
    assert failed_rel in _tree_sha(model)  # a real file of the model, the one whose requests failed
    assert urllib.parse.unquote(failing.seen[-1].split(" ", 1)[1]).split("?")[0].endswith(f"/files/{failed_rel}")
    assert f"failed after {ATTEMPTS} attempt(s) (503 SlowDown)" in message and "\n" not in message
    assert "stays incomplete and is never loaded" in message
    proxy.clear()
    cache = S3Cache(uri)
    assert cache.read_manifest(key) is None
    with pytest.raises(CacheError, match="no manifest"):
        materialize(cache, key, dest_root=tmp_path / "work")
    assert _tree_sha(materialize(cache, previous.key, dest_root=tmp_path / "work")) == _tree_sha(other)

    from rewardtune.cli import main  # the CLI says the same in one line

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"source": str(model)}, "reward": {"name": "brightness"}}))
    proxy.add("PUT", "/files/", ["503"] * ATTEMPTS)
    capsys.readouterr()
    assert main(["cache-models", "--config", str(config), "--cache", uri]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (moto logs here too)
    assert len(errors) == 1 and errors[0].startswith(f"error: uploading s3://{bucket}/c/{key}/files/")


def test_download_that_keeps_failing_keeps_the_previous_local_copy(model, bucket, proxy, tmp_path):
    uri = f"s3://{bucket}/c"
    [result] = cache_models([ModelRef(str(model))], uri)
    work = tmp_path / "work"
    local = materialize(S3Cache(uri), result.key, dest_root=work, label="m")
    before = _tree_sha(local.parent)

    # the cache entry gets a new version (one file changed), then the store goes bad mid-download
    cache = S3Cache(uri)
    manifest = cache.read_manifest(result.key)
    changed = model.parent / "v2"
    changed.mkdir()
    (changed / "new.bin").write_bytes(b"v2")
    cache.put_file(result.key, "new.bin", changed / "new.bin", sha256_file(changed / "new.bin"))
    manifest["files"]["new.bin"] = {"size": 2, "sha256": sha256_file(changed / "new.bin")}
    cache.put_manifest(result.key, manifest)
    proxy.add("GET", "/files/", ["pass", *["503"] * ATTEMPTS])
    with pytest.raises(CacheError, match=rf"downloading s3://{bucket}/c/{result.key}/files/\S+ failed after {ATTEMPTS} "
                       r"attempt\(s\) \(503 SlowDown\); the local model directory was left as it was"):
        materialize(S3Cache(uri), result.key, dest_root=work, label="m")
    assert _tree_sha(local.parent) == before  # the previous version, complete and verified
    assert sorted(p.name for p in work.iterdir()) == [result.key], "no staging directory left behind"


def test_locally_corrupted_copy_is_never_loaded_and_is_fetched_again(model, bucket, proxy, tmp_path, caplog):
    uri = f"s3://{bucket}/c"
    [result] = cache_models([ModelRef(str(model))], uri)
    work = tmp_path / "work"
    local = materialize(S3Cache(uri), result.key, dest_root=work, label="m")
    target = next(p for p in sorted(local.rglob("*")) if p.is_file())
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    gets = proxy.add("GET", "/files/", [])
    again = materialize(S3Cache(uri), result.key, dest_root=work, label="m")
    assert "is corrupt (sha256 mismatch)" in caplog.text and "downloading it again" in caplog.text
    assert _tree_sha(again) == _tree_sha(model) and len(gets.seen) == 5

    # corrupt in the store itself: refused, and nothing is left where a loader would look
    import boto3

    client = boto3.client("s3", endpoint_url=proxy.upstream.geturl())
    rel = target.relative_to(local).as_posix()
    obj_key = f"c/{result.key}/{FILES}/{rel}"
    client.put_object(Bucket=bucket, Key=obj_key, Body=bytes(data))
    fresh = tmp_path / "fresh"
    with pytest.raises(CacheError, match=rf"{rel} is corrupt \(sha256 mismatch\)"):
        materialize(S3Cache(uri), result.key, dest_root=fresh, label="m")
    assert not (fresh / result.key).exists() and not [p for p in fresh.iterdir() if p.name.startswith(".")]


def test_directory_cache_write_failure_is_one_line_and_leaves_no_manifest(model, tmp_path):
    """The PVC flavour: a write that fails (here: a file where a directory must go) names the path."""
    cache_dir = tmp_path / "pvc"
    key = cache_key(ModelRef(str(model)))
    (cache_dir / key).mkdir(parents=True)
    (cache_dir / key / FILES).write_text("not a directory")
    with pytest.raises(CacheError, match=rf"writing {re.escape(str(cache_dir / key / FILES))}/\S+ failed .*stays incomplete"):
        cache_models([ModelRef(str(model))], str(cache_dir))
    assert not (cache_dir / key / MANIFEST).exists()
