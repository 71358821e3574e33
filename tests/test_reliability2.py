"""Reliability round 2 (issue 14): every case of the issue, reproduced through the CLI's `main` in-process.

Each test was written against the unfixed code first (where it failed as the issue describes), then the
code was fixed. The CLI contract checked throughout: exit 0 and a sane run, or exit 2 with exactly one
`error:` line naming the problem, no traceback, and nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from rewardtune import faults
from rewardtune.cache import MANIFEST as CACHE_MANIFEST
from rewardtune.cache import DirCache, ModelRef, cache_models, materialize, resolve_source, sha256_file
from rewardtune.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint
from rewardtune.errors import RewardtuneError
from rewardtune.metrics import MetricsLog
from rewardtune.safe_paths import current_umask
from tests.cli_inproc import run_main
from tests.conftest import merge_sections, one_epoch_lora_dict
from tests.test_cache import aws_env, bucket, s3_endpoint  # noqa: F401  (fixtures)


def assert_one_error(result, pattern: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line (the last one), matching `pattern`."""
    assert result.returncode == 2, f"rc {result.returncode}: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under root: to show that a refused command changed nothing."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, sha256_file(p)) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".rewardtune.lock"}


def rehash(checkpoint: Path) -> None:
    """Make a deliberately altered checkpoint pass its sha256 check again: the loader itself is under test."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(checkpoint).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                         for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


class _Payload:
    """A pickle that would create a marker file if anything ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Ctx:
    root: Path
    data: dict
    config: Path
    run: Path  # a finished 1-epoch LoRA DDPO run of `config` (lr 1e-3)

    def config_with(self, name: str, **sections) -> Path:
        data = merge_sections(yaml.safe_load(yaml.safe_dump(self.data)), sections)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def copy_run(self, name: str) -> Path:
        return Path(shutil.copytree(self.run, self.root / name))

    def train(self, out: Path, *sets: str, config: Path | None = None, resume: bool = False, env=None):
        argv = ["train", "--config", str(config or self.config), "--out", str(out)]
        argv += [f"--set={item}" for item in sets] + (["--resume"] if resume else [])
        return run_main(argv, env)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model_dir) -> Ctx:
    root = tmp_path_factory.mktemp("rel2")
    data = one_epoch_lora_dict(tiny_model_dir, keep_last=3, training={"learning_rate": 1e-3})
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(data))
    c = Ctx(root, data, config, root / "run")
    result = c.train(c.run)
    assert result.returncode == 0, result.stderr
    return c


@pytest.fixture(scope="module")
def run2(ctx: Ctx) -> Path:
    """The 1-epoch run resumed for a 2nd epoch with the learning rate lowered 100x (item 2)."""
    run = ctx.copy_run("run2")
    result = ctx.train(run, "training.epochs=2", "training.learning_rate=1e-5", resume=True)
    assert result.returncode == 0, result.stderr
    assert "resume: training.learning_rate changed 0.001 -> 1e-05, applied from epoch 1 on" in result.stderr
    return run


# ---------------------------------------------------------------------------------------------- 1. path traversal
def test_s3_manifest_names_cannot_write_outside_the_model_dir(ctx, tiny_rewards, bucket, s3_endpoint, tmp_path):  # noqa: F811
    import boto3

    uri = f"s3://{bucket}/cache"
    [cached] = cache_models([ModelRef(tiny_rewards["aesthetic"])], uri)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    body = b"attacker-controlled bytes\n"
    outside_abs, outside_rel = tmp_path / "evil-abs", tmp_path / "evil-rel"
    names = [str(outside_abs), "../../../evil-rel"]  # RT_MODEL_DIR is tmp_path/work: ../../../ is tmp_path
    manifest_key = f"cache/{cached.key}/{CACHE_MANIFEST}"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    for name in names:
        client.put_object(Bucket=bucket, Key=f"cache/{cached.key}/files/{name}", Body=body)
        manifest["files"][name] = {"size": len(body), "sha256": __import__("hashlib").sha256(body).hexdigest()}
    client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest).encode())

    with pytest.raises(RewardtuneError, match="absolute or climbs out of its directory"):
        resolve_source(f"{uri}/{cached.key}")
    result = ctx.train(ctx.root / "out-traversal", "reward.name=aesthetic", f"reward.source={uri}/{cached.key}")
    assert_one_error(result, r"file name .*evil.* is absolute or climbs out of its directory \(\.\.\); refused")
    assert not outside_abs.exists() and not outside_rel.exists()
    assert not (ctx.root / "out-traversal" / "checkpoints").exists()


