"""Container handling that needs no runtime: `run_local --runner docker` against a fake Docker client standing in
for the podman API (the real one runs in tests/test_containers.py and `make demo-containers`), and the CLI's
line for a mount the image's user cannot write."""

from __future__ import annotations

import pytest

from components.images import CPU_IMAGE, TRAINER_IMAGE
from pipelines import run_local

IMAGES = {"trainer_image": TRAINER_IMAGE, "cpu_image": CPU_IMAGE}


class FakeContainer:
    def __init__(self, status: int) -> None:
        self.status, self.removed = status, False

    def logs(self, stream: bool, follow: bool):
        return iter([b"task log\n"])

    def wait(self) -> dict:
        if self.removed:  # what podman answers for a container that removed itself: 500, not Docker's 404
            import docker

            raise docker.errors.APIError("500 Server Error: no such container")
        return {"StatusCode": self.status}

    def remove(self, force: bool) -> None:
        self.removed = True


class FakeClient:
    def __init__(self, status: int, tags: list[str]) -> None:
        self.status, self.tags, self.runs = status, tags, []
        self.images = self
        self.containers = self

    def list(self):
        return [type("Image", (), {"tags": self.tags})()]

    def run(self, **kwargs) -> FakeContainer:
        self.runs.append(kwargs)
        self.container = FakeContainer(self.status)
        return self.container


def test_image_parameter_placeholders_resolve_to_the_pipeline_defaults():
    assert run_local.resolve_image("{{$.inputs.parameters['pipelinechannel--cpu_image']}}:latest", IMAGES) == CPU_IMAGE
    assert run_local.resolve_image("{{$.inputs.parameters['trainer_image']}}", IMAGES) == TRAINER_IMAGE
    assert run_local.resolve_image("docker.io/x/y:1", IMAGES) == "docker.io/x/y:1"
    with pytest.raises(RuntimeError, match="other_image"):
        run_local.resolve_image("{{$.inputs.parameters['pipelinechannel--other_image']}}", IMAGES)


@pytest.mark.parametrize("status", [0, 3])
def test_the_real_exit_code_comes_back_and_the_container_is_removed_after(status, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = FakeClient(status, [CPU_IMAGE])
    code = run_local.run_container(client, "{{$.inputs.parameters['pipelinechannel--cpu_image']}}",
                                   ["sh", "-c", "python3 -m kfp.dsl.executor_main"], {"/r": {"bind": "/r"}}, images=IMAGES)
    assert code == status and client.container.removed
    (kwargs,) = client.runs
    assert kwargs["image"] == CPU_IMAGE and kwargs["auto_remove"] is False
    assert kwargs["entrypoint"] == ["sh"] and kwargs["command"] == ["-c", "python3 -m kfp.dsl.executor_main"]
    assert kwargs["environment"]["OMP_NUM_THREADS"] == "1"
    assert "task log" in capsys.readouterr().out


def test_a_missing_image_names_make_images():
    with pytest.raises(RuntimeError, match="make images"):
        run_local.run_container(FakeClient(0, []), TRAINER_IMAGE, ["sh"], {}, images=IMAGES)


def test_the_patch_is_undone_on_the_way_out():
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    with run_local.waited_containers(IMAGES):
        assert docker_task_handler.run_docker_container is not original
    assert docker_task_handler.run_docker_container is original


def test_demo_containers_runs_the_demo_dag_with_the_same_arguments():
    """`make demo-containers` is `make demo` in containers: the same run_local.py arguments but the runner and root."""
    import shlex

    from tests.conftest import REPO

    lines = [line for line in (REPO / "Makefile").read_text().splitlines() if "pipelines/run_local.py" in line]
    demo, containers = (shlex.split(line.split("pipelines/run_local.py", 1)[1]) for line in lines)

    def without(args: list[str], *flags: str) -> list[str]:
        out, skip = [], False
        for arg in args:
            if skip:
                skip = False
            elif arg in flags:
                skip = True
            else:
                out.append(arg)
        return out

    assert containers[:2] == ["--runner", "docker"]
    assert without(containers, "--runner", "--root") == without(demo, "--root")


def test_in_an_image_a_permission_error_names_the_container_fixes(monkeypatch):
    import errno

    from rewardtune.errors import describe_os_error

    err = PermissionError(errno.EACCES, "Permission denied", "/work/prompts")
    monkeypatch.delenv("RT_IN_IMAGE", raising=False)
    assert describe_os_error(err) == "Permission denied: /work/prompts; check the path's permissions or choose another path"
    monkeypatch.setenv("RT_IN_IMAGE", "1")  # set by both Dockerfiles
    line = describe_os_error(err)
    assert line.startswith("Permission denied: /work/prompts; this container runs as uid ")
    assert "-u $(id -u):$(id -g)" in line and "securityContext.fsGroup" in line and "\n" not in line
