"""The model cache: fetch every model a config names into a directory (PVC) or `s3://bucket/prefix`,
and materialize cached models into a local working directory with sha256 verification.

Layout of one cached model (``key`` from `cache_key`)::

    <cache>/<key>/files/<relative paths...>
    <cache>/<key>/rewardtune-manifest.json    # written LAST: no manifest = incomplete model

The manifest records source, revision, file filter, and every file's size and sha256. Caching is
idempotent (a model whose manifest matches is skipped) and resumable (files already present with the
right sha256 are not uploaded again). Credentials come only from the standard AWS variables / config
chain that boto3 reads; the S3 endpoint may be overridden with ``RT_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL`` (MinIO, Ceph). Nothing here logs credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardtune.errors import RewardtuneError
from rewardtune.safe_paths import UnsafePathError, apply_umask, check_relative_name, contained

log = logging.getLogger(__name__)

MANIFEST = "rewardtune-manifest.json"
FILES = "files"
FORMAT = 1
CACHE_ENV = "RT_MODEL_CACHE"  # cache URI that hub ids / URLs are looked up in at load time
WORKDIR_ENV = "RT_MODEL_DIR"  # local working dir that cached models are materialized into
ENDPOINT_ENVS = ("RT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Retry/timeout knobs, all handed to botocore's Config (standard retry mode: exponential backoff with jitter
# on 500/502/503/504, throttling, timeouts and dropped connections); no retry loop of our own.
S3_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # botocore's own variable name; total attempts, first one included
S3_CONNECT_TIMEOUT_ENV = "RT_S3_CONNECT_TIMEOUT_S"
S3_READ_TIMEOUT_ENV = "RT_S3_READ_TIMEOUT_S"
# Weight formats a PyTorch run never reads; skipping them keeps hub snapshots to one copy of the weights.
DEFAULT_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.ckpt", "flax_model*",
                  "tf_model*", "rust_model*", "*.md", ".gitattributes"]


class CacheError(RewardtuneError):
    """A model is missing or corrupt in the cache, or the cache itself cannot be reached."""


@dataclass(frozen=True)
class ModelRef:
    """One model to cache: a hub id (+revision, optional file patterns), an http(s) URL, or a local path."""

    source: str
    revision: str | None = None
    files: tuple[str, ...] | None = field(default=None)  # hub allow_patterns; None = all but DEFAULT_IGNORE

    @property
    def kind(self) -> str:
        return source_kind(self.source)


def source_kind(source: str) -> str:
    """'cache' (s3:// or a directory holding a manifest), 'url', 'local', or 'hub'."""
    if source.startswith("s3://"):
        return "cache"
    if source.startswith(("http://", "https://")):
        return "url"
    path = Path(source.removeprefix("file://")).expanduser()
    if (path / MANIFEST).is_file():
        return "cache"
    if path.exists() or source.startswith(("file://", "/", ".", "~")):
        return "local"
    return "hub"


def cache_key(ref: ModelRef) -> str:
    """A stable, filesystem- and S3-safe name for a model: readable slug plus a digest of what defines it."""
    source = ref.source.rstrip("/")
    kind = ref.kind
    if kind == "local":
        source = str(Path(source.removeprefix("file://")).expanduser().resolve())
    if kind == "url":
        name = Path(urllib.parse.urlparse(source).path).name or "download"
    elif kind == "local":
        name = Path(source).name
    else:
        name = source.replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}--{name}")[:80]
    ident = json.dumps([source, ref.revision])  # not the file filter: every user of a source must find it
    return f"{slug}--{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts)


# --------------------------------------------------------------------------------------------- untrusted names


def check_key(key: str) -> str:
    """A cache key is one path component (what `cache_key` makes); a URI's last part may be anything."""
    if "/" in key or key in (".", "..") or key.startswith("."):
        raise UnsafePathError(f"cache key {key!r} is not a model entry name; refused")
    return check_relative_name(key, "cache key")


