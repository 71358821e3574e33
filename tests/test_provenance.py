"""Provenance: an evaluation records its run (run id, base model, each checkpoint's digest); `export --eval`,
`report` and `evaluate --out` refuse another run's evaluation in one line; `evaluate --run` refuses a
directory with no run in it; the model card says why the base model was chosen; a start that fails before
its first checkpoint leaves nothing a later `--resume`, `evaluate` or `export` would take for a run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from rewardtune.checkpoint import MANIFEST, list_checkpoints, sha256_file
from rewardtune.evaluate import read_evaluations
from rewardtune.export import select_checkpoint
from rewardtune.provenance import RUN_FILE, check_evaluation_of, checkpoint_digest, read_run_id
from tests.cli_inproc import run_main
from tests.test_evaluate import tiny_eval_config
from tests.test_export import _record


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A 1-epoch tiny run, its evaluation, its prompts and its config file."""
    from rewardtune.evaluate import evaluate_run
    from rewardtune.trainer import Trainer

    root = tmp_path_factory.mktemp("provenance")
    cfg = tiny_eval_config(tiny_model_dir, epochs=1)
    Trainer(cfg, root / "run").run()
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "heldout.txt").write_text("zebra\nkoala\nllama\nwalrus\n")
    evaluate_run(cfg, root / "run", prompts, root / "eval")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return {"run": root / "run", "eval": root / "eval", "prompts": prompts, "config": config, "root": root}


def _other_run(run: Path, where: Path) -> Path:
    """Another run with the same checkpoint names: a copy with its own run id (what a second `train` gives)."""
    other = Path(shutil.copytree(run, where))
    (other / RUN_FILE).write_text(json.dumps({"run_id": "0" * 32, "base_model": "x"}))
    return other


def test_an_evaluation_records_run_id_base_model_and_checkpoint_digests(evaluated_run):
    run, ev = evaluated_run["run"], evaluated_run["eval"]
    run_id = read_run_id(run)
    assert run_id and len(run_id) == 32
    records = read_evaluations(ev)
    assert [r["checkpoint"] for r in records] == ["base", "epoch-000001"]
    source = yaml.safe_load((run / "config.yaml").read_text())["model"]["source"]
    for record in records:
        assert record["run"]["run_id"] == run_id and record["run"]["base_model"] == source
    manifest = json.loads((run / "checkpoints" / "epoch-000001" / MANIFEST).read_text())
    assert records[0]["digest"] is None and records[1]["digest"] == checkpoint_digest(manifest)
    check_evaluation_of(run, records, "--eval", ev)  # its own run passes


def test_export_and_report_refuse_another_runs_evaluation(evaluated_run, tmp_path):
    other = _other_run(evaluated_run["run"], tmp_path / "other")
    ev = evaluated_run["eval"]
    result = run_main(["export", "--run", str(other), "--eval", str(ev), "--select", "last", "--out", str(tmp_path / "x")])
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr_lines()
    assert line.startswith(f"error: --eval {ev} is the evaluation of another run (run id ") and f"--run {other}" in line
    assert not (tmp_path / "x").exists()
    result = run_main(["report", "--run", str(other), "--eval", str(ev), "--out", str(tmp_path / "r")])
    assert result.returncode == 2 and len(result.stderr_lines()) == 1
    assert result.stderr_lines()[0].startswith(f"error: --eval {ev} is the evaluation of another run")
    assert not (tmp_path / "r" / "report.html").exists()


def test_a_checkpoint_changed_since_its_evaluation_is_refused(evaluated_run, tmp_path):
    run = Path(shutil.copytree(evaluated_run["run"], tmp_path / "run"))
    checkpoint = run / "checkpoints" / "epoch-000001"
    state = checkpoint / "trainer_state.json"
    state.write_text(state.read_text() + " ")  # re-trained over: other files, a manifest that matches them
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = {"sha256": sha256_file(state), "size": state.stat().st_size}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    result = run_main(["export", "--run", str(run), "--eval", str(evaluated_run["eval"]), "--select", "last",
                       "--out", str(tmp_path / "x")])
    assert result.returncode == 2 and len(result.stderr_lines()) == 1
    assert "checkpoint epoch-000001 of --run" in result.stderr and "is not the one that was evaluated" in result.stderr


def test_a_base_model_other_than_the_runs_is_refused(evaluated_run, tmp_path):
    run = Path(shutil.copytree(evaluated_run["run"], tmp_path / "run"))
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["model"]["source"] = "/elsewhere/model"
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="evaluated base model .* but --run .* was trained from /elsewhere/model"):
        check_evaluation_of(run, read_evaluations(evaluated_run["eval"]), "--eval", evaluated_run["eval"])


def test_an_evaluation_without_provenance_is_accepted_with_a_warning(evaluated_run, tmp_path, caplog):
    records = read_evaluations(evaluated_run["eval"])
    old = [{k: v for k, v in r.items() if k not in ("run", "digest")} for r in records]
    with caplog.at_level(logging.WARNING, logger="rewardtune.provenance"):
        check_evaluation_of(evaluated_run["run"], old, "--eval", tmp_path)
    assert "carry no run provenance" in caplog.text and "base, epoch-000001" in caplog.text


