"""Dockerfiles lint clean (hadolint), manifests validate strictly, and image names come from one file."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent
IMAGES = yaml.safe_load((REPO / "images" / "images.yaml").read_text())


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `pip install -e '.[test]'` provides it")
    return path


@pytest.mark.parametrize("key", sorted(IMAGES["images"]))
def test_dockerfile_is_hadolint_clean_pinned_and_non_root(key):
    dockerfile = REPO / IMAGES["images"][key]["dockerfile"]
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = dockerfile.read_text()
    assert re.search(r"^FROM \S+:\S+@sha256:[0-9a-f]{64}$", text, re.M), "base must be pinned by tag and digest"
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert 'ENTRYPOINT ["rewardtune"]' in text


def test_build_script_uses_images_yaml():
    proc = subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--dry-run", "--push"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for spec in IMAGES["images"].values():
        ref = f"{IMAGES['registry']}/{spec['name']}:{IMAGES['tag']}"
        assert f"docker build -f {spec['dockerfile']} -t {ref} ." in proc.stdout and f"docker push {ref}" in proc.stdout


def test_manifests_validate_strictly():
    base = REPO / "manifests" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    files = [str(base / name) for name in kustomization["resources"]]
    proc = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = {doc["kind"] for f in files for doc in yaml.safe_load_all(Path(f).read_text()) if doc}
    assert {"Namespace", "PersistentVolumeClaim", "Secret", "ServiceAccount", "Role", "RoleBinding", "PriorityClass"} <= kinds
    secret = yaml.safe_load((base / "s3-secret.yaml").read_text())
    assert set(secret["stringData"].values()) & {"REPLACE_ME"}, "the Secret must stay a template"


def test_manifests_match_pipeline_names():
    """The PVC / Secret / ServiceAccount names the DAG and schedule script use exist in the manifests."""
    text = "".join(p.read_text() for p in (REPO / "manifests" / "base").glob("*.yaml"))
    compiled = (REPO / "pipelines" / "alignment.yaml").read_text()
    for name in ("rewardtune-checkpoints", "rewardtune-model-cache", "rewardtune-s3"):
        assert f"name: {name}" in text and name in compiled
    assert "name: rewardtune-pipeline" in text and "rewardtune-pipeline" in (REPO / "pipelines" / "schedule.py").read_text()