def check_manifest(manifest: Any, where: str, label: str) -> dict[str, dict[str, Any]]:
    """The manifest's file table, refused unless every entry is a safe relative name with a size and sha256.

    Anyone who can write to the cache can write a manifest: its names are joined onto local directories, so
    `/abs/path` or `../../x` must never be followed (they would write or read outside the model directory).
    """
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CacheError(f"model {label}: the manifest in cache {where} lists no files (missing or empty 'files'); "
                         "delete the entry and re-run `rewardtune cache-models`")
    for rel, meta in files.items():
        check_relative_name(rel, f"model {label}: manifest in cache {where}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool)
                or not isinstance(meta.get("sha256"), str)):
            raise CacheError(f"model {label}: manifest entry {rel!r} in cache {where} needs an integer size and a "
                             "sha256; delete the entry and re-run `rewardtune cache-models`")
    return files


# --------------------------------------------------------------------------------------------- backends


class DirCache:
    """A cache on a filesystem (a PVC mount in the cluster). Files are renamed into place atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(str(root).removeprefix("file://")).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def entry(self, key: str) -> Path:
        return contained(self.root, check_key(key), f"cache {self.root}")

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        path = self.entry(key) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CacheError(f"manifest {path} is not valid JSON; re-run `rewardtune cache-models --force` for this "
                             "model") from None

    def file_sha256(self, key: str, rel: str) -> str | None:
        path = contained(self.entry(key) / FILES, rel, f"cache entry {key}")
        return sha256_file(path) if path.is_file() else None

    def put_file(self, key: str, rel: str, local: Path, sha256: str) -> None:
        dest = contained(self.entry(key) / FILES, rel, f"cache entry {key}")
        tmp = dest.with_name(f".{dest.name}.partial")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
        except OSError as err:  # disk full, read-only mount, ...: the entry stays without a manifest
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CacheError(f"writing {dest} failed ({err.strerror or err}); no manifest was written, so model {key} "
                             "stays incomplete and is never loaded") from None

    def put_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        dest = self.entry(key) / MANIFEST
        tmp = dest.with_name(f".{MANIFEST}.partial")
        with tmp.open("w") as handle:
            handle.write(json.dumps(manifest, indent=1, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)

    def get_file(self, key: str, rel: str, dest: Path) -> None:
        src = contained(self.entry(key) / FILES, rel, f"cache entry {key}")
        if not src.is_file():
            raise CacheError(f"model {key}: file {rel} listed in its manifest is missing from cache {self.uri(key)}")
        shutil.copyfile(src, dest)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CacheError(f"{name}={raw!r} is not a number; unset it or give e.g. {default:g}") from None
    if value <= 0:
        raise CacheError(f"{name}={raw!r} must be positive")
    return value


def s3_client_config(max_attempts: int | None = None) -> Any:
    """botocore Config: standard retry mode (backoff + jitter) and bounded connect/read timeouts."""
    from botocore.config import Config

    attempts = max_attempts or int(_env_number(S3_ATTEMPTS_ENV, 5))
    return Config(
        # total_max_attempts counts the first try (botocore's own `max_attempts` key counts retries only)
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=_env_number(S3_CONNECT_TIMEOUT_ENV, 10),
        read_timeout=_env_number(S3_READ_TIMEOUT_ENV, 60),
    )


def _s3_reason(err: Exception) -> str:
    """A short, credential-free reason for a failed S3 call (status/code, or the exception type)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return " ".join(str(x) for x in (status, error.get("Code")) if x) or type(err).__name__
    return type(err).__name__


