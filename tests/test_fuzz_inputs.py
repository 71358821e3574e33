"""Property-based fuzzing of the whole input surface against the CLI contract (issue 14).

Inputs: valid configs mutated field by field (types, signs, zero, huge, NaN/inf, unicode, wrong enums,
missing/extra keys, nested structure), `--set` strings, and damaged files: model and reward directories,
cache manifests, checkpoints, metrics, prompt files in every supported format and in any encoding and
Unicode content a file can hold, config files; and every other CLI's arguments (evaluate, export, report,
prepare-prompts, cache-models, validate-config) with damaged run and evaluation directories.

Contract, for every case: exit 0 and a sane run, or exit 2 with exactly one `error:` line (the last line)
and no traceback; never exit 1; never a half-written checkpoint; never a changed file outside `--out`.

Profiles: the default one (in `make test`) runs a small, fixed-seed sample; `RT_FUZZ_PROFILE=long` draws
`RT_FUZZ_SCALE` (default 25) times as many cases from random seeds. `RT_FUZZ_LOG=FILE` appends one JSON
line per case (kind, exit status, error line) so a long run's numbers survive a time limit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from rewardtune.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint
from rewardtune.metrics import MetricsLog
from tests.cli_inproc import run_main
from tests.conftest import one_epoch_lora_dict
from tests.damage import files_of, rehash_checkpoint

LONG = os.environ.get("RT_FUZZ_PROFILE", "default") == "long"
SCALE = int(os.environ.get("RT_FUZZ_SCALE", "25")) if LONG else 1
LOG = os.environ.get("RT_FUZZ_LOG")
ROOT = os.geteuid() == 0


def fuzz_settings(examples: int):
    """Fixed seed and no example database by default (reproducible, writes nothing); random in the long profile."""
    phases = (Phase.explicit, Phase.generate) if LONG else tuple(Phase)  # a bounded long run: report, don't shrink
    return settings(max_examples=examples * SCALE, derandomize=not LONG, database=None, deadline=None,
                    print_blob=True, suppress_health_check=list(HealthCheck), phases=phases)


# ------------------------------------------------------------------------------------------------ the contract
def snapshot(roots: list[Path], skip: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, mode) of every entry under `roots` except `skip`: what must not change."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if skip is not None and (path == skip or skip in path.parents):
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            state[str(path)] = (info.st_size if not stat.S_ISDIR(info.st_mode) else 0, info.st_mtime_ns
                                if not stat.S_ISDIR(info.st_mode) else 0, info.st_mode)
    return state


def checkpoint_stamps(out: Path | None) -> dict[str, int]:
    """Checkpoint name -> its manifest's mtime: which checkpoints a command wrote (damaged inputs stay damaged)."""
    root = out / "checkpoints" if out is not None else None
    if root is None or not root.is_dir():
        return {}
    return {p.name: (p / MANIFEST).stat().st_mtime_ns if (p / MANIFEST).is_file() else 0 for p in list_checkpoints(root)}


