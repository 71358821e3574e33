"""Build (and optionally push) the project images named in images/images.yaml, the same names the components use.

    python images/build.py                     # build every image (podman or docker, whichever is there)
    python images/build.py trainer --push
    python images/build.py --profile local     # on localhost/python:3.11-bookworm with this machine's wheels
    python images/build.py --dry-run           # print the commands only

Profiles (images.yaml `profiles`): `registry` builds on the Dockerfiles' pinned bases and wheel indexes;
`local` builds where Docker Hub is unreachable, after ../shared/tools/container-runtime.sh; `auto` (the
default) picks `local` when its base image exists in the runtime, else `registry`. After each build it prints
the seconds it took and the image's size, the numbers docs/containers.md reports.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES_FILE = REPO / "images" / "images.yaml"
RUNTIMES = ("podman", "docker")


def load_images(path: Path = IMAGES_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def image_ref(key: str, tag: str | None = None, spec: dict | None = None) -> str:
    """`registry/name:tag` for one image key (trainer, cpu)."""
    spec = spec or load_images()
    return f"{spec['registry']}/{spec['images'][key]['name']}:{tag or spec['tag']}"


def detect_runtime() -> str | None:
    """podman when installed (its CLI needs no daemon), else docker when its daemon answers, else None."""
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return None


def image_exists(runtime: str, ref: str) -> bool:
    return subprocess.run([runtime, "image", "inspect", ref], capture_output=True).returncode == 0


def image_size(runtime: str, ref: str) -> int:
    """The image's size in bytes, as `podman/docker image inspect --format '{{.Size}}'` reports it."""
    out = subprocess.run([runtime, "image", "inspect", "--format", "{{.Size}}", ref], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip())


def local_wheel_dirs() -> list[str]:
    """The host pip's local find-links directories and file:// indexes (`pip config list`), which a build does
    not see unless they are mounted; an index is given as its `.../simple` URL, mounted from its parent (its
    links point at ../../files)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    dirs: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("find-links", "extra-index-url", "index-url")):
            for part in value.strip().strip("'\"").split():
                path = part.removeprefix("file://")
                if path.startswith("/") and Path(path).exists() and path.rstrip("/") not in dirs:
                    dirs.append(path.rstrip("/"))
    return dirs


def wheel_options(dirs: list[str]) -> tuple[list[str], str]:
    """(`-v DIR:DIR:ro` build mounts, pip options) that let the build's RUN steps install from `dirs`."""
    mounts, pip = [], []
    for path in dirs:
        if path.endswith("/simple"):
            mounts += ["-v", f"{path.rsplit('/', 1)[0]}:{path.rsplit('/', 1)[0]}:ro"]
            pip += ["--extra-index-url", f"file://{path}"]
        else:
            mounts += ["-v", f"{path}:{path}:ro"]
            pip += ["--find-links", path]
    return mounts, shlex.join(pip)


def resolve_profile(name: str, runtime: str, spec: dict) -> str:
    """`auto`: `local` when the local profile's base image is in the runtime, else `registry`."""
    if name != "auto":
        if name not in spec["profiles"]:
            raise SystemExit(f"error: unknown profile '{name}'; images.yaml defines {', '.join(spec['profiles'])}")
        return name
    base = spec["profiles"]["local"]["common"]["BASE_IMAGE"]
    return "local" if runtime and image_exists(runtime, base) else "registry"


def build_commands(keys: list[str], tag: str | None, push: bool, runtime: str = "docker",
                   profile: str = "registry") -> list[list[str]]:
    spec = load_images()
    prof = spec["profiles"][profile] or {}
    mounts: list[str] = []
    pip_args = ""
    if prof.get("mount_wheels"):
        if runtime != "podman":
            raise SystemExit(f"error: profile '{profile}' mounts local wheels into the build, which needs podman "
                             "(`docker build` has no -v); install it with ../shared/tools/container-runtime.sh")
        mounts, pip_args = wheel_options(local_wheel_dirs())
    commands = []
    for key in keys or list(spec["images"]):
        if key not in spec["images"]:
            raise SystemExit(f"unknown image '{key}'; images.yaml defines {', '.join(spec['images'])}")
        ref = image_ref(key, tag, spec)
        args = {**(prof.get("common") or {}), **(prof.get(key) or {})}
        if pip_args:
            args["PIP_EXTRA_ARGS"] = " ".join(filter(None, [args.get("PIP_EXTRA_ARGS", ""), pip_args]))
        cmd = [runtime, "build", "-f", spec["images"][key]["dockerfile"], "--build-arg", f"VERSION={tag or spec['tag']}"]
        for name, value in args.items():
            cmd += ["--build-arg", f"{name}={value}"]
        if runtime == "podman":  # the docker format keeps SHELL (OCI drops it); mounts only where the profile has them
            cmd += ["--format", "docker", *mounts]
        commands.append([*cmd, "-t", ref, "."])
        if push:
            commands.append([runtime, "push", ref])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image keys from images.yaml (default: all)")
    parser.add_argument("--tag", help="override the tag from images.yaml")
    parser.add_argument("--push", action="store_true")
    parser.add_argument("--runtime", choices=RUNTIMES, help="default: podman if installed, else docker")
    parser.add_argument("--profile", default="auto", help="build-arg profile from images.yaml, or auto (default)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    runtime = args.runtime or detect_runtime()
    if runtime is None and not args.dry_run:
        print("error: no container runtime: install podman (bash ../shared/tools/container-runtime.sh) or docker",
              file=sys.stderr)
        return 2
    runtime = runtime or "docker"
    profile = resolve_profile(args.profile, runtime, load_images())
    print(f"# runtime {runtime}, profile {profile}", flush=True)
    for cmd in build_commands(args.images, args.tag, args.push, runtime, profile):
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        if cmd[1] == "build":
            ref = cmd[-2]
            size = image_size(runtime, ref)
            print(f"built {ref} in {time.perf_counter() - start:.0f} s, {size / 1e9:.2f} GB ({size} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