def test_dir_cache_manifest_cannot_point_outside_its_entry(tmp_path):
    cache = DirCache(tmp_path / "cache")
    (tmp_path / "secret").write_text("not part of any model")
    entry = tmp_path / "cache" / "local--m--0123456789"
    (entry / "files").mkdir(parents=True)
    (entry / "files" / "config.json").write_text("{}")
    files = {"config.json": {"size": 2, "sha256": sha256_file(entry / "files" / "config.json")},
             "../../../secret": {"size": 21, "sha256": sha256_file(tmp_path / "secret")}}
    (entry / CACHE_MANIFEST).write_text(json.dumps({"source": "m", "files": files}))
    with pytest.raises(RewardtuneError, match=r"'\.\./\.\./\.\./secret' is absolute or climbs out"):
        materialize(cache, entry.name)
    (entry / CACHE_MANIFEST).write_text(json.dumps({"source": "m", "files": {}}))
    with pytest.raises(RewardtuneError, match=r"lists no files"):
        materialize(cache, entry.name)


def test_hpsv2_arch_name_cannot_write_outside_its_temp_dir(tiny_rewards, tmp_path):
    from rewardtune.config import RewardSpec
    from rewardtune.rewards import build_reward

    source = Path(shutil.copytree(tiny_rewards["hpsv2"], tmp_path / "hps"))
    target = tmp_path / "planted"
    spec = json.loads((source / "open_clip_model.json").read_text())
    spec["arch"] = "../" * 12 + str(target).lstrip("/")
    (source / "open_clip_model.json").write_text(json.dumps(spec))
    with pytest.raises(RewardtuneError, match="climbs out of its directory"):
        build_reward(RewardSpec(name="hpsv2", source=str(source)))
    assert not target.with_suffix(".json").exists()
    with pytest.raises(RewardtuneError, match="climbs out of its directory"):
        build_reward(RewardSpec(name="hpsv2", source=tiny_rewards["hpsv2"], options={"checkpoint": "../../x.pt"}))