def check_contract(kind: str, result, watched_before, watched: list[Path], out: Path | None,
                   epochs: int | None = None, stamps_before: dict[str, int] | None = None) -> None:
    """Assert the CLI contract for one case (and log it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    if LOG:
        with open(LOG, "a") as handle:
            handle.write(json.dumps({"kind": kind, "rc": result.returncode, "error": errors[0][:200] if errors else None})
                         + "\n")
    assert result.returncode in (0, 2), f"[{kind}] exit {result.returncode}:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, f"[{kind}]\n{result.stderr[-4000:]}"
    if result.returncode == 2:
        assert len(errors) == 1 and lines[-1] == errors[0], f"[{kind}] not one error line:\n{result.stderr[-2000:]}"
    else:
        assert not errors, f"[{kind}] exit 0 with an error line:\n{result.stderr[-2000:]}"
    assert snapshot(watched, skip=out) == watched_before, f"[{kind}] a file outside --out changed"
    if out is not None:
        checkpoints = out / "checkpoints"
        if checkpoints.is_dir():
            assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")], f"[{kind}] temp left"
            for name, stamp in checkpoint_stamps(out).items():  # every checkpoint this command wrote is complete
                if (stamps_before or {}).get(name) != stamp:
                    verify_checkpoint(checkpoints / name)
        if result.returncode == 0 and epochs is not None:
            records = MetricsLog(out / "metrics.jsonl").read()
            seen = [r["epoch"] for r in records]
            if kind == "checkpoint-resume":  # a damaged metrics.jsonl may have lost earlier epochs' lines
                assert seen == sorted(set(seen)) and seen[-1:] == [epochs - 1], f"[{kind}] metrics: {records}"
            else:
                assert seen == list(range(epochs)), f"[{kind}] metrics: {records}"
            assert all(isinstance(r["reward_mean"], float) and math.isfinite(r["reward_mean"]) for r in records)
            verify_checkpoint(list_checkpoints(checkpoints)[-1])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir, tiny_rewards) -> dict[str, Any]:
    """A tiny 1-epoch LoRA DDPO config, a finished run of it, and a cached reward entry: the pristine corpus."""
    from rewardtune.cache import ModelRef, cache_models
    from rewardtune.config import parse_config

    root = tmp_path_factory.mktemp("fuzz")
    data = one_epoch_lora_dict(
        tiny_model_dir,
        keep_last=2,
        evaluation={"num_heldout_prompts": 2, "num_train_prompts": 0, "images_per_prompt": 1, "batch_size": 2,
                    "grid_prompts": 1},
    )
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(data))
    run = root / "run"
    result = run_main(["train", "--config", str(config), "--out", str(run)])
    assert result.returncode == 0, result.stderr
    evaluation = root / "eval"
    result = run_main(["evaluate", "--config", str(config), "--run", str(run), "--out", str(evaluation)])
    assert result.returncode == 0, result.stderr
    cache = root / "cache"
    [entry] = cache_models([ModelRef(tiny_rewards["aesthetic"])], str(cache))
    full = parse_config(data).model_dump(mode="json")
    return {"data": data, "full": full, "config": config, "run": run, "eval": evaluation, "cache_entry": cache / entry.key,
            "model": tiny_model_dir, "rewards": tiny_rewards, "watched": [Path(tiny_model_dir), Path(tiny_rewards["aesthetic"]).parent, root]}


class Sandbox:
    """A fresh directory per case; the environment points every cache into it (all writes are visible)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rt-fuzz-"))
        self.env = {"RT_MODEL_DIR": str(self.root / "out" / ".models"), "HF_HOME": str(self.root / "hf-home"),
                    "RT_MODEL_CACHE": None, "RT_FAULT_AT": None}

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in [self.root, *self.root.rglob("*")]:
            try:
                if not path.is_symlink():
                    os.chmod(path, 0o700 if path.is_dir() else 0o600)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, kind: str, argv: list[str], base: dict, out: Path | None = None, epochs: int | None = None):
        watched = [*base["watched"], self.root]
        before, stamps = snapshot(watched, skip=out), checkpoint_stamps(out)
        result = run_main(argv, self.env)
        check_contract(kind, result, before, watched, out, epochs, stamps)
        return result


# ------------------------------------------------------------------------------------------------ strategies
ODD_TEXT = ["", " ", "{}", "a {} b", "{0}", "{x}", "{", "ünïcødé 🐍", "\x00", "\n", "a\u2028b", "../../..", "/etc/passwd",
            "s3://", "s3://bucket", "file://", "https://u:p@h/x", "~", "-1", "1e309", "nan", ".inf", "null", "yes",
            "ddpo", "tdpo", "tdpo_r", "cdpo", "lora", "full", "fp16", "bf16", "cuda", "cpu", "auto", "brightness",
            "aesthetic", "jpeg_compressibility", "critic", "policy_lora", "simple_animals", "testbed", "x" * 300]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1e300, 0.5, 1.5]),
    st.sampled_from(ODD_TEXT), st.text(max_size=20),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.sampled_from(["name", "x", "", "source"]),
                                                                             SCALARS, max_size=3))