def test_evaluate_refuses_to_add_to_another_runs_evaluation(evaluated_run, tmp_path):
    other = _other_run(evaluated_run["run"], tmp_path / "other")
    ev = Path(shutil.copytree(evaluated_run["eval"], tmp_path / "eval"))
    shutil.rmtree(ev / "epoch-000001")  # the other run's checkpoint would be "to do", base "already done"
    result = run_main(["evaluate", "--config", str(evaluated_run["config"]), "--run", str(other), "--out", str(ev),
                       "--prompts", str(evaluated_run["prompts"])])
    assert result.returncode == 2 and len(result.stderr_lines()) == 1
    assert result.stderr_lines()[0].startswith(f"error: --out {ev} is the evaluation of another run")
    assert not (ev / "epoch-000001").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "file", "config-only"])
def test_evaluate_refuses_a_run_directory_with_no_run_in_it(evaluated_run, tmp_path, case):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    elif case == "file":
        run.write_text("not a run")
    elif case == "config-only":
        run.mkdir()
        shutil.copy(evaluated_run["run"] / "config.yaml", run / "config.yaml")
    result = run_main(["evaluate", "--config", str(evaluated_run["config"]), "--run", str(run),
                       "--out", str(tmp_path / "ev")])
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr_lines()
    expected = {"missing": "does not exist", "empty": "holds no run (no config.yaml, no checkpoints/)",
                "file": "is not a directory", "config-only": "holds no valid checkpoint to evaluate"}[case]
    assert line.startswith(f"error: --run {run} ") and expected in line, line
    assert not (tmp_path / "ev").exists()


def test_the_card_says_why_the_base_model_was_chosen(tmp_path):
    for name in ("epoch-000001", "epoch-000002"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    # every checkpoint keeps gold within the base's CI, but the base scores highest on the training reward
    records = [_record("base", 0, 0.9, 0.5, gold_low=0.45), _record("epoch-000001", 1, 0.3, 0.5),
               _record("epoch-000002", 2, 0.6, 0.5)]
    name, reason = select_checkpoint(tmp_path, records, "best-heldout")
    assert name == "base" and reason.startswith("the base model scored highest on the training reward")
    assert "among the 3 of 3 evaluated" in reason and "epoch-000002: 0.6" in reason and "qualified" not in reason
    # no checkpoint keeps gold within the base's CI: that is the reason
    records = [_record("base", 0, 0.1, 0.5, gold_low=0.45), _record("epoch-000001", 1, 0.3, 0.2),
               _record("epoch-000002", 2, 0.6, 0.1)]
    name, reason = select_checkpoint(tmp_path, records, "best-heldout")
    assert name == "base" and reason.startswith("no checkpoint kept the unseen rewards (gold) at or above the base")


# ------------------------------------------------------------------------------------------- failed starts
FAILING_REWARD = '''
def after_start(images, prompts):
    raise RuntimeError("reward server went away")
'''


def _failing_config(tiny_model_dir: Path, code: Path) -> Path:
    from tests.conftest import one_epoch_lora_dict

    (code / "failing_reward.py").write_text(FAILING_REWARD)
    data = one_epoch_lora_dict(tiny_model_dir, reward={"name": "python", "options": {
        "callable": "failing_reward:after_start", "path": str(code)}})
    path = code / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tiny_model_dir, tmp_path, evaluated_run):
    config = _failing_config(tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    result = run_main(["train", "--config", str(config), "--out", str(out)])
    assert result.returncode == 2 and "reward server went away" in result.stderr
    assert not out.exists()  # no config.yaml, metrics.jsonl, run.json or lock: no stub
    # an --out that already held a user's file keeps exactly that file
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_main(["train", "--config", str(config), "--out", str(out), "--resume"])
    assert result.returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = run_main(["evaluate", "--config", str(evaluated_run["config"]), "--run", str(out),
                       "--out", str(tmp_path / "ev")])
    assert result.returncode == 2 and "holds no run" in result.stderr


def test_a_failure_after_a_checkpoint_keeps_the_run(evaluated_run, tmp_path):
    from rewardtune.training.lifecycle import StartRecord

    run = Path(shutil.copytree(evaluated_run["run"], tmp_path / "run"))
    record = StartRecord(tmp_path / "fresh")  # as if this start had created the directory
    (run / "stray.txt").write_text("x")
    record.out_dir = run
    record.undo()
    assert (run / "stray.txt").exists() and list_checkpoints(run / "checkpoints")


def test_the_pipeline_train_stage_takes_back_its_config_on_a_failed_start(tiny_model_dir, tmp_path):
    from rewardtune.errors import RewardtuneError
    from rewardtune.stages import train_stage

    config = _failing_config(tiny_model_dir, tmp_path)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.txt").write_text("a cat\na dog\n")
    with pytest.raises(RewardtuneError, match="reward server went away"):
        train_stage(str(config), prompts, tmp_path / "run")
    assert not (tmp_path / "run").exists()
