"""Rewards from outside the package: a user's Python callable, an entry-point plugin from a separately
installed package, and the import-graph rule that the core never imports the testbed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rewardtune import plugins
from rewardtune.config import RewardSpec, parse_config
from rewardtune.errors import ConfigError, RewardError
from rewardtune.rewards import build_reward, reward_names
from tests.conftest import REPO, tiny_config_dict

PACKAGE = REPO / "shared" / "rewardtune"
# The composition root may wire the testbed in (its `testbed` subcommands import it lazily); nothing else may.
ALLOWED_IMPORTERS = {"cli.py"}

USER_MODULE = '''
import asyncio
import torch

calls = []

def mean_red(images, prompts):
    calls.append(len(prompts))
    return images[:, 0].mean(dim=(1, 2))

async def async_red(images, prompts):
    await asyncio.sleep(0)
    return [float(v) for v in images[:, 0].mean(dim=(1, 2))]

class Scorer:
    def __init__(self):
        self.offset = 10.0
    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) + self.offset

def column(images, prompts):
    return images.mean(dim=(1, 2, 3))[:, None]

def wrong_shape(images, prompts):
    return torch.zeros(len(prompts) + 1)

def nan(images, prompts):
    out = torch.zeros(len(prompts))
    out[0] = float("nan")
    return out

def meta_device(images, prompts):
    return torch.zeros(len(prompts), device="meta")

def broken(images, prompts):
    raise KeyError("weights")

not_callable = 3
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch) -> Path:
    """A user's module that is not installed: found through options.path."""
    (tmp_path / "user_rewards.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))  # options.path inserts into sys.path: undo it after the test
    sys.modules.pop("user_rewards", None)
    yield tmp_path
    sys.modules.pop("user_rewards", None)


def _python_reward(user_code: Path, target: str, **options):
    spec = RewardSpec(name="python", options={"callable": f"user_rewards:{target}", "path": str(user_code), **options})
    return build_reward(spec, "cpu")


def test_a_python_callable_scores_sync_async_class_and_in_chunks(user_code):
    images = torch.rand(5, 3, 8, 8)
    red = images[:, 0].mean(dim=(1, 2))
    prompts = list("abcde")
    torch.testing.assert_close(_python_reward(user_code, "mean_red")(images, prompts), red)
    torch.testing.assert_close(_python_reward(user_code, "async_red")(images, prompts), red)
    torch.testing.assert_close(_python_reward(user_code, "Scorer")(images, prompts), images.mean(dim=(1, 2, 3)) + 10)
    torch.testing.assert_close(_python_reward(user_code, "column")(images, prompts), images.mean(dim=(1, 2, 3)))
    chunked = _python_reward(user_code, "mean_red", batch_size=2)
    torch.testing.assert_close(chunked(images, prompts), red)
    assert sys.modules["user_rewards"].calls[-3:] == [2, 2, 1]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("wrong_shape", "returned scores of shape (3,) for 2 images; return one number per image, shape [2]"),
        ("nan", "returned 1 non-finite value(s) for prompts ['a']"),
        ("meta_device", "returned scores on meta for images on cpu"),
        ("broken", "raised KeyError: 'weights'"),
    ],
)
def test_a_bad_python_reward_output_is_one_line(user_code, target, message):
    reward = _python_reward(user_code, target)
    with pytest.raises(RewardError, match="^reward 'python:user_rewards:") as err:
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"callable": "no_such_module_xyz:f"}, "cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
        ({"callable": "user_rewards:missing"}, "module 'user_rewards' has no 'missing'"),
        ({"callable": "user_rewards:not_callable"}, "is a int, not callable"),
        ({"callable": "user_rewards.mean_red"}, "write it as 'package.module:function'"),
        ({}, "needs options.callable"),
        ({"callable": "user_rewards:mean_red", "batch_size": 0}, "batch_size = 0: must be a positive integer"),
    ],
)
def test_a_python_reward_that_cannot_be_loaded_is_one_line(user_code, options, message):
    with pytest.raises(RewardError) as err:
        build_reward(RewardSpec(name="python", options={"path": str(user_code), **options}), "cpu")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_misspelled_python_option_is_a_config_error(tiny_model_dir):
    data = tiny_config_dict(tiny_model_dir, reward={"name": "python", "options": {"calable": "m:f"}})
    with pytest.raises(ConfigError, match="reward 'python' has no option 'calable' \\(did you mean 'callable'\\?\\)"):
        parse_config(data)


def _train(cfg, out: Path) -> list[dict]:
    from rewardtune.trainer import Trainer

    Trainer(cfg, out).run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tiny_run(tiny_model_dir, reward: dict, epochs: int = 2):
    """Two epochs of one 4-image batch each, a checkpoint per epoch."""
    return parse_config(tiny_config_dict(
        tiny_model_dir, reward=reward, training={"epochs": epochs, "gradient_accumulation_steps": 1},
        sampling={"batches_per_epoch": 1}, checkpointing={"every_epochs": 1},
    ))