def leaf_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(data, dict):
        out = [prefix] if prefix else []
        for key, value in data.items():
            out += leaf_paths(value, (*prefix, key))
        return out
    if isinstance(data, list):
        return [prefix, *[p for i, v in enumerate(data) for p in leaf_paths(v, (*prefix, i))]]
    return [prefix]


def mutate(data: dict, path: tuple, op: str, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "delete":
        del node[last]
    elif op == "extra" and isinstance(node[last], dict):
        node[last]["unexpected_key"] = value
    elif op == "nest":
        node[last] = {"value": node[last]}
    elif op == "wrap":
        node[last] = [node[last]]
    else:
        node[last] = value


def dump(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return yaml.safe_dump(data)


# ------------------------------------------------------------------------------------------------ A. configs
@fuzz_settings(60)
@given(st.data())
def test_mutated_configs_validate_or_refuse(base, data):
    """Any config: validate-config either accepts it (and --print round-trips) or refuses it in one line."""
    config = copy.deepcopy(base["full"])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = leaf_paths(config)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra", "nest", "wrap"]), label="op")
        mutate(config, path, op, data.draw(VALUES, label="value"))
    with Sandbox() as box:
        path = box.root / "config.yaml"
        path.write_text(dump(config))
        result = box.run("config", ["validate-config", "--config", str(path), "--print"], base)
        if result.returncode == 0:
            from rewardtune.config import parse_config

            printed = parse_config(yaml.safe_load(result.stdout))
            assert parse_config(yaml.safe_load(printed.to_yaml())) == printed


OVERRIDE_KEYS = ["training.epochs", "training.learning_rate", "model.source", "model", "reward", "reward.options",
                 "reward.options.w", "prompts.template", "algorithm.name", "algorithm.constraints", "sampling",
                 "algorithm.critic.hidden_sizes", "eval_rewards", "", ".", "a..b", "model.source.x", "training.epochs.0",
                 "device", "ünï.cødé", "training"]
YAMLISH = ["[", "]", "{", "}", "{a: [", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}", "&a x",
           "*a", "|", ">", "'", '"', "%", "@", "`", "---", "...", "? x", "- x", "1e5", "0x10", "0o17", ".nan", "~",
           "2001-01-01", "!!timestamp x", "{name: aesthetic}", "[{name: brightness}]", "!!str 3", "<<: {a: 1}", "a: b: c"]


@fuzz_settings(60)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(OVERRIDE_KEYS), st.one_of(st.sampled_from(YAMLISH), st.sampled_from(ODD_TEXT), st.text(max_size=15)))
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=25)), min_size=1, max_size=4))
def test_override_strings_validate_or_refuse(base, overrides):
    with Sandbox() as box:
        argv = ["validate-config", "--config", str(base["config"]), *(f"--set={item}" for item in overrides)]
        box.run("set", argv, base)


