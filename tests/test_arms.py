"""Arms of one pipeline run (rewardtune.arms): the plan the DAG fans out over, each arm's overrides, its artifact."""

import json
import re

import pytest
import yaml

from rewardtune.arms import (
    ALGORITHMS,
    arm_algorithm,
    arm_overrides,
    arm_repo_id,
    arm_run_id,
    evaluation_config,
    pack_arm,
    plan_arms,
)
from rewardtune.errors import ConfigError
from tests.conftest import REPO

TESTBED = str(REPO / "configs" / "testbed.yaml")
CDPO_SETS = ["algorithm.constraints=[{reward: {name: testbed_fidelity}, relative_margin: 0.05}]"]


def test_the_algorithms_are_the_configs_own():
    assert ALGORITHMS == ("ddpo", "grpo", "tdpo", "tdpo_r", "cdpo")


def test_no_algorithms_is_one_arm_the_parameter_or_the_configs():
    assert plan_arms(TESTBED) == ["ddpo"]
    assert plan_arms(TESTBED, algorithm="tdpo_r") == ["tdpo_r"]


def test_arms_keep_their_order_and_each_resolves():
    per_arm = {"tdpo_r": ["training.learning_rate=3e-3"], "cdpo": CDPO_SETS}
    assert plan_arms(TESTBED, algorithms=["tdpo_r", "ddpo", "cdpo"], per_arm=per_arm) == ["tdpo_r", "ddpo", "cdpo"]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"algorithms": ["ddpo", "ppo"]}, re.escape("algorithms: unknown algorithm 'ppo'; choose from ddpo, grpo, tdpo, tdpo_r, cdpo")),
    ({"algorithms": ["ddpo", 3]}, "algorithms: unknown algorithm 3"),
    ({"algorithm": "ppo"}, "algorithm: unknown algorithm 'ppo'"),
    ({"algorithms": ["ddpo", "ddpo"]}, "names an algorithm twice"),
    ({"algorithms": ["ddpo"], "algorithm": "tdpo"}, re.escape("give either algorithm ('tdpo') or algorithms")),
    ({"algorithms": ["ddpo"], "per_arm": {"tdpo_r": ["training.learning_rate=3e-3"]}},
     re.escape("arm_overrides: ['tdpo_r'] is not among the arms ['ddpo']")),
    ({"algorithms": ["ddpo"], "per_arm": {"ddpo": "training.learning_rate=3e-3"}},
     "arm_overrides.ddpo: give a list of 'section.key=value' strings"),
    ({"algorithms": ["ddpo", "cdpo"]}, "arm cdpo: .*cdpo needs at least one entry in algorithm.constraints"),
    ({"algorithms": ["ddpo", "tdpo_r"], "per_arm": {"tdpo_r": ["training.learning_rate=-1"]}},
     "arm tdpo_r: .*training.learning_rate"),
    ({"algorithms": ["ddpo", "tdpo_r"], "push_to_hub": "me/sd"},
     re.escape("push_to_hub: 2 arms would all push to 'me/sd'; put {algorithm} in the repo id (e.g. 'me/sd-{algorithm}')")),
])
def test_a_bad_plan_fails_before_training_naming_the_field(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        plan_arms(TESTBED, **kwargs)


def test_a_critic_arm_on_a_model_free_reward_needs_its_own_image_tower():
    """configs/tiny.yaml trains on brightness, which has no CLIP tower for TDPO's critic to share: found at plan time,
    not after the train step started (where kfp retries it); naming a tower fixes it."""
    tiny = str(REPO / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match=re.escape("arm tdpo_r: algorithm.critic.image_encoder: reward 'brightness' has no image tower")):
        plan_arms(tiny, algorithms=["ddpo", "tdpo_r"])
    assert plan_arms(tiny, algorithms=["ddpo", "tdpo_r"],
                     per_arm={"tdpo_r": ["algorithm.critic.image_encoder=openai/clip-vit-large-patch14"]}) == ["ddpo", "tdpo_r"]


def test_an_arm_is_the_shared_config_with_its_algorithm_then_its_own_settings():
    per_arm = {"tdpo_r": ["training.learning_rate=3e-3"], "cdpo": CDPO_SETS}
    assert arm_overrides("ddpo", per_arm) == ["algorithm.name=ddpo", "algorithm.constraints=[]"]
    assert arm_overrides("tdpo_r", per_arm) == ["algorithm.name=tdpo_r", "algorithm.constraints=[]",
                                                "training.learning_rate=3e-3"]
    assert arm_overrides("cdpo", per_arm) == ["algorithm.name=cdpo", *CDPO_SETS]  # constraints are CDPO's own


def test_a_cdpo_config_can_still_run_a_ddpo_arm():
    """The shared config's constraints belong to CDPO: the DDPO arm drops them rather than failing validation."""
    config = yaml.safe_dump({**yaml.safe_load((REPO / "configs" / "testbed.yaml").read_text()),
                             "algorithm": {"name": "cdpo", "constraints": [
                                 {"reward": {"name": "testbed_fidelity"}, "relative_margin": 0.05}]}})
    assert plan_arms(config, algorithms=["ddpo", "cdpo"]) == ["ddpo", "cdpo"]


def test_each_arm_pushes_to_its_own_repo():
    assert plan_arms(TESTBED, algorithms=["ddpo", "tdpo_r"], push_to_hub="me/sd-{algorithm}") == ["ddpo", "tdpo_r"]
    assert plan_arms(TESTBED, push_to_hub="me/sd") == ["ddpo"]  # one arm: any repo id
    assert arm_repo_id("me/sd-{algorithm}", "tdpo_r") == "me/sd-tdpo_r"
    assert arm_repo_id("me/sd", "ddpo") == "me/sd" and arm_repo_id("", "ddpo") == ""


def test_each_arm_has_its_own_run_id():
    assert arm_run_id("8f1c-run", "tdpo_r") == "8f1c-run-tdpo_r"
    assert arm_run_id("", "ddpo") == ""  # no workdir: the run trains in its artifact


def test_evaluation_scores_a_cdpo_arms_constraint_as_a_constraint(tmp_path):
    from rewardtune.stages import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    assert evaluation_config(TESTBED, run) == resolve_config(TESTBED)  # no config.yaml: the shared config
    trained = resolve_config(TESTBED, ["algorithm.name=cdpo", *CDPO_SETS, "training.learning_rate=3e-3"])
    (run / "config.yaml").write_text(trained.to_yaml())
    cfg = evaluation_config(TESTBED, run)
    assert cfg.algorithm == trained.algorithm
    assert cfg.training.learning_rate == resolve_config(TESTBED).training.learning_rate  # only the algorithm section


def test_an_arm_artifact_holds_the_run_summary_and_merged_evaluations_without_weights(tmp_path):
    run = tmp_path / "checkpoints"
    (run / "checkpoints" / "epoch-000001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-000001" / "lora.safetensors").write_bytes(b"weights")
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": "tdpo_r"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    evals = []
    for i, name in enumerate(["epoch-000001", "epoch-000002"]):
        for checkpoint in ("base", name):  # every fanned-out evaluate also holds the base model's results
            (tmp_path / f"ev{i}" / checkpoint).mkdir(parents=True)
            (tmp_path / f"ev{i}" / checkpoint / "metrics.json").write_text(json.dumps({"from": i}))
        evals.append(tmp_path / f"ev{i}")
    arm = pack_arm(run, evals, tmp_path / "arm")
    assert sorted(p.relative_to(arm).as_posix() for p in arm.rglob("*") if p.is_file()) == [
        "eval/base/metrics.json", "eval/epoch-000001/metrics.json", "eval/epoch-000002/metrics.json",
        "run/config.yaml", "run/metrics.jsonl"]
    assert json.loads((arm / "eval" / "base" / "metrics.json").read_text()) == {"from": 0}  # the first copy is kept
    assert arm_algorithm(arm) == "tdpo_r"
    with pytest.raises(ConfigError, match="is not an arm"):
        arm_algorithm(tmp_path / "ev0")