class S3Cache:
    """A cache in an S3-protocol bucket via boto3, with botocore's standard retry mode."""

    def __init__(self, uri: str, max_attempts: int | None = None) -> None:
        import boto3

        parsed = urllib.parse.urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        if not self.bucket:
            raise CacheError(f"cache URI {uri} has no bucket; use s3://bucket/prefix")
        endpoint = next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
        self.config = s3_client_config(max_attempts)
        # A fresh session (not boto3's process-wide default) so credentials are read from the environment now.
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=self.config)
        self._check_bucket()

    def _failed(self, action: str, key: str, err: Exception, state: str) -> CacheError:
        """One line naming the object, the attempts and what state was left behind."""
        attempts = self.config.retries["total_max_attempts"]
        return CacheError(f"{action} s3://{self.bucket}/{key} failed after {attempts} attempt(s) ({_s3_reason(err)}); "
                          f"{state}; check the endpoint and re-run")

    def uri(self, key: str = "") -> str:
        return "s3://" + "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _check_bucket(self) -> None:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (NoCredentialsError, PartialCredentialsError):
            raise CacheError(
                f"no AWS credentials for cache {self.uri()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in the cluster, from the cache's Kubernetes Secret)"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise CacheError(f"bucket '{self.bucket}' of cache {self.uri()} does not exist; create it first") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise CacheError(f"access to cache {self.uri()} denied ({code}); check the AWS credentials") from None
            raise CacheError(f"cache {self.uri()} unreachable: {code or err}") from None

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._key(key, MANIFEST)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._failed("reading", name, err, "nothing was changed") from None
        except BotoCoreError as err:
            raise self._failed("reading", name, err, "nothing was changed") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise CacheError(f"manifest s3://{self.bucket}/{name} is not valid JSON; re-run `rewardtune cache-models "
                             "--force` for this model") from None

    def file_sha256(self, key: str, rel: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key, FILES, rel))
        except ClientError:
            return None
        return head.get("Metadata", {}).get("sha256")

    def put_file(self, key: str, rel: str, local: Path, sha256: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._key(key, FILES, rel)
        try:
            self.client.upload_file(str(local), self.bucket, name, ExtraArgs={"Metadata": {"sha256": sha256}})
        except (S3UploadFailedError, ClientError, BotoCoreError) as err:
            cause = err.__context__ if isinstance(err, S3UploadFailedError) and err.__context__ else err
            raise self._failed("uploading", name, cause, f"no manifest was written, so model {key} stays "
                               "incomplete and is never loaded") from None

    def put_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        name = self._key(key, MANIFEST)
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType="application/json")
        except (ClientError, BotoCoreError) as err:
            raise self._failed("uploading", name, err, f"model {key} stays incomplete (its files are uploaded; "
                               "a re-run only writes the manifest)") from None

    def get_file(self, key: str, rel: str, dest: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._key(key, FILES, rel)
        try:
            self.client.download_file(self.bucket, name, str(dest))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise CacheError(f"model {key}: file {rel} listed in its manifest is missing from cache {self.uri(key)}") from None
            raise self._failed("downloading", name, err, "the local model directory was left as it was") from None
        except BotoCoreError as err:
            raise self._failed("downloading", name, err, "the local model directory was left as it was") from None


Cache = DirCache | S3Cache


def open_cache(uri: str) -> Cache:
    return S3Cache(uri) if uri.startswith("s3://") else DirCache(uri)


def split_cache_uri(uri: str) -> tuple[Cache, str]:
    """`s3://bucket/prefix/<key>` or `/dir/<key>` (one cached model) -> (its cache, key)."""
    head, _, key = uri.rstrip("/").rpartition("/")
    if not key or not head or head in ("s3:", "s3:/"):
        raise CacheError(f"cache URI {uri} does not name a model; expected <cache>/<key>")
    if uri.startswith("s3://") and "/" not in head.removeprefix("s3://"):
        return S3Cache(head + "/"), key
    return open_cache(head), key


# --------------------------------------------------------------------------------------------- fetching


def _fetch(ref: ModelRef, staging: Path) -> tuple[Path, str | None]:
    """Download (or locate) the model's files; returns the directory holding them and the resolved revision."""
    kind = ref.kind
    if kind == "local":
        path = Path(ref.source.removeprefix("file://")).expanduser()
        if not path.exists():
            raise CacheError(f"model source {ref.source} does not exist")
        if path.is_file():
            shutil.copyfile(path, staging / path.name)
            return staging, ref.revision
        return path, ref.revision
    if kind == "url":
        name = Path(urllib.parse.urlparse(ref.source).path).name or "download"
        tmp = staging / f".{name}.partial"
        try:
            with urllib.request.urlopen(ref.source, timeout=60) as response, open(tmp, "wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as err:
            raise CacheError(f"could not download model {ref.source}: {err}") from None
        os.replace(tmp, staging / name)
        return staging, ref.revision
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                ref.source,
                revision=ref.revision,
                allow_patterns=list(ref.files) if ref.files else None,
                ignore_patterns=None if ref.files else DEFAULT_IGNORE,
                local_dir=staging,
            )
        except Exception as err:  # the hub raises many types; one line is what the user needs
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CacheError(f"could not fetch model {ref.source}@{ref.revision or 'main'} from the hub: {first}") from None
        return Path(path), _hub_commit(ref) or ref.revision or "main"
    raise CacheError(f"model source {ref.source} is already a cache URI; nothing to fetch")


def _hub_commit(ref: ModelRef) -> str | None:
    """The commit a hub revision resolved to (recorded in the manifest; best effort)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(ref.source, revision=ref.revision).sha
    except Exception:  # provenance only: never fail caching on it
        return None


@dataclass
class CacheResult:
    key: str
    source: str
    uri: str
    status: str  # "cached", "skipped"
    uploaded: int = 0
    reused: int = 0


def cache_model(ref: ModelRef, cache: Cache, force: bool = False) -> CacheResult:
    """Put one model into the cache; skip it if a manifest with the same source/revision/filter exists."""
    key = cache_key(ref)
    existing = None if force else cache.read_manifest(key)
    want = {"source": ref.source, "revision": ref.revision, "files_filter": list(ref.files) if ref.files else None}
    if existing and all(existing.get(k) == v for k, v in want.items()):
        log.info("skip %s: already cached at %s", ref.source, cache.uri(key))
        return CacheResult(key, ref.source, cache.uri(key), "skipped")
    result = CacheResult(key, ref.source, cache.uri(key), "cached")
    with tempfile.TemporaryDirectory(prefix="rt-fetch-") as tmp:
        root, revision = _fetch(ref, Path(tmp))
        files: dict[str, dict[str, Any]] = {}
        for rel in _list_files(root):
            path = root / rel
            sha = sha256_file(path)
            files[rel] = {"size": path.stat().st_size, "sha256": sha}
            if cache.file_sha256(key, rel) == sha:  # resumed: this file made it last time
                result.reused += 1
                continue
            cache.put_file(key, rel, path, sha)
            result.uploaded += 1
        if not files:
            raise CacheError(f"model {ref.source} has no files (check the revision and file patterns)")
    manifest = {"format": FORMAT, "key": key, **want, "resolved_revision": revision, "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cache.put_manifest(key, manifest)  # last: its presence means the model is complete
    log.info("cached %s -> %s (%d uploaded, %d reused)", ref.source, cache.uri(key), result.uploaded, result.reused)
    return result


def cache_models(refs: Iterable[ModelRef], cache_uri: str, force: bool = False) -> list[CacheResult]:
    """Cache each model once (by key); returns what was done per model."""
    cache = open_cache(cache_uri)
    unique: dict[str, ModelRef] = {}
    for ref in refs:
        if ref.kind != "cache":
            unique.setdefault(cache_key(ref), ref)
    return [cache_model(ref, cache, force) for ref in unique.values()]


# --------------------------------------------------------------------------------------------- materializing


def workdir() -> Path:
    return Path(os.environ.get(WORKDIR_ENV) or Path.home() / ".cache" / "rewardtune" / "models").expanduser()


def _verify_dir(root: Path, manifest: dict[str, Any], where: str, label: str) -> None:
    for rel, meta in check_manifest(manifest, where, label).items():
        path = contained(root, rel, f"model {label}: manifest in cache {where}")
        if not path.is_file():
            raise CacheError(f"model {label}: file {rel} is missing in cache {where}; re-run `rewardtune cache-models`")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise CacheError(f"model {label}: {rel} is corrupt (sha256 mismatch) in cache {where}; "
                             "delete the entry and re-run `rewardtune cache-models`")


def _same_manifest(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether a local copy's manifest is this one (an unreadable local manifest is just not the same)."""
    try:
        return path.is_file() and json.loads(path.read_text()) == manifest
    except (OSError, ValueError):
        return False


def materialize(cache: Cache, key: str, dest_root: Path | None = None, label: str | None = None) -> Path:
    """A verified local directory with the model's files; a PVC cache is verified and used in place."""
    manifest = cache.read_manifest(key)
    if manifest is None:
        raise CacheError(f"model {label or key} is not in cache {cache.uri()} (no manifest {key}/{MANIFEST}: missing "
                         "or incomplete); run `rewardtune cache-models --config ... --cache ...`")
    label = label or str(manifest.get("source", key) if isinstance(manifest, dict) else key)
    files = check_manifest(manifest, cache.uri(key), label)
    if isinstance(cache, DirCache):
        root = cache.entry(key) / FILES
        _verify_dir(root, manifest, cache.uri(key), label)
        return root
    dest = Path(dest_root or workdir()) / check_key(key)
    local_manifest = dest / MANIFEST
    if _same_manifest(local_manifest, manifest):
        try:  # re-verified on every load: a local file corrupted since (disk, another job) is never used
            _verify_dir(dest / FILES, manifest, str(dest), label)
            return dest / FILES
        except CacheError as err:
            log.warning("%s; downloading it again", err)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest.parent))
    try:
        for rel in files:
            target = contained(staging / FILES, rel, f"model {label}: manifest in cache {cache.uri(key)}")
            target.parent.mkdir(parents=True, exist_ok=True)
            cache.get_file(key, rel, target)
        _verify_dir(staging / FILES, manifest, cache.uri(key), label)
        (staging / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
        apply_umask(staging)  # mkdtemp made it 0700: other users of a shared working dir must read it
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(staging, dest)
        except OSError:  # another process materialized it meanwhile; use theirs if it is this version
            if not _same_manifest(local_manifest, manifest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest / FILES


def resolve_source(source: str, revision: str | None = None, files: Iterable[str] | None = None) -> Path | None:
    """A local path for `source`, reading through the cache; None means 'a hub id with no cache configured'.

    - a cache URI (`s3://.../<key>` or a directory with a manifest): materialized and verified;
    - with ``RT_MODEL_CACHE`` set, hub ids / URLs / local paths are looked up there by `cache_key`;
    - an existing local path is used as is.
    """
    kind = source_kind(source)
    if kind == "cache":
        if source.startswith("s3://"):
            cache, key = split_cache_uri(source)
        else:
            path = Path(source.removeprefix("file://")).expanduser().resolve()
            cache, key = DirCache(path.parent), path.name
        return materialize(cache, key)
    cache_uri = os.environ.get(CACHE_ENV)
    ref = ModelRef(source, revision, tuple(files) if files else None)
    if kind == "local":
        path = Path(source.removeprefix("file://")).expanduser()
        if path.exists():
            return path
        raise CacheError(f"model source {source} does not exist")
    if cache_uri:
        return materialize(open_cache(cache_uri), cache_key(ref), label=source)
    return None


def resolve_local(source: str, revision: str | None = None, files: Iterable[str] | None = None) -> Path:
    """Like `resolve_source`, but a hub id with no cache falls back to the local HF cache (offline-safe)."""
    path = resolve_source(source, revision, files)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if source_kind(source) == "url":  # no cache configured: a plain download into the working dir (dev use)
        dest = workdir() / cache_key(ModelRef(source, revision)) / FILES
        name = Path(urllib.parse.urlparse(source).path).name or "download"
        if not (dest / name).is_file():
            if offline:
                raise CacheError(f"model {source} is not cached and HF_HUB_OFFLINE is set; run `rewardtune cache-models` "
                                 f"and set {CACHE_ENV}")
            dest.mkdir(parents=True, exist_ok=True)
            _fetch(ModelRef(source, revision), dest)
        return dest
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=list(files) if files else None,
                                      ignore_patterns=None if files else DEFAULT_IGNORE, local_files_only=offline))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CacheError(f"model {source} is not available locally and no cache is set ({CACHE_ENV}); "
                         f"run `rewardtune cache-models` and point {CACHE_ENV} at the cache: {first}") from None
