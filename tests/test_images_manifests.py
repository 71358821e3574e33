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
    # any base builds it (ARG BASE_IMAGE), the default base stays pinned by tag and digest
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+@sha256:[0-9a-f]{64}$", text, re.M), "base must be pinned by tag and digest"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "python3 -m venv /opt/venv" in text and re.search(r"PATH=/opt/venv/bin:\$PATH", text)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert 'ENTRYPOINT ["rewardtune"]' in text
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', text))
    assert {"title", "description", "version", "source", "licenses"} <= {k.rsplit(".", 1)[1] for k in labels}
    assert labels["org.opencontainers.image.title"] == IMAGES["images"][key]["name"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"


def test_trainer_torch_build_matches_the_base_image_cuda():
    """The trainer's torch wheel is the CUDA build of the base image (PyPI's default is another CUDA)."""
    text = (REPO / IMAGES["images"]["trainer"]["dockerfile"]).read_text()
    major, minor = re.search(r"^ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, re.M).groups()
    tag = f"cu{major}{minor}"
    assert re.search(rf"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/{tag}$", text, re.M)
    install = next(line for line in text.splitlines() if "pip install" in line and "TORCH_PACKAGES" in line)
    assert '--index-url "${TORCH_INDEX}"' in install
    torch, vision = re.search(r'^ARG TORCH_PACKAGES="torch==(\S+) torchvision==(\S+)"$', text, re.M).groups()
    assert torch.endswith(f"+{tag}") and vision.endswith(f"+{tag}")
    makefile = (REPO / "Makefile").read_text()  # the same torch release as every other install
    assert f"torch=={torch.split('+')[0]} torchvision=={vision.split('+')[0]}" in makefile


def test_cpu_image_default_torch_is_the_cpu_build():
    """The CPU image needs no CUDA libraries: +cpu wheels from the CPU index, in the default and local profiles."""
    text = (REPO / IMAGES["images"]["cpu"]["dockerfile"]).read_text()
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch = re.search(r'^ARG TORCH_PACKAGES="torch==(\S+)', text, re.M).group(1)
    assert torch.endswith("+cpu")
    assert IMAGES["profiles"]["local"]["cpu"]["TORCH_PACKAGES"].split()[0].endswith("+cpu")


def test_build_script_uses_images_yaml():
    proc = subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--dry-run", "--push", "--runtime", "docker",
                           "--profile", "registry"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for spec in IMAGES["images"].values():
        ref = f"{IMAGES['registry']}/{spec['name']}:{IMAGES['tag']}"
        build = f"docker build -f {spec['dockerfile']} --build-arg VERSION={IMAGES['tag']} -t {ref} ."
        assert build in proc.stdout and f"docker push {ref}" in proc.stdout


def test_local_profile_mounts_the_hosts_wheels_and_builds_on_the_local_base():
    """`--profile local` (podman): every image builds on the local base, with each local wheel dir mounted
    read-only and handed to pip, so a build here reads the same wheels as the host's pip."""
    sys.path.insert(0, str(REPO / "images"))
    try:
        import build
    finally:
        sys.path.remove(str(REPO / "images"))
    dirs = ["/opt/wheels", "/opt/pypi/simple"]
    mounts, pip = build.wheel_options(dirs)
    assert mounts == ["-v", "/opt/wheels:/opt/wheels:ro", "-v", "/opt/pypi:/opt/pypi:ro"]
    assert pip == "--find-links /opt/wheels --extra-index-url file:///opt/pypi/simple"
    commands = build.build_commands([], None, False, runtime="podman", profile="local")
    base = IMAGES["profiles"]["local"]["common"]["BASE_IMAGE"]
    assert len(commands) == len(IMAGES["images"])
    for cmd in commands:
        assert cmd[:2] == ["podman", "build"] and f"BASE_IMAGE={base}" in cmd and cmd[-1] == "."
        assert "--format" in cmd and cmd[cmd.index("--format") + 1] == "docker"  # OCI format would drop SHELL
    with pytest.raises(SystemExit, match="needs podman"):
        build.build_commands([], None, False, runtime="docker", profile="local")


MANIFESTS = REPO / "manifests"
BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1"}
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 36)]


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _builtin_manifests() -> list[Path]:
    """Every file under manifests/ holding built-in Kubernetes kinds (kustomizations and custom resources are
    checked elsewhere: the TrainingRuntime against its vendored CRD in tests/test_trainjob.py)."""
    files = [p for p in sorted(MANIFESTS.rglob("*.yaml")) if all(d.get("apiVersion") in BUILTIN_GROUPS for d in _docs(p))]
    assert {p.relative_to(MANIFESTS).as_posix() for p in files} >= {"base/rbac.yaml", "base/pvc.yaml", "jobs/train-job.yaml"}
    return files


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version):
    files = [str(p) for p in _builtin_manifests()]
    proc = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_manifest_inventory_and_kustomizations():
    kinds = {d["kind"] for p in _builtin_manifests() for d in _docs(p)}
    assert {"PersistentVolumeClaim", "Secret", "ServiceAccount", "Role", "RoleBinding", "PriorityClass", "Job"} <= kinds
    secret = yaml.safe_load((MANIFESTS / "base" / "s3-secret.yaml").read_text())
    assert set(secret["stringData"].values()) & {"REPLACE_ME"}, "the Secret must stay a template"
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):  # every reference exists
        spec = yaml.safe_load(kustomization.read_text())
        for ref in [*spec.get("resources", []), *spec.get("components", [])]:
            assert (kustomization.parent / ref).exists(), f"{kustomization}: {ref}"
    overlays = {p.parent.name: yaml.safe_load(p.read_text()) for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml")}
    assert overlays["standalone"]["namespace"] == "kubeflow" and overlays["multi-user"]["namespace"] == "rewardtune"
    assert "kubeflow" in overlays["standalone"]["patches"][0]["patch"]  # the RoleBinding subject follows
    multinode = yaml.safe_load((MANIFESTS / "components" / "multinode" / "kustomization.yaml").read_text())
    assert multinode["kind"] == "Component" and "ReadWriteMany" in multinode["patches"][0]["patch"]
    profile = yaml.safe_load((MANIFESTS / "profile" / "profile.yaml").read_text())
    assert (profile["apiVersion"], profile["kind"], profile["metadata"]["name"]) == ("kubeflow.org/v1", "Profile", "rewardtune")


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _covered(grant, ours) -> bool:
    group, resource, verb = grant
    return any(g == group and r in (resource, "*") and v in (verb, "*") for g, r, v in ours)


def test_role_covers_kfp_pipeline_runner():
    """What KFP 2.17's own pipeline-runner Role grants (vendored), ours grants too, plus the TrainJob verbs."""
    reference = yaml.safe_load((REPO / "tests" / "data" / "kubeflow-pipelines-2.17.0" / "pipeline-runner-role.yaml").read_text())
    role = next(d for d in _docs(MANIFESTS / "base" / "rbac.yaml") if d["kind"] == "Role")
    ours = _grants(role["rules"])
    missing = sorted(g for g in _grants(reference["rules"]) if not _covered(g, ours))
    assert not missing, f"rbac.yaml lacks what pipeline-runner grants: {missing}"
    for needed in [("", "configmaps", "watch"), ("", "pods", "patch"), ("", "pods/exec", "create"),
                   ("argoproj.io", "workflowtaskresults", "create"), ("argoproj.io", "workflows", "patch")]:
        assert _covered(needed, ours), needed
    for verb in ("create", "get", "watch", "delete"):
        assert _covered(("trainer.kubeflow.org", "trainjobs", verb), ours)
    assert not _covered(("trainer.kubeflow.org", "clustertrainingruntimes", "create"), ours)
    assert all(d["kind"] != "ClusterRole" for d in _docs(MANIFESTS / "base" / "rbac.yaml"))


def test_manifests_match_pipeline_names():
    """The PVC / Secret / ServiceAccount names the DAG and schedule script use exist in the manifests."""
    text = "".join(p.read_text() for p in (REPO / "manifests").rglob("*.yaml"))
    compiled = (REPO / "pipelines" / "alignment.yaml").read_text()
    for name in ("rewardtune-checkpoints", "rewardtune-model-cache", "rewardtune-s3"):
        assert f"name: {name}" in text and name in compiled
    assert "name: rewardtune-pipeline" in text and "rewardtune-pipeline" in (REPO / "pipelines" / "schedule.py").read_text()