# ------------------------------------------------------------------------------------------------ B. training configs
TRAIN_FIELDS: dict[str, st.SearchStrategy] = {
    "training.learning_rate": st.sampled_from([0, -1e-3, 1e-12, 1e-3, 1e30, float("nan"), float("inf"), "x"]),
    "training.max_grad_norm": st.sampled_from([0, 1e-30, 1.0, 1e30, float("inf")]),
    "training.clip_range": st.sampled_from([0, 1e-8, 1.0, 1e9]),
    "training.adv_clip_max": st.sampled_from([0, 1e-9, 5.0, 1e30]),
    "training.inner_epochs": st.integers(-1, 2),
    "training.timestep_fraction": st.sampled_from([0, 0.01, 0.5, 1.0, 1.01]),
    "training.fused_steps": st.integers(0, 3),
    "training.gradient_accumulation_steps": st.integers(0, 3),
    "training.batch_size": st.integers(0, 3),
    "training.mixed_precision": st.sampled_from(["no", "bf16", "fp16", "fp8"]),
    "training.seed": st.sampled_from([0, -1, 2**40, 10**30]),
    "sampling.num_steps": st.integers(0, 4),
    "sampling.eta": st.sampled_from([0, 1e-9, 0.5, 1.0, 2.0]),
    "sampling.guidance_scale": st.sampled_from([0.5, 1.0, 7.5, 1e6, 1e300]),
    "sampling.batch_size": st.integers(0, 3),
    "sampling.resolution": st.sampled_from([-8, 0, 7, 8, 16, 33]),
    "sampling.negative_prompt": st.sampled_from(["", "blurry", "ünï 🐍", "a " * 100]),
    "model.lora_rank": st.integers(0, 9),
    "model.lora_alpha": st.sampled_from([None, 0, 1e-9, 1.0, 1e9]),
    "model.lora_target_modules": st.sampled_from([[], ["to_q"], ["nonexistent"], [""], ["conv1"], ["to_k", "to_k"]]),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "model.finetune": st.sampled_from(["lora", "full"]),
    "prompts.template": st.sampled_from(["{}", "a photo of {}", "{} {}", "{{}} {}", "ünï {} 🐍", "{0}"]),
    "prompts.source": st.sampled_from(["simple_animals", "imagenet_dogs", "testbed", "nope", ""]),
    "reward.name": st.sampled_from(["brightness", "jpeg_compressibility", "jpeg_incompressibility", "aesthetic",
                                    "clipscore", "testbed_proxy"]),
    "algorithm.name": st.sampled_from(["ddpo", "tdpo"]),
    "checkpointing.every_epochs": st.integers(0, 3),
    "checkpointing.keep_last": st.integers(0, 2),
    "device": st.sampled_from(["cpu", "auto", "cuda"]),
}


@fuzz_settings(6)
@given(st.data())
def test_mutated_training_configs_train_or_refuse(base, data):
    """A short real training run for configs mutated where training reads them."""
    config = copy.deepcopy(base["data"])
    fields = data.draw(st.lists(st.sampled_from(sorted(TRAIN_FIELDS)), min_size=1, max_size=2, unique=True), label="fields")
    for field in fields:
        section, _, key = field.rpartition(".")
        value = data.draw(TRAIN_FIELDS[field], label=field)
        (config.setdefault(section, {}) if section else config)[key] = value
    with Sandbox() as box:
        path = box.root / "config.yaml"
        path.write_text(dump(config))
        out = box.root / "out"
        box.run("train-config", ["train", "--config", str(path), "--out", str(out)], base, out, epochs=1)


# ------------------------------------------------------------------------------------------------ C. damaged files
DAMAGE = ["truncate", "garbage", "empty", "append", "flip", "delete", "dir", "symlink-missing", "symlink-loop",
          "unreadable"]


def damage(path: Path, op: str, data) -> None:
    """Damage one file in place; ops that need a non-root user are skipped when running as root."""
    if op == "unreadable":
        assume(not ROOT)  # root reads everything; tests/test_reliability2.py covers it as another user
        os.chmod(path, 0)
        return
    raw = path.read_bytes() if path.is_file() else b""
    if op == "truncate":
        path.write_bytes(raw[: int(len(raw) * data.draw(st.floats(0, 0.999), label="keep"))])
    elif op == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=300), label="bytes"))
    elif op == "empty":
        path.write_bytes(b"")
    elif op == "append":
        path.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64), label="tail"))
    elif op == "flip" and raw:
        buf = bytearray(raw)
        for position in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8), label="at"):
            buf[position] ^= data.draw(st.integers(1, 255), label="mask")
        path.write_bytes(bytes(buf))
    elif op == "delete":
        path.unlink()
    elif op == "dir":
        path.unlink()
        path.mkdir()
    elif op == "symlink-missing":
        path.unlink()
        path.symlink_to(path.with_name("does-not-exist"))
    elif op == "symlink-loop":
        path.unlink()
        path.symlink_to(path)


@fuzz_settings(5)
@given(st.data())
def test_damaged_model_dir(base, data):
    with Sandbox() as box:
        model = Path(shutil.copytree(base["model"], box.root / "model"))
        target = data.draw(st.sampled_from(files_of(model)), label="file")
        damage(target, data.draw(st.sampled_from(DAMAGE), label="op"), data)
        out = box.root / "out"
        box.run("model", ["train", "--config", str(base["config"]), "--out", str(out), f"--set=model.source={model}"],
                base, out, epochs=1)


