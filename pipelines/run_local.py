"""Run the pipeline with kfp.local on the embedded default (2 CPU cores, no cluster).

    python pipelines/run_local.py [--config configs/testbed.yaml] [--epochs N] [--root runs/kfp-local]
        [--algorithms ddpo,tdpo_r] [--arms-from benchmarks/overopt/protocol.yaml] [--set KEY=VALUE]
        [--arm-set ALGORITHM:KEY=VALUE] [--runner subprocess|docker]

`--runner subprocess` (default, `make demo`) runs every task as a process of this checkout; `--runner docker`
(`make demo-containers`) runs every task in its own container of the images built by `make images`
(kfp.local's DockerRunner through DOCKER_HOST: Docker, or podman's Docker-compatible socket), as on a backend.

The embedded default is the overoptimization testbed (configs/testbed.yaml: the committed tiny model,
trained on the learned proxy reward, judged on the gold rewards it never sees); `--config configs/tiny.yaml
--model DIR` runs the random tiny model instead.

Runs the whole alignment DAG — plan-arms, prepare-prompts, cache-models -> per algorithm (ParallelFor):
train -> evaluate (per checkpoint, ParallelFor + Collected) -> collect-arm, export -> one report over the arms
(Collected), inside the exit handler — with the kfp-kubernetes settings ignored (kfp.local has no cluster),
the model cache in a local directory, and prints where the report is. `--arms-from` takes each algorithm's
calibrated overrides (and CDPO's fidelity constraint) from a benchmark protocol's arms.
"""

import argparse
import builtins
import contextlib
import functools
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "testbed.yaml"
sys.path[:0] = [str(REPO), str(REPO / "shared")]
# Component subprocesses import rewardtune from the same checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "shared"), str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kfp import local  # noqa: E402

from components.images import CPU_IMAGE, TRAINER_IMAGE  # noqa: E402
from pipelines.alignment import alignment_pipeline  # noqa: E402
from rewardtune.arms import plan_arms  # noqa: E402
from rewardtune.errors import ConfigError  # noqa: E402
from rewardtune.stages import param_overrides  # noqa: E402


def local_config_text(config: Path, model_dir: Path | None = None, sets: list[str] | None = None) -> str:
    """The config as YAML text with `sets` (section.key=value) applied and `model.source` replaced by `model_dir`
    when given; a relative source that exists from the repository root is made absolute (component subprocesses
    run in their own cwd)."""
    import yaml

    from rewardtune.config import apply_overrides

    data = apply_overrides(yaml.safe_load(config.read_text()), list(sets or []))
    source = data["model"]["source"]
    if model_dir is not None:
        data["model"]["source"] = str(model_dir.resolve())
    elif not Path(source).is_absolute() and (REPO / source).exists():
        data["model"]["source"] = str((REPO / source).resolve())
    data.setdefault("logging", {})["progress_bars"] = False
    return yaml.safe_dump(data, sort_keys=False)


def protocol_arm_overrides(protocol: Path, algorithms: list[str]) -> dict[str, list[str]]:
    """Each algorithm's overrides from the protocol arm that runs it (its calibrated learning rate); CDPO also gets
    the protocol's constraint E[fidelity] >= base - cdpo_fidelity_margin, as the benchmark gives it."""
    from rewardtune.testbed.compare import FIDELITY
    from rewardtune.testbed.protocol import load_protocol

    p = load_protocol(protocol)
    out = {}
    for name in algorithms:
        arm = next((a for a in p.arms if a.algorithm == name), None)
        if arm is None:
            raise ConfigError(f"--arms-from {protocol}: no arm runs {name}; its arms run {[a.algorithm for a in p.arms]}")
        out[name] = list(arm.overrides)
        if name == "cdpo":
            out[name].append(f"algorithm.constraints=[{{reward: {{name: {FIDELITY}}}, relative_margin: {p.cdpo_fidelity_margin}}}]")
    return out


