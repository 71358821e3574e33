"""Helpers of the report step: merging the fanned-out evaluations and naming the run."""

import json

import yaml

from rewardtune.stages import merge_evaluations, run_label


def _result(root, name, value):
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps({"value": value}))


def test_merge_keeps_every_checkpoint_and_the_first_base(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _result(first, "base", 1)
    _result(first, "epoch-000004", 2)
    _result(second, "base", 99)  # a second copy of the base results: the first is kept
    _result(second, "epoch-000008", 3)
    (second / "epoch-000012").mkdir()  # unfinished (no metrics.json): not merged
    out = merge_evaluations([first, second], tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["base", "epoch-000004", "epoch-000008"]
    assert json.loads((out / "base" / "metrics.json").read_text()) == {"value": 1}


def test_run_label_names_algorithm_and_reward(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": "tdpo_r"}, "reward": {"name": "aesthetic"}}))
    assert run_label(tmp_path) == "tdpo_r on aesthetic"
    assert run_label(tmp_path / "missing") == "missing"