@fuzz_settings(4)
@given(st.data())
def test_damaged_reward_dir(base, data):
    with Sandbox() as box:
        name = data.draw(st.sampled_from(["aesthetic", "clipscore"]), label="reward")
        reward = Path(shutil.copytree(base["rewards"][name], box.root / "reward"))
        target = data.draw(st.sampled_from(files_of(reward)), label="file")
        damage(target, data.draw(st.sampled_from(DAMAGE), label="op"), data)
        out = box.root / "out"
        argv = ["train", "--config", str(base["config"]), "--out", str(out), f"--set=reward.name={name}",
                f"--set=reward.source={reward}"]
        box.run("reward", argv, base, out, epochs=1)


MANIFEST_EDITS = ["drop-files", "files-list", "files-empty", "abs-name", "dotdot-name", "size-str", "size-neg",
                  "sha-wrong", "entry-null", "root-list", "unicode-name", "bytes"]


@fuzz_settings(6)
@given(st.data())
def test_damaged_cache_manifest(base, data):
    from rewardtune.cache import MANIFEST as CACHE_MANIFEST

    with Sandbox() as box:
        entry = Path(shutil.copytree(base["cache_entry"], box.root / "cache" / base["cache_entry"].name))
        path = entry / CACHE_MANIFEST
        manifest = json.loads(path.read_text())
        edit = data.draw(st.sampled_from(MANIFEST_EDITS), label="edit")
        first = next(iter(manifest["files"]))
        if edit == "bytes":
            damage(path, data.draw(st.sampled_from(DAMAGE[:5]), label="op"), data)
        else:
            if edit == "drop-files":
                del manifest["files"]
            elif edit == "files-list":
                manifest["files"] = list(manifest["files"])
            elif edit == "files-empty":
                manifest["files"] = {}
            elif edit in ("abs-name", "dotdot-name", "unicode-name"):
                name = {"abs-name": str(box.root / "planted"), "dotdot-name": "../../planted",
                        "unicode-name": "ünï/../../../planted"}[edit]
                manifest["files"][name] = manifest["files"][first]
            elif edit == "size-str":
                manifest["files"][first]["size"] = "12"
            elif edit == "size-neg":
                manifest["files"][first]["size"] = -1
            elif edit == "sha-wrong":
                manifest["files"][first]["sha256"] = "0" * 64
            elif edit == "entry-null":
                manifest["files"][first] = None
            elif edit == "root-list":
                manifest = [manifest]
            path.write_text(json.dumps(manifest))
        out = box.root / "out"
        argv = ["train", "--config", str(base["config"]), "--out", str(out), "--set=reward.name=aesthetic",
                f"--set=reward.source={entry}"]
        box.run("manifest", argv, base, out, epochs=1)
        assert not (box.root / "planted").exists() and not (box.root.parent / "planted").exists()


@fuzz_settings(6)
@given(st.data())
def test_damaged_checkpoint_resume_or_evaluate(base, data):
    """A damaged checkpoint, with its manifest left stale (skipped, start over) or re-hashed (the loader sees it)."""
    with Sandbox() as box:
        run = Path(shutil.copytree(base["run"], box.root / "out"))
        checkpoint = run / "checkpoints" / "epoch-000001"
        target = data.draw(st.sampled_from(files_of(checkpoint) + [run / "metrics.jsonl"]), label="file")
        damage(target, data.draw(st.sampled_from(DAMAGE), label="op"), data)
        if data.draw(st.booleans(), label="rehash"):
            rehash_checkpoint(checkpoint)
        if data.draw(st.booleans(), label="evaluate"):
            argv = ["evaluate", "--config", str(base["config"]), "--run", str(run), "--out", str(run / "eval")]
            box.run("checkpoint-evaluate", argv, base, run)
        else:
            argv = ["train", "--config", str(base["config"]), "--out", str(run), "--resume", "--set=training.epochs=2"]
            box.run("checkpoint-resume", argv, base, run, epochs=2)