def parse_arm_set(item: str, algorithms: list[str]) -> tuple[str, str]:
    """`ALGORITHM:KEY=VALUE` -> (algorithm, `KEY=VALUE`); the algorithm must be one of `--algorithms`."""
    name, sep, override = item.partition(":")
    if not sep or "=" not in override:
        raise ConfigError(f"--arm-set {item!r}: write ALGORITHM:KEY=VALUE, e.g. grpo:algorithm.group.group_size=2")
    if name not in algorithms:
        raise ConfigError(f"--arm-set {item!r}: {name!r} is not one of --algorithms {algorithms}; add it there or fix the name")
    return name, override


@contextlib.contextmanager
def print_restored() -> Iterator[None]:
    """Put `builtins.print` back as it was on the way out.

    kfp.local indents each task's logs by swapping `builtins.print` for a wrapper and restoring the one it saw
    on entry; tasks that run concurrently (ParallelFor iterations) restore out of order and leave wrappers
    installed, so every later print in the process gains 4 spaces per leaked level.
    """
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


# Passed from this process into every task container, as the subprocess runner's tasks inherit them.
CONTAINER_ENV = ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


IMAGE_PARAMETER = re.compile(r"^\{\{\$\.inputs\.parameters\['(?:pipelinechannel--)?(\w+)'\]\}\}(?::latest)?$")


def resolve_image(image: str, images: dict[str, str]) -> str:
    """A task's image: a literal, or the whole-reference placeholder of an image parameter (`trainer_image`,
    `cpu_image`), which a KFP backend's driver replaces by the parameter's value and kfp.local 2.17 does not."""
    match = IMAGE_PARAMETER.match(image)
    if match is None:
        return image
    if match.group(1) not in images:
        raise RuntimeError(f"task image {image}: no value for the pipeline parameter {match.group(1)!r}")
    return images[match.group(1)]