def test_a_symlink_loop_in_a_checkpoint_is_refused_not_a_traceback(tmp_path):
    """Found by the long fuzz profile: Path.resolve raises RuntimeError on a loop in Python 3.11."""
    from rewardtune.checkpoint import CheckpointError

    checkpoint = tmp_path / "epoch-000001"
    checkpoint.mkdir()
    (checkpoint / "w.safetensors").symlink_to(checkpoint / "w.safetensors")
    (checkpoint / MANIFEST).write_text(json.dumps({"epochs_done": 1, "kind": "regular",
                                                   "files": {"w.safetensors": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(CheckpointError, match="cannot be resolved"):
        verify_checkpoint(checkpoint)


# ---------------------------------------------------------------------------------------------- 2. resume policy
def test_resume_applies_a_new_learning_rate_and_records_it(ctx, run2):
    records = MetricsLog(run2 / "metrics.jsonl").read()
    assert [r["lr"] for r in records] == [1e-3, 1e-5]
    assert yaml.safe_load((run2 / "config.yaml").read_text())["training"]["learning_rate"] == 1e-5
    newest = run2 / "checkpoints" / "epoch-000002"
    assert yaml.safe_load((newest / "config.yaml").read_text())["training"]["learning_rate"] == 1e-5
    optimizer = torch.load(newest / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [1e-5]
    [history] = [json.loads(line) for line in (run2 / "resume_history.jsonl").read_text().splitlines()]
    assert history["changed"] == {"training.epochs": {"from": 1, "to": 2},
                                  "training.learning_rate": {"from": 1e-3, "to": 1e-5}}
    assert history["checkpoint"] == "epoch-000001" and history["epochs_done"] == 1


@pytest.mark.parametrize("change, pattern", [
    ("training.seed=7", r"--resume cannot change training\.seed \(0 -> 7\)"),
    ("reward.name=jpeg_compressibility", r"cannot change reward\.name \('brightness' -> 'jpeg_compressibility'\)"),
    ("sampling.num_steps=3", r"cannot change sampling\.num_steps \(2 -> 3\)"),
    ("algorithm.critic.hidden_sizes=[8]", r"cannot change algorithm\.critic\.dropout .*and 1 more: algorithm\.critic\.hidden_sizes"),
])
def test_resume_refuses_to_change_what_was_trained(ctx, change, pattern):
    run = ctx.copy_run(f"refuse-{change.split('=')[0]}")
    before = tree_state(run)
    sets = [change, "training.epochs=2"] + (["algorithm.critic.dropout=[0.0]"] if "hidden" in change else [])
    assert_one_error(ctx.train(run, *sets, resume=True), pattern)
    assert tree_state(run) == before


# ---------------------------------------------------------------------------------------------- 3. prompts with line breaks
@pytest.mark.parametrize("name, text, where", [
    ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog\\non grass"}\n', r"p\.jsonl line 2"),
    ("u.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog\\u2028on grass"}\n', r"u\.jsonl line 2"),
    ("q.csv", 'prompt\n"a cat"\n"a dog\non grass"\n', r"q\.csv row 3"),
])
def test_prompts_with_line_breaks_are_refused(ctx, name, text, where):
    source = ctx.root / name
    source.write_text(text)
    out = ctx.root / f"prompts-{name}"
    result = run_main(["prepare-prompts", "--config", str(ctx.config), "--out", str(out), f"--set=prompts.source={source}"])
    assert_one_error(result, where + r": the prompt .* contains a line break; prompts must be one line")
    assert not out.exists()


def test_prompt_split_files_round_trip(ctx):
    from rewardtune.prompts import load_prompts

    source = ctx.root / "many.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"animal {i}, café «{i}»"}) + "\n" for i in range(20)))
    out = ctx.root / "prompts-many"
    assert run_main(["prepare-prompts", "--config", str(ctx.config), "--out", str(out),
                     f"--set=prompts.source={source}"]).returncode == 0
    summary = json.loads((out / "prompts.json").read_text())
    train, heldout = load_prompts(str(out / "train.txt")), load_prompts(str(out / "heldout.txt"))
    assert (len(train), len(heldout)) == (summary["num_train"], summary["num_heldout"]) == (16, 4)
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(load_prompts(str(source)))
    with pytest.raises(Exception, match="template must be one line"):
        from rewardtune.config import parse_config

        parse_config({**ctx.data, "prompts": {"template": "a {}\nb"}})


# ---------------------------------------------------------------------------------------------- 4. metrics
def test_one_bad_metrics_line_does_not_delete_the_valid_ones(tmp_path, caplog):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"epoch": 0}), "{garbage", json.dumps({"epoch": 1}), "[1, 2]", json.dumps({"epoch": 2}),
             json.dumps({"epoch": 3})]
    log.path.write_text("\n".join(lines) + "\n")
    assert [r["epoch"] for r in log.read()] == [0, 1, 2, 3]
    log.truncate_to(3)
    assert [r["epoch"] for r in log.read()] == [0, 1, 2]
    assert (tmp_path / "metrics.jsonl.rejected").read_text() == "{garbage\n[1, 2]\n"
    assert "2 unparsable line(s) (first: line 2) moved to metrics.jsonl.rejected" in caplog.text


# ---------------------------------------------------------------------------------------------- 5. evaluate's base model
def test_evaluate_refuses_checkpoints_of_another_base_model(ctx, tiny_model_dir):
    other = shutil.copytree(tiny_model_dir, ctx.root / "other-model")
    out = ctx.root / "eval-other"
    result = run_main(["evaluate", "--config", str(ctx.config), "--run", str(ctx.run), "--out", str(out),
                       f"--set=model.source={other}"])
    assert_one_error(result, r"epoch-000001 was trained with model_source=.*tiny-sd.*the config has .*other-model")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 6. non-finite values
def _float_fields(model=None, prefix="") -> list[str]:
    from typing import get_args, get_origin

    from pydantic import BaseModel

    from rewardtune.config import RunConfig

    model = model or RunConfig
    found = []
    for name, field in model.model_fields.items():
        kinds = [field.annotation, *get_args(field.annotation)]
        nested = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if nested is not None and "list" not in str(field.annotation):
            found += _float_fields(nested, f"{prefix}{name}.")
        elif float in kinds and get_origin(field.annotation) is not list:
            found.append(prefix + name)
    return found


def test_non_finite_hyperparameters_are_refused_naming_the_field(ctx):
    fields = _float_fields()
    assert len(fields) >= 25 and "training.learning_rate" in fields and "algorithm.lagrange.pid_kp" in fields
    for field in fields:
        for value in (".nan", ".inf", "-.inf"):
            result = run_main(["validate-config", "--config", str(ctx.config), f"--set={field}={value}"])
            assert_one_error(result, rf"config error at {re.escape(field)}: Input should be a finite number")
    assert_one_error(run_main(["validate-config", "--config", str(ctx.config), "--set=reward.options={w: .nan}"]),
                     r"reward\.options: option w must be a finite number")


def test_exploding_weights_stop_the_run_before_a_checkpoint(ctx):
    out = ctx.root / "explode"
    result = ctx.train(out, "training.learning_rate=1e30", "training.inner_epochs=2")
    assert_one_error(result, r"training stopped at epoch 0: the loss became non-finite; .*trained weight\(s\) .* "
                             r"are NaN/inf .*lower training\.learning_rate.*no checkpoint was written")
    assert list_checkpoints(out / "checkpoints") == [] and not list((out / "checkpoints").glob(".tmp-*"))
    assert MetricsLog(out / "metrics.jsonl").read() == []


def test_nan_base_model_is_blamed_on_the_model_not_the_reward(ctx, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(tiny_model_dir, ctx.root / "nan-model"))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, weights)
    result = ctx.train(ctx.root / "nan-out", f"model.source={model}")
    assert_one_error(result, r"epoch 0: the model produced NaN/inf images for 2 of 2 samples .*base model's weights "
                             r"\(model\.source\) hold non-finite values.*the reward was not called")


# ---------------------------------------------------------------------------------------------- 7. full disk
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(ctx):
    run = ctx.copy_run("full-disk")
    faults._counts.clear()
    result = ctx.train(run, "training.epochs=2", resume=True, env={faults.FAULT_ENV: "enospc@checkpoint_files:1"})
    line = assert_one_error(result, r"disk full \(no space left on the device\) while writing checkpoint "
                                    r".*full-disk/checkpoints/epoch-000002; the partial write was removed and the "
                                    r"previous checkpoint epoch-000001 is intact; free space")
    assert "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-000001"]
    verify_checkpoint(run / "checkpoints" / "epoch-000001")
    assert ctx.train(run, "training.epochs=2", resume=True).returncode == 0
    assert [r["epoch"] for r in MetricsLog(run / "metrics.jsonl").read()] == [0, 1]