PROMPT_LINES = ["a cat", "a dog on grass", "ünïcødé 🐍 prompt", "a \"quoted\" horse", "comma, separated", "tab\tinside"]
PROMPT_DAMAGE = ["none", "newline-in-prompt", "u2028-in-prompt", "nul", "bom", "latin1", "not-object", "no-key",
                 "number", "no-header", "unbalanced-quote", "long", "blank", *DAMAGE]


def prompt_file(path: Path, lines: list[str], edit: str) -> None:
    suffix = path.suffix
    if suffix == ".jsonl":
        text = "".join(json.dumps({"prompt": p}) + "\n" for p in lines)
    elif suffix == ".csv":
        text = "prompt,other\n" + "".join('"' + p.replace('"', '""') + '",x\n' for p in lines)
    else:
        text = "".join(p + "\n" for p in lines)
    if edit == "newline-in-prompt":
        text = text.replace("a dog on grass", "a dog\\non grass" if suffix == ".jsonl" else "a dog\non grass")
    elif edit == "u2028-in-prompt":
        text = text.replace("a dog on grass", "a dog\u2028on grass")
    elif edit == "nul":
        text = text.replace("a cat", "a\x00cat")
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "not-object":
        text += "[1, 2]\n"
    elif edit == "no-key":
        text += '{"text": "x"}\n'
    elif edit == "number":
        text += '{"prompt": 5}\n'
    elif edit == "no-header":
        text = text.split("\n", 1)[1]
    elif edit == "unbalanced-quote":
        text += '"never closed\n'
    elif edit == "long":
        text += "a horse " * 200 + "\n"
    elif edit == "blank":
        text = " \n\n\t\n"
    if edit == "latin1":
        path.write_bytes(text.encode("utf-8") + "café\n".encode("latin-1"))
    else:
        path.write_text(text)


@fuzz_settings(20)
@given(st.data())
def test_damaged_prompt_files(base, data):
    with Sandbox() as box:
        suffix = data.draw(st.sampled_from([".txt", ".jsonl", ".csv", ".TXT", ".md"]), label="suffix")
        lines = data.draw(st.lists(st.sampled_from(PROMPT_LINES), min_size=1, max_size=6), label="prompts")
        path = box.root / f"prompts{suffix}"
        edit = data.draw(st.sampled_from(PROMPT_DAMAGE), label="edit")
        prompt_file(path, lines, edit if edit not in DAMAGE else "none")
        if edit in DAMAGE:
            damage(path, edit, data)
        out = box.root / "out"
        argv = ["prepare-prompts", "--config", str(base["config"]), "--out", str(out), f"--set=prompts.source={path}"]
        result = box.run("prompts", argv, base, out)
        if result.returncode == 0:  # a split that round-trips: counts match, sides disjoint
            from rewardtune.prompts import load_prompts

            summary = json.loads((out / "prompts.json").read_text())
            train = load_prompts(str(out / "train.txt"))
            heldout = load_prompts(str(out / "heldout.txt")) if summary["num_heldout"] else []
            assert (len(train), len(heldout)) == (summary["num_train"], summary["num_heldout"])
            assert not set(train) & set(heldout)


@fuzz_settings(15)
@given(st.data())
def test_damaged_config_file(base, data):
    with Sandbox() as box:
        path = Path(shutil.copy(base["config"], box.root / "config.yaml"))
        damage(path, data.draw(st.sampled_from(DAMAGE), label="op"), data)
        box.run("config-file", ["validate-config", "--config", str(path)], base)


# ------------------------------------------------------------------------------------------------ D. the other CLIs
PATH_KINDS = ["valid", "missing", "empty-dir", "file", "unicode-dir", "swapped"]


def odd_path(box: Sandbox, role: str, kind: str, valid: Path, other: Path) -> Path:
    """A path argument of `kind` for `role`: the valid one (copied into the sandbox), or a missing, empty, file
    or wrong one."""
    if kind == "valid":
        return Path(shutil.copytree(valid, box.root / f"copy-{role}")) if valid.is_dir() else valid
    if kind == "missing":
        return box.root / "does-not-exist"
    if kind == "empty-dir":
        (box.root / "empty").mkdir(exist_ok=True)
        return box.root / "empty"
    if kind == "file":
        path = box.root / "a-file.txt"
        path.write_text("not a directory\n")
        return path
    if kind == "unicode-dir":
        return Path(shutil.copytree(valid, box.root / f"ünï cødé 🐍 {role}")) if valid.is_dir() else valid
    return Path(shutil.copytree(other, box.root / f"swapped-{role}"))  # a run where an eval belongs, or back