def run_container(client, image: str, command: list[str], volumes: dict, images: dict[str, str] | None = None,
                  **run_args) -> int:
    """kfp.local's `run_docker_container` without auto-remove: start, stream the logs, wait, then remove.

    kfp.local 2.17 starts task containers with `auto_remove=True`; podman's Docker API then answers a wait on a
    container that already removed itself with 500 ("no such container"), not Docker's 404 that kfp catches,
    so a fast task fails though it succeeded. Waiting before removing gives every task its real exit code on
    Docker and podman alike. The images run as their own non-root user, as on a backend, and the task's command
    replaces the image's entrypoint, as a pod's `command` does.
    """
    import docker

    image = resolve_image(image, images or {})
    if ":" not in image.rsplit("/", 1)[-1]:
        image = f"{image}:latest"
    if not any(image in img.tags for img in client.images.list()):
        raise RuntimeError(f"image {image} is not in the container runtime: build it with `make images`")
    env = {**{k: os.environ[k] for k in CONTAINER_ENV if k in os.environ}, **run_args.pop("environment", {})}
    # A pod's `command` replaces the image's ENTRYPOINT (`rewardtune`); Docker's `command` would only be its arguments.
    container = client.containers.run(image=image, entrypoint=command[:1], command=command[1:], detach=True,
                                      stdout=True, stderr=True, volumes=volumes, auto_remove=False, environment=env,
                                      **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def waited_containers(images: dict[str, str]) -> Iterator[None]:
    """kfp.local's DockerRunner with `run_container` (image parameters resolved from `images`) in place of its
    auto-removing runner, for this block only (kfp's files stay as installed)."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = functools.partial(run_container, images=images)
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def writable_for_containers(*dirs: Path) -> None:
    """Let the images' non-root user (uid 1000) write the bind-mounted pipeline root, as `fsGroup` does in a pod."""
    for path in dirs:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(path.stat().st_mode | stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)


def run_local(root: Path, model_dir: Path | None = None, epochs: int = 0, config: Path = DEFAULT_CONFIG,
              algorithms: list[str] | None = None, arm_overrides: dict[str, list[str]] | None = None,
              sets: list[str] | None = None, runner: str = "subprocess") -> tuple[Path, list[Path]]:
    """Run the alignment DAG under kfp.local; returns (the report's HTML file, the arms' training run directories).

    `model_dir`: a tiny model directory (built with `init-tiny` if missing) that replaces the config's model.
    Arms train side by side (kfp.local runs at most 2 loop iterations at once), so each step gets the machine's
    cores divided by the number of arms as torch threads rather than every process taking them all.
    `runner="docker"`: every task in its own container of the built images (the pipeline root is mounted at the
    same path, so a `model_dir` must lie under `root`).
    """
    if model_dir is not None and not (model_dir / "model_index.json").is_file():
        from rewardtune.tiny import init_tiny

        init_tiny(model_dir)
    root = root.resolve()
    if len(algorithms or []) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // min(2, len(algorithms)))))
    if runner == "docker":
        writable_for_containers(root, root / "model-cache", root / "checkpoints")
        local.init(runner=local.DockerRunner(), pipeline_root=str(root), raise_on_error=True)
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    images = {"trainer_image": TRAINER_IMAGE, "cpu_image": CPU_IMAGE}  # the DAG's defaults: what `make images` builds
    with print_restored(), waited_containers(images) if runner == "docker" else contextlib.nullcontext():
        alignment_pipeline(config=local_config_text(config, model_dir, sets), epochs=epochs,
                           model_cache_uri=str(root / "model-cache"), checkpoint_dir=str(root / "checkpoints"),
                           algorithms=list(algorithms or []), arm_overrides=dict(arm_overrides or {}))
    reports = sorted(root.rglob("html"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise RuntimeError(f"the pipeline finished but wrote no report under {root}")
    # the train steps' artifacts (collect-arm's copies sit in a folder named "run")
    run_dirs = sorted(p.parent for p in root.rglob("checkpoints/metrics.jsonl"))
    # KFP names the artifact file "html"; a copy with a suffix opens in a browser by double-click.
    report = root / "report.html"
    tmp = report.with_suffix(".html.tmp")
    shutil.copyfile(reports[-1], tmp)
    tmp.replace(report)
    return report, run_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "kfp-local", help="kfp.local pipeline root")
    parser.add_argument("--model", type=Path, default=None,
                        help="replace the config's model with this tiny model dir (built with init-tiny if missing)")
    parser.add_argument("--epochs", type=int, default=0, help="override training.epochs (0: the config's)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config")
    parser.add_argument("--algorithms", default="", help="comma-separated arms trained side by side (default: the config's algorithm)")
    parser.add_argument("--arms-from", type=Path, default=None, help="take each arm's overrides from this benchmark protocol")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override the config for every arm, e.g. evaluation.num_heldout_prompts=8 (repeatable)")
    parser.add_argument("--arm-set", dest="arm_sets", action="append", default=[], metavar="ALGORITHM:KEY=VALUE",
                        help="override one arm's config (the DAG's arm_overrides), e.g. grpo:algorithm.group.group_size=2 (repeatable)")
    parser.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                        help="docker: every task in its own container of the built images (DOCKER_HOST; make images)")
    args = parser.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    try:  # the DAG's plan-arms step checks the same, but a typo should not wait for kfp.local to start
        overrides = protocol_arm_overrides(args.arms_from, algorithms) if args.arms_from else {}
        for name, override in map(lambda item: parse_arm_set(item, algorithms), args.arm_sets):
            overrides.setdefault(name, []).append(override)
        plan_arms(local_config_text(args.config, args.model, args.sets), "", algorithms, overrides,
                  param_overrides(epochs=args.epochs))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report, run_dirs = run_local(args.root, args.model, args.epochs, args.config, algorithms, overrides, args.sets,
                                 runner=args.runner)
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {report}")
    for run_dir in run_dirs:
        print(f"run: {run_dir} (metrics.jsonl, checkpoints/)")
    print(f"all artifacts: {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
