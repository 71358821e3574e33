"""Security: no unpickling of untrusted files, no remote code, credentials never written anywhere,
containers non-root with a read-only root filesystem where the stage allows, images pinned by digest."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from rewardtune.checkpoint import MANIFEST, sha256_file
from tests.cli_runner import run_cli
from tests.conftest import REPO, tiny_config_dict
from tests.test_cache import s3_endpoint  # noqa: F401  (fixture)

CODE_DIRS = ("shared", "components", "pipelines", "benchmarks", "images")


def _python_files() -> list[Path]:
    return [p for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def _safe_loader_classes(tree: ast.AST) -> set[str]:
    """Classes of this module that derive, directly or through each other, from a yaml SafeLoader."""
    bases = {n.name: [_dotted(b) for b in n.bases] for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    safe: set[str] = set()
    while True:
        grown = {name for name, parents in bases.items()
                 if any(p.endswith("SafeLoader") or p in safe for p in parents)} - safe
        if not grown:
            return safe
        safe |= grown


def unsafe_calls(source: str) -> list[str]:
    """Deserialization that can run code: torch.load without weights_only=True, pickle & co, unsafe YAML,
    numpy pickles, and any trust_remote_code=True."""
    found = []
    tree = ast.parse(source)
    safe_loaders = _safe_loader_classes(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"line {node.lineno}: {name or '<call>'}"
        if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
            found.append(f"{where} without weights_only=True")
        if name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal") and (
                name.endswith((".load", ".loads", ".open", ".Unpickler"))):
            found.append(where)
        if name.endswith(("torch.jit.load", "yaml.unsafe_load", "yaml.full_load")):
            found.append(where)
        if name.endswith("yaml.load"):
            loader = next((kw.value for kw in node.keywords if kw.arg == "Loader"), node.args[1] if len(node.args) > 1 else None)
            if loader is None or ("Safe" not in _dotted(loader) and _dotted(loader) not in safe_loaders):
                found.append(f"{where} without SafeLoader")
        if name.endswith("np.load") or name.endswith("numpy.load"):
            if _keyword(node, "allow_pickle") not in (None, False):
                found.append(f"{where} with allow_pickle")
        if _keyword(node, "trust_remote_code") not in (None, False):
            found.append(f"{where} with trust_remote_code")
    return found


def test_the_scanner_catches_each_pattern():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\npickle.loads(b)\nyaml.load(t)\n"
           "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(x, trust_remote_code=True)\ntorch.jit.load(p)\n")
    assert len(unsafe_calls(bad)) == 8
    subclassed = ("class Strict(yaml.SafeLoader): pass\nclass Stricter(Strict): pass\nclass Unsafe(yaml.Loader): pass\n"
                  "yaml.load(t, Loader=Stricter)\nyaml.load(t, Loader=Unsafe)\n")
    assert unsafe_calls(subclassed) == ["line 5: yaml.load without SafeLoader"]
    good = "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nnp.load(p)\n"
    assert unsafe_calls(good) == []


def test_no_unsafe_deserialization_or_remote_code_in_the_code():
    offenders = {str(p.relative_to(REPO)): found for p in _python_files() if (found := unsafe_calls(p.read_text()))}
    assert offenders == {}
    for path in [*_python_files(), *(REPO / "configs").glob("*.yaml"), *(REPO / "pipelines").glob("*.yaml")]:
        assert "trust_remote_code" not in path.read_text() or path.suffix == ".py", path


def _pickle_bomb(path: Path, marker: Path) -> None:
    """A .pth that creates `marker` when unpickled by anything but a weights-only loader."""

    class Bomb:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"layers.0.weight": Bomb()}, path)


def test_a_crafted_pickle_in_a_reward_is_refused_and_never_run(tmp_path, tiny_rewards):
    import shutil

    from rewardtune.config import RewardSpec
    from rewardtune.errors import RewardError
    from rewardtune.rewards import build_reward

    source = tmp_path / "aesthetic"
    shutil.copytree(tiny_rewards["aesthetic"], source)
    head = next(source.glob("*.pth"))
    marker = tmp_path / "PWNED"
    _pickle_bomb(head, marker)
    with pytest.raises(RewardError, match="weights-only torch file"):
        build_reward(RewardSpec(name="aesthetic", source=str(source)), "cpu")
    assert not marker.exists()


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(
        tiny_model_dir, model={"finetune": "lora"}, sampling={"num_steps": 2, "batch_size": 2, "batches_per_epoch": 1},
        training={"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1})))
    out = tmp_path / "run"
    assert run_cli(["train", "--config", str(config), "--out", str(out)]).returncode == 0
    ckpt = out / "checkpoints" / "epoch-000001"
    marker = tmp_path / "PWNED"
    _pickle_bomb(ckpt / "optimizer.pt", marker)
    manifest = json.loads((ckpt / MANIFEST).read_text())  # an attacker who can also rewrite the manifest
    manifest["files"]["optimizer.pt"] = {"sha256": sha256_file(ckpt / "optimizer.pt"), "size": (ckpt / "optimizer.pt").stat().st_size}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    result = run_cli(["train", "--config", str(config), "--out", str(out), "--resume", "--set", "training.epochs=2"])
    assert result.returncode == 2 and not marker.exists()
    [line] = result.stderr_lines()
    assert re.match(r"error: checkpoint .*epoch-000001: optimizer\.pt is not a weights-only torch file", line)


# ------------------------------------------------------------------------------------------ credentials
def test_planted_credentials_never_reach_any_output(tmp_path, tiny_model_dir, s3_endpoint):  # noqa: F811
    """cache-models -> train (model read from S3 with the credentials) -> evaluate -> report, verbose logging;
    then every file written, every S3 object and all stdout/stderr are searched for the planted values."""
    import boto3

    from rewardtune.cache import ModelRef, cache_key

    tag = uuid.uuid4().hex
    secrets = {"AWS_SECRET_ACCESS_KEY": f"rtsecret{tag}", "AWS_SESSION_TOKEN": f"rttoken{tag}",
               "HF_TOKEN": f"hf_rtplanted{tag}", "AWS_ACCESS_KEY_ID": f"RTKEYID{tag[:12].upper()}"}
    bucket = f"secrets-{tag[:8]}"
    env = {**secrets, "RT_S3_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": None, "RT_MODEL_DIR": str(tmp_path / "work"),
           "RT_MODEL_CACHE": None}
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="y").create_bucket(Bucket=bucket)

    cached_model = f"s3://{bucket}/models/{cache_key(ModelRef(str(tiny_model_dir)))}"
    data = tiny_config_dict(tiny_model_dir, sampling={"num_steps": 2, "batch_size": 2, "batches_per_epoch": 1},
                            training={"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1},
                            evaluation={"num_heldout_prompts": 2, "num_train_prompts": 1, "images_per_prompt": 2,
                                        "grid_prompts": 1})
    cache_config = tmp_path / "cache.yaml"
    cache_config.write_text(yaml.safe_dump(data))
    data["model"]["source"] = cached_model
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    outputs = tmp_path / "outputs"
    steps = [
        ["-v", "cache-models", "--config", str(cache_config), "--cache", f"s3://{bucket}/models"],
        ["-v", "train", "--config", str(config), "--out", str(outputs / "run")],
        ["-v", "evaluate", "--config", str(config), "--run", str(outputs / "run"), "--out", str(outputs / "eval")],
        ["-v", "report", "--run", str(outputs / "run"), "--eval", str(outputs / "eval"), "--out", str(outputs / "report")],
    ]
    streams = []
    for argv in steps:
        result = run_cli(argv, env=env, timeout=300)
        assert result.returncode == 0, f"{argv[1]}: {result.stderr[-2000:]}"
        streams += [result.stdout, result.stderr]
    assert (outputs / "report" / "report.html").is_file() and (tmp_path / "work").is_dir()  # the model came from S3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y")
    objects = [client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20 and objects
    for name, value in secrets.items():
        needle = value.encode()
        leaked = [str(p.relative_to(tmp_path)) for p in files if needle in p.read_bytes()]
        assert leaked == [], f"{name} written to {leaked}"
        assert not any(needle in body for body in objects), f"{name} in an S3 object"
        assert not any(value in text for text in streams), f"{name} on stdout/stderr"


# ------------------------------------------------------------------------------------------ containers
def test_dockerfiles_bake_in_no_credentials_and_pin_the_base_by_digest():
    for dockerfile in sorted((REPO / "images").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))  # FROM ${BASE_IMAGE}: its default is the pin
        froms = [re.sub(r"\$\{(\w+)\}", lambda m, args=args: args.get(m.group(1), m.group(0)), ref)
                 for ref in re.findall(r"^FROM\s+(\S+)", text, re.M)]
        assert froms and all(re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", ref) for ref in froms), froms
        assert not re.search(r"^(ENV|ARG)\b.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I), dockerfile
        assert re.findall(r"^USER\s+(\S+)", text, re.M)[-1].split(":")[0] not in ("root", "0")


def _job_docs() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in sorted((REPO / "manifests" / "jobs").glob("*.yaml"))
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_jobs_run_non_root_with_a_read_only_root_filesystem():
    docs = _job_docs()
    assert docs
    tool = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(tool), "--strict", "--quiet", *sorted({str(p) for p, _ in docs})], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    images = yaml.safe_load((REPO / "images" / "images.yaml").read_text())
    allowed = {f"{images['registry']}/{spec['name']}:{images['tag']}" for spec in images["images"].values()}
    for path, doc in docs:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, path
        mounted = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, path
            assert context["capabilities"]["drop"] == ["ALL"], path
            assert container["image"] in allowed, container["image"]
            paths = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/home/rewardtune/.cache"} <= paths  # where a read-only root still needs writes
            assert {m["name"] for m in container["volumeMounts"]} <= mounted
            assert not any("SECRET" in e.get("name", "") and "value" in e for e in container.get("env", [])), path
        grace = pod["terminationGracePeriodSeconds"]
        args = " ".join(pod["containers"][0]["args"])
        if "train" in args:
            term = float(re.search(r"termination_grace_s=([\d.]+)", args).group(1))
            assert term < grace and "--resume" in args  # the checkpoint fits before Kubernetes sends SIGKILL