SELECTS = st.one_of(st.sampled_from(["last", "best-proxy", "best-heldout"]), st.sampled_from(ODD_TEXT))
CHECKPOINTS = st.sampled_from(["base", "epoch-000001", "epoch-000009", "", "../checkpoints", "ünï", "epoch-000001/.."])


@fuzz_settings(8)
@given(st.data())
def test_evaluate_export_report_cache_arguments(base, data):
    """Every other CLI with each path argument valid, missing, empty, a file, unicode or the other kind of dir."""
    command = data.draw(st.sampled_from(["evaluate", "export", "report", "cache-models", "prepare-prompts",
                                         "validate-config"]), label="command")
    with Sandbox() as box:
        run = odd_path(box, "run", data.draw(st.sampled_from(PATH_KINDS), label="run"), base["run"], base["eval"])
        out_name = data.draw(st.sampled_from(["out", "ünï out", "new/nested/out"]), label="out")
        out = box.root / out_name
        config = odd_path(box, "config", data.draw(st.sampled_from(["valid", "valid", "missing", "empty-dir", "file"]),
                                               label="config"), base["config"], base["config"])
        if command == "evaluate":
            argv = ["evaluate", "--config", str(config), "--run", str(run), "--out", str(out)]
            if data.draw(st.booleans(), label="checkpoint"):
                argv += ["--checkpoint", data.draw(CHECKPOINTS, label="name")]
        elif command in ("export", "report"):
            ev = odd_path(box, "eval", data.draw(st.sampled_from(PATH_KINDS), label="eval"), base["eval"], base["run"])
            argv = [command, "--run", str(run), "--eval", str(ev), "--out", str(out)]
            if command == "export":
                argv += ["--select", data.draw(SELECTS, label="select")]
                argv += ["--merge"] if data.draw(st.booleans(), label="merge") else []
            elif data.draw(st.booleans(), label="label"):
                argv += ["--label", data.draw(st.sampled_from(ODD_TEXT), label="text")]
        elif command == "cache-models":
            argv = ["cache-models", "--config", str(config), "--cache", str(out)]
            argv += ["--dry-run"] if data.draw(st.booleans(), label="dry") else []
        elif command == "prepare-prompts":
            argv = ["prepare-prompts", "--config", str(config), "--out", str(out)]
        else:
            argv = ["validate-config", "--config", str(config), *(["--print"] if data.draw(st.booleans()) else [])]
        box.run(f"args-{command}", argv, base, box.root / out_name.split("/")[0])  # parents it makes are its own


EVAL_EDITS = ["other-run-id", "no-provenance", "digest-wrong", "not-object", "no-rewards", "mean-str", "base-missing",
              "checkpoint-name-odd", *DAMAGE]