def test_torch_full_disk_error_is_named_as_such(ctx, monkeypatch):
    """torch.save loses the errno (`RuntimeError: [enforce fail at inline_container.cc:672]`); free space says it."""
    import rewardtune.checkpoint as checkpoint

    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 0)
    run = ctx.copy_run("full-disk-torch")
    result = ctx.train(run, "training.epochs=2", resume=True)
    assert_one_error(result, r"disk full .*epoch-000002; the partial write was removed and the previous checkpoint "
                             r"epoch-000001 is intact")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_real_full_tmpfs(ctx, tmp_path):
    """A real ENOSPC on a small tmpfs (root only: skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts")
    try:
        run = mount / "run"
        assert ctx.train(run).returncode == 0
        result = ctx.train(run, "training.epochs=3", resume=True)
        assert_one_error(result, r"disk full .*checkpoints/epoch-00000[23]; the partial write was removed and the "
                                 r"previous checkpoint epoch-00000[12] is intact")
        for path in list_checkpoints(run / "checkpoints"):
            verify_checkpoint(path)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------------------------------------- 8. stages pass data
def test_train_for_pipeline_takes_prompt_paths_as_data(ctx):
    from rewardtune.stages import TRAIN_FILE, param_overrides, train_for_pipeline

    prompts = ctx.root / "prompts #1: v2"
    prompts.mkdir()
    (prompts / TRAIN_FILE).write_text("a cat\na dog\n")
    out = ctx.root / "pipeline-out"
    summary = train_for_pipeline(str(ctx.config), prompts, out, overrides=param_overrides(epochs=1))
    assert summary["checkpoints"] == ["epoch-000001"]
    assert yaml.safe_load((out / "config.yaml").read_text())["prompts"]["source"] == str(prompts / TRAIN_FILE)


# ---------------------------------------------------------------------------------------------- 9. one line, not a traceback
def test_unwritable_out_on_a_read_only_file_system(ctx, monkeypatch):
    readonly = ctx.root / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(readonly)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert_one_error(ctx.train(readonly / "out"), r"Read-only file system: .*ro/out.*choose a writable path")
    assert_one_error(run_main(["init-tiny", "--out", str(readonly / "tiny")]), r"Read-only file system")


def test_model_cache_entry_without_files(ctx, tiny_model_dir):
    cache = ctx.root / "model-cache"
    [cached] = cache_models([ModelRef(str(tiny_model_dir))], str(cache))
    manifest_path = cache / cached.key / CACHE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for files in (None, {}, [], {"a": "b"}):
        if files is None:
            manifest.pop("files", None)
        else:
            manifest["files"] = files
        manifest_path.write_text(json.dumps(manifest))
        result = ctx.train(ctx.root / "nofiles", f"model.source={cache / cached.key}")
        assert_one_error(result, r"lists no files|needs an integer size and a sha256")


def test_pickled_bin_files_are_refused_and_never_run(ctx, tiny_model_dir):
    marker = ctx.root / "pwned"
    model = Path(shutil.copytree(tiny_model_dir, ctx.root / "pickled-model"))
    (model / "text_encoder" / "model.safetensors").unlink()
    with (model / "text_encoder" / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"w": _Payload(marker)}, handle)
    assert_one_error(ctx.train(ctx.root / "pickled-out", f"model.source={model}"), r"could not load model\.source")
    assert not marker.exists()


def test_clipscore_source_climbing_to_root(ctx):
    assert_one_error(ctx.train(ctx.root / "clip-root", "reward.name=clipscore", "reward.source=../../.."),
                     r"reward 'clipscore' could not be loaded from \.\./\.\./\.\.")


@pytest.fixture(scope="module")
def full_run(ctx) -> Path:
    run = ctx.root / "full-run"
    assert ctx.train(run, "model.finetune=full").returncode == 0
    return run


def test_pickled_bin_in_a_full_fine_tune_checkpoint(ctx, full_run):
    marker = ctx.root / "pwned-full"
    run = Path(shutil.copytree(full_run, ctx.root / "full-pickled"))
    checkpoint = run / "checkpoints" / "epoch-000001"
    (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with (checkpoint / "unet" / "diffusion_pytorch_model.bin").open("wb") as handle:
        pickle.dump({"w": _Payload(marker)}, handle)
    rehash(checkpoint)
    result = ctx.train(run, "model.finetune=full", "training.epochs=2", resume=True)
    assert_one_error(result, r"checkpoint .*epoch-000001: the policy weights cannot be loaded")
    assert not marker.exists()


def test_model_dir_readable_only_by_another_user(ctx, tiny_model_dir, tmp_path):
    """As another user: a forked child switches to `nobody` when the tests run as root (root reads everything)."""
    shared = Path(__import__("tempfile").mkdtemp(prefix="rt-perm-"))
    try:
        os.chmod(shared, 0o777)
        model = Path(shutil.copytree(tiny_model_dir, shared / "private-model"))
        config = shared / "c.yaml"
        config.write_text(yaml.safe_dump({**ctx.data, "model": {**ctx.data["model"], "source": str(model)}}))
        os.chmod(config, 0o644)
        argv = ["train", "--config", str(config), "--out", str(shared / "out")]
        if os.geteuid() != 0:
            os.chmod(model, 0o000)
            result = run_main(argv)
        else:
            os.chmod(model, 0o700)
            result = _run_as_nobody(argv)
        assert_one_error(result, r"(Permission denied|could not load model\.source).*private-model")
    finally:
        if (shared / "private-model").exists():
            os.chmod(shared / "private-model", 0o755)
        shutil.rmtree(shared, ignore_errors=True)


def _run_as_nobody(argv: list[str]):
    from tests.cli_runner import CliResult

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, run, report, never return into pytest
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            result = run_main(argv)
            payload = json.dumps([result.returncode, result.stdout, result.stderr]).encode()
        except BaseException as err:  # noqa: BLE001
            payload = json.dumps([99, "", f"harness: {err!r}"]).encode()
        with os.fdopen(write, "wb") as handle:
            handle.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    code, out, err = json.loads(data)
    return CliResult(code, out, err)


# ---------------------------------------------------------------------------------------------- 10. minor
def test_resume_on_a_missing_dir_says_so(ctx):
    missing = ctx.root / "no-such-run"
    result = ctx.train(missing, resume=True)
    assert result.returncode == 0, result.stderr
    assert f"--resume: {missing} does not exist (misspelt?); starting a new run there from epoch 0" in result.stderr
    empty = ctx.root / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    result = ctx.train(empty, resume=True)
    assert result.returncode == 0 and f"--resume: {empty} holds no checkpoint; starting from epoch 0" in result.stderr


def test_resume_with_fewer_epochs_than_done_is_refused_and_keeps_the_config(ctx, run2):
    before = tree_state(run2)
    assert_one_error(ctx.train(run2, "training.epochs=1", "training.learning_rate=1e-5", resume=True),
                     r"training\.epochs=1 is below the 2 epochs checkpoint epoch-000002 has done")
    assert tree_state(run2) == before


def test_outputs_follow_the_umask(ctx):
    """init-tiny, tiny rewards and checkpoints get the modes the umask asks for (027 here), none forced to 0700/0600."""
    umask = 0o027
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        out = ctx.root / "umask"
        assert run_main(["init-tiny", "--out", str(out / "tiny"), "--rewards-out", str(out / "rewards")]).returncode == 0
        assert ctx.train(out / "run", f"model.source={out / 'tiny'}").returncode == 0
        paths = [p for p in out.rglob("*") if not p.is_symlink() and p.name != ".rewardtune.lock"]
        assert len(paths) > 20 and list((out / "run" / "checkpoints").glob("epoch-*/*.safetensors"))
        wrong = [(str(p), oct(p.stat().st_mode & 0o777)) for p in paths
                 if p.stat().st_mode & 0o777 != ((0o777 if p.is_dir() else 0o666) & ~umask)]
        assert not wrong, wrong[:5]
    finally:
        os.umask(previous)
