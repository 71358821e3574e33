"""The model cache against a real S3-protocol server on loopback (moto's ThreadedMotoServer; no boto3 mocks)."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import uuid
from pathlib import Path

import pytest
import torch

from rewardtune.cache import (
    MANIFEST,
    CacheError,
    DirCache,
    ModelRef,
    S3Cache,
    cache_key,
    cache_models,
    materialize,
    resolve_source,
    sha256_file,
)
from rewardtune.config import RewardSpec, parse_config
from rewardtune.rewards import build_reward
from tests.conftest import tiny_config_dict

_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, s3_endpoint, tmp_path):
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("RT_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("RT_MODEL_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("RT_MODEL_CACHE", raising=False)


@pytest.fixture
def bucket(aws_env, s3_endpoint) -> str:
    import boto3

    name = f"models-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _tree_sha(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_s3_round_trip_of_a_tiny_reward(tiny_rewards, bucket):
    source = tiny_rewards["aesthetic"]
    uri = f"s3://{bucket}/cache"
    [result] = cache_models([ModelRef(source)], uri)
    assert result.status == "cached" and result.uploaded == len(_tree_sha(Path(source)))
    manifest = S3Cache(uri).read_manifest(result.key)
    assert manifest["source"] == source and manifest["files"]
    assert all(set(meta) == {"size", "sha256"} for meta in manifest["files"].values())

    local = resolve_source(f"{uri}/{result.key}")
    assert _tree_sha(local) == _tree_sha(Path(source))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from_cache = build_reward(RewardSpec(name="aesthetic", source=f"{uri}/{result.key}"), "cpu")(images, ["a", "b"])
    direct = build_reward(RewardSpec(name="aesthetic", source=source), "cpu")(images, ["a", "b"])
    torch.testing.assert_close(from_cache, direct, rtol=0, atol=0)


def test_second_run_skips(tiny_rewards, bucket):
    refs = [ModelRef(tiny_rewards["pickscore"])]
    first = cache_models(refs, f"s3://{bucket}/c")
    again = cache_models(refs, f"s3://{bucket}/c")
    assert [r.status for r in first] == ["cached"] and [r.status for r in again] == ["skipped"]
    assert again[0].uploaded == 0


def test_flipped_byte_is_detected(tiny_rewards, bucket, s3_endpoint):
    import boto3

    [result] = cache_models([ModelRef(tiny_rewards["aesthetic"])], f"s3://{bucket}/c")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    key = f"c/{result.key}/files/sac+logos+ava1-l14-linearMSE.pth"
    obj = client.get_object(Bucket=bucket, Key=key)
    body = bytearray(obj["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=obj["Metadata"])
    with pytest.raises(CacheError, match=r"corrupt \(sha256 mismatch\).*s3://.*/c/") as err:
        resolve_source(f"s3://{bucket}/c/{result.key}")
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(err.value)


def test_interrupted_upload_leaves_no_manifest_and_rerun_completes(tiny_rewards, bucket, monkeypatch):
    uri = f"s3://{bucket}/c"
    source = tiny_rewards["imagereward"]
    original = S3Cache.put_file
    calls = {"n": 0}

    def flaky(self, key, rel, local, sha):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("network dropped")
        return original(self, key, rel, local, sha)

    monkeypatch.setattr(S3Cache, "put_file", flaky)
    with pytest.raises(ConnectionError):
        cache_models([ModelRef(source)], uri)
    key = cache_key(ModelRef(source))
    assert S3Cache(uri).read_manifest(key) is None
    with pytest.raises(CacheError, match=f"not in cache {uri}.*no manifest"):
        resolve_source(f"{uri}/{key}")

    monkeypatch.setattr(S3Cache, "put_file", original)
    [result] = cache_models([ModelRef(source)], uri)
    assert result.status == "cached" and result.reused == 2  # the two files that made it are not re-sent
    assert result.uploaded + result.reused == len(_tree_sha(Path(source)))
    assert _tree_sha(resolve_source(f"{uri}/{key}")) == _tree_sha(Path(source))


def test_missing_credentials_and_bucket_are_one_line_errors(tiny_rewards, aws_env, monkeypatch):
    with pytest.raises(CacheError, match=r"bucket 'no-such-bucket' of cache s3://no-such-bucket/p does not exist"):
        cache_models([ModelRef(tiny_rewards["aesthetic"])], "s3://no-such-bucket/p")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CacheError, match=r"no AWS credentials for cache s3://b/p: set AWS_ACCESS_KEY_ID") as err:
        cache_models([ModelRef(tiny_rewards["aesthetic"])], "s3://b/p")
    assert "\n" not in str(err.value) and "testing" not in str(err.value)


def test_directory_cache_verifies_in_place(tiny_rewards, tmp_path):
    cache_dir = tmp_path / "pvc"
    [result] = cache_models([ModelRef(tiny_rewards["hpsv2"])], str(cache_dir))
    entry = cache_dir / result.key
    assert (entry / MANIFEST).is_file()
    assert resolve_source(str(entry)) == entry / "files"
    target = entry / "files" / "HPS_v2.1_compressed.pt"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"model {tiny_rewards['hpsv2']}: HPS_v2.1_compressed.pt is corrupt"):
        materialize(DirCache(cache_dir), result.key)


@pytest.fixture
def http_server(tiny_rewards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tiny_rewards["aesthetic"])
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_cli_caches_every_model_of_a_config_and_training_reads_through_it(
    tiny_model_dir, tiny_rewards, bucket, http_server, tmp_path, monkeypatch, capsys
):
    """URL + local sources -> S3 via `rewardtune cache-models`; then RT_MODEL_CACHE serves them offline."""
    import yaml

    from rewardtune.cli import main
    from rewardtune.models import resolve_model_dir

    base_url, server = http_server
    head_url = f"{base_url}/sac+logos+ava1-l14-linearMSE.pth"
    clip = str(Path(tiny_rewards["aesthetic"]) / "clip")
    data = tiny_config_dict(
        tiny_model_dir,
        reward={"name": "aesthetic", "source": head_url, "options": {"clip_source": clip}},
        eval_rewards=[{"name": "imagereward", "source": tiny_rewards["imagereward"]}],
        algorithm={"name": "tdpo"},
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    uri = f"s3://{bucket}/models"
    assert main(["cache-models", "--config", str(config), "--cache", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # base model, aesthetic head (URL), its CLIP, ImageReward (tokenizer bundled); the critic reuses the CLIP
    assert len(lines) == 4 and all(line.startswith("cached") for line in lines), lines
    assert main(["cache-models", "--config", str(config), "--cache", uri]) == 0
    assert all(line.startswith("skipped") for line in capsys.readouterr().out.strip().splitlines())

    server.shutdown()
    monkeypatch.setenv("RT_MODEL_CACHE", uri)
    cfg = parse_config(data)
    reward = build_reward(cfg.reward, "cpu")  # the URL is read from the cache, not the (stopped) server
    assert torch.isfinite(reward(torch.rand(2, 3, 32, 32), ["a", "b"])).all()
    pipeline_dir = resolve_model_dir(f"{uri}/{cache_key(ModelRef(str(tiny_model_dir)))}")
    assert json.loads((Path(pipeline_dir) / "model_index.json").read_text())["unet"]
    with pytest.raises(CacheError, match=f"model org/missing is not in cache {uri}"):
        resolve_model_dir("org/missing")


def test_url_source_without_cache_downloads_once_and_refuses_offline(http_server, tiny_rewards, tmp_path, monkeypatch):
    from rewardtune.cache import resolve_local

    monkeypatch.delenv("RT_MODEL_CACHE", raising=False)
    monkeypatch.setenv("RT_MODEL_DIR", str(tmp_path / "work"))
    url = f"{http_server[0]}/sac+logos+ava1-l14-linearMSE.pth"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CacheError, match="is not cached and HF_HUB_OFFLINE is set"):
        resolve_local(url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    got = resolve_local(url) / "sac+logos+ava1-l14-linearMSE.pth"
    assert sha256_file(got) == sha256_file(Path(tiny_rewards["aesthetic"]) / "sac+logos+ava1-l14-linearMSE.pth")