@fuzz_settings(6)
@given(st.data())
def test_damaged_eval_dir_export_or_report(base, data):
    """An evaluation directory damaged as a disk, a hand edit or another run's copy would: export/report refuse or work."""
    with Sandbox() as box:
        run = Path(shutil.copytree(base["run"], box.root / "run"))
        ev = Path(shutil.copytree(base["eval"], box.root / "eval"))
        name = data.draw(st.sampled_from(["base", "epoch-000001"]), label="checkpoint")
        metrics = ev / name / "metrics.json"
        edit = data.draw(st.sampled_from(EVAL_EDITS), label="edit")
        if edit in DAMAGE:
            target = data.draw(st.sampled_from([p for p in files_of(ev) if p.suffix != ".png"][:12]), label="file")
            damage(target, edit, data)
        else:
            record = json.loads(metrics.read_text())
            if edit == "other-run-id":
                record["run"]["run_id"] = "f" * 32
            elif edit == "no-provenance":
                record.pop("run")
            elif edit == "digest-wrong" and name != "base":
                record["digest"] = "0" * 64
            elif edit == "not-object":
                record = [record]
            elif edit == "no-rewards":
                record.pop("rewards")
            elif edit == "mean-str":
                next(iter(record["rewards"].values()))["heldout"]["mean"] = "high"
            elif edit == "base-missing":
                shutil.rmtree(ev / "base")
            elif edit == "checkpoint-name-odd":
                record["checkpoint"] = data.draw(st.sampled_from(["../../x", "", "ünï", "epoch-000009"]), label="name")
            if edit != "base-missing":
                metrics.write_text(json.dumps(record))
        out = box.root / "out"
        if data.draw(st.booleans(), label="export"):
            argv = ["export", "--run", str(run), "--eval", str(ev), "--out", str(out),
                    "--select", data.draw(st.sampled_from(["last", "best-proxy", "best-heldout"]), label="select")]
        else:
            argv = ["report", "--run", str(run), "--eval", str(ev), "--out", str(out)]
        box.run(f"eval-dir-{argv[0]}", argv, base, out)


@fuzz_settings(4)
@given(st.data())
def test_damaged_run_dir_export_or_report(base, data):
    """A run directory with one damaged file (config, run id, metrics, a checkpoint file): export/report."""
    with Sandbox() as box:
        run = Path(shutil.copytree(base["run"], box.root / "run"))
        target = data.draw(st.sampled_from([p for p in files_of(run) if p.name != ".rewardtune.lock"]), label="file")
        damage(target, data.draw(st.sampled_from(DAMAGE), label="op"), data)
        if data.draw(st.booleans(), label="rehash") and "checkpoints" in target.parts:
            rehash_checkpoint(run / "checkpoints" / "epoch-000001")
        out = box.root / "out"
        command = data.draw(st.sampled_from(["export", "report"]), label="command")
        argv = [command, "--run", str(run), "--eval", str(base["eval"]), "--out", str(out)]
        argv += ["--select", "last"] if command == "export" else []
        box.run(f"run-dir-{command}", argv, base, out)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "shift_jis",
             "gb18030", "koi8-r"]
# any character a text file can hold: every category but lone surrogates (not encodable in any UTF)
FILE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=80)


@fuzz_settings(10)
@given(st.data())
def test_prompt_files_in_any_encoding_and_unicode(base, data):
    """Prompt files of arbitrary Unicode in odd encodings: read as strict UTF-8 (a BOM allowed) or refused in one line."""
    with Sandbox() as box:
        lines = data.draw(st.lists(st.one_of(FILE_TEXT, st.sampled_from(PROMPT_LINES)), min_size=1, max_size=6),
                          label="lines")
        encoding = data.draw(st.sampled_from(ENCODINGS), label="encoding")
        suffix = data.draw(st.sampled_from([".txt", ".jsonl", ".csv"]), label="suffix")
        if suffix == ".jsonl":
            text = "".join(json.dumps({"prompt": p}, ensure_ascii=data.draw(st.booleans(), label="ascii")) + "\n"
                           for p in lines)
        elif suffix == ".csv":
            text = "prompt\n" + "".join('"' + p.replace('"', '""') + '"\n' for p in lines)
        else:
            text = "".join(p + "\n" for p in lines)
        path = box.root / f"prompts{suffix}"
        path.write_bytes(text.encode(encoding, errors="replace"))
        out = box.root / "out"
        argv = ["prepare-prompts", "--config", str(base["config"]), "--out", str(out), f"--set=prompts.source={path}"]
        result = box.run(f"encoding-{suffix}", argv, base, out)
        if result.returncode == 0:  # what was accepted reads back as exactly the split it wrote
            from rewardtune.prompts import load_prompts

            summary = json.loads((out / "prompts.json").read_text())
            train = load_prompts(str(out / "train.txt"))
            heldout = load_prompts(str(out / "heldout.txt")) if summary["num_heldout"] else []
            assert (len(train), len(heldout)) == (summary["num_train"], summary["num_heldout"])
            assert not set(train) & set(heldout)