def test_a_user_python_reward_trains_a_tiny_run(user_code, tiny_model_dir, tmp_path):
    cfg = _tiny_run(tiny_model_dir, {"name": "python", "options": {"callable": "user_rewards:mean_red",
                                                                   "path": str(user_code)}})
    records = _train(cfg, tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["reward_std"] > 0 for r in records)
    assert sum(sys.modules["user_rewards"].calls) == 2 * cfg.sampling.batch_size  # every sample scored once
    assert (tmp_path / "run" / "checkpoints" / "epoch-000002").is_dir()


# ------------------------------------------------------------------------------------------- plugins
PLUGIN_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "rt-demo-reward"
version = "0.1.0"

[project.entry-points."rewardtune.rewards"]
demo_green = "rt_demo_reward:build"

[tool.setuptools]
py-modules = ["rt_demo_reward"]
'''
PLUGIN_MODULE = '''
import torch

class Green:
    name = "demo_green"
    def __init__(self, scale):
        self.scale = scale
    def __call__(self, images, prompts):
        return self.scale * images[:, 1].mean(dim=(1, 2))

def build(spec, device):
    return Green(float(spec.options.get("scale", 1.0)))

build.options = ("scale",)
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """A tiny separate package, installed by pip (its own pyproject, its own dist-info with entry_points.txt)
    into a private target directory, then put on sys.path: how an installed package's entry points are found."""
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "rt_demo_reward.py").write_text(PLUGIN_MODULE)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "rt_demo_reward-0.1.0.dist-info" / "entry_points.txt").is_file()
    sys.path.insert(0, str(target))
    plugins.entry_points.cache_clear()
    yield target
    sys.path.remove(str(target))
    plugins.entry_points.cache_clear()


def test_an_installed_plugin_reward_is_found_built_and_checked(installed_plugin):
    assert "demo_green" in reward_names()
    images = torch.rand(3, 3, 8, 8)
    reward = build_reward(RewardSpec(name="demo_green", options={"scale": 2.0}), "cpu")
    torch.testing.assert_close(reward(images, ["a", "b", "c"]), 2 * images[:, 1].mean(dim=(1, 2)))
    assert reward.scale == 2.0  # the checking wrapper keeps the plugin's attributes reachable
    with pytest.raises(ConfigError, match="reward 'demo_green' has no option 'scael' \\(did you mean 'scale'\\?\\)"):
        parse_config({"model": {"source": "x"}, "reward": {"name": "demo_green", "options": {"scael": 1}}})


def test_a_plugin_reward_trains_a_tiny_run(installed_plugin, tiny_model_dir, tmp_path):
    records = _train(_tiny_run(tiny_model_dir, {"name": "demo_green", "options": {"scale": 3.0}}), tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0.0 <= r["reward_mean"] <= 3.0 and r["reward_std"] > 0 for r in records)


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    dist = tmp_path / "rt_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rt-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rewardtune.rewards]\nbroken_reward = rt_broken_missing:build\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    plugins.entry_points.cache_clear()
    try:
        with pytest.raises(ConfigError, match="plugin rewardtune.rewards:broken_reward = 'rt_broken_missing:build' "
                           "could not be imported: ModuleNotFoundError"):
            parse_config({"model": {"source": "x"}, "reward": {"name": "broken_reward"}})
    finally:
        monkeypatch.undo()
        plugins.entry_points.cache_clear()


def test_pyproject_declares_exactly_the_builtin_plugins():
    """The built-ins and the testbed register through pyproject's entry points; the fallback table mirrors them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {group: dict(eps) for group, eps in project.items() if group.startswith("rewardtune.")} == plugins.DECLARED
    for group, eps in plugins.DECLARED.items():
        for name in eps:
            assert name in plugins.entry_points(group)


# ------------------------------------------------------------------------------------------- import graph
def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, lazy (in-function) imports included."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_core_module_imports_the_testbed():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "testbed" or str(relative) in ALLOWED_IMPORTERS:
            continue
        hits = sorted(m for m in _imported_modules(path) if m == "rewardtune.testbed" or m.startswith("rewardtune.testbed."))
        if hits:
            offenders[str(relative)] = hits
    assert offenders == {}


def test_importing_and_using_the_core_does_not_load_the_testbed():
    script = textwrap.dedent('''
        import sys, torch
        import rewardtune.config, rewardtune.trainer, rewardtune.evaluate, rewardtune.report, rewardtune.stages
        import rewardtune.rewards.towers, rewardtune.tracking, rewardtune.export
        from rewardtune.config import RewardSpec
        from rewardtune.rewards import build_reward, reward_names
        assert "testbed_proxy" in reward_names()          # listed by entry point, not imported
        build_reward(RewardSpec(name="brightness"))(torch.rand(1, 3, 4, 4), ["x"])
        print(sorted(m for m in sys.modules if m.startswith("rewardtune.testbed") or m == "rewardtune.testbed"))
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "[]"
