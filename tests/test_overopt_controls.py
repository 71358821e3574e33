"""rewardtune.testbed.controls: the benchmark's instrument checks, against hand-derived values, and the
controls script on a committed result (overopt-v6's oracle FAIL, as the outside review recomputed it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardtune.testbed import controls

REPO = Path(__file__).resolve().parents[1]


def test_drawdown_and_peak_then_fall():
    assert controls.drawdown([0.30, 0.40, 0.35]) == pytest.approx(0.05)
    assert controls.drawdown([0.30, 0.32, 0.34]) == 0.0
    # gold peaks at index 1, falls 0.03, proxy ends above its value there: overoptimization
    assert controls.peaks_then_falls([0.30, 0.40, 0.37], [0.30, 0.35, 0.40], drop=0.02)
    assert not controls.peaks_then_falls([0.30, 0.40, 0.37], [0.30, 0.35, 0.40], drop=0.05)  # fall too small
    assert not controls.peaks_then_falls([0.30, 0.40, 0.37], [0.30, 0.40, 0.35], drop=0.02)  # proxy fell too


def test_value_at_budget_interpolates_and_refuses_beyond_the_run():
    assert controls.value_at_budget([0, 64, 128], [0.0, 1.0, 3.0], 96) == pytest.approx(2.0)
    assert controls.value_at_budget([0, 64, 128], [0.0, 1.0, 3.0], 200) is None


def test_gold_area_is_the_trapezoid_over_the_budget():
    # (0.5*100*0.1 + 100*0.1) / 200 = 0.075
    assert controls.gold_area([0, 100, 200], [0.0, 0.1, 0.1], 200) == pytest.approx(0.075)
    # cut at 150: (0.5*100*0.1 + 50*0.1) / 150
    assert controls.gold_area([0, 100, 200], [0.0, 0.1, 0.1], 150) == pytest.approx(10.0 / 150)
    assert controls.gold_area([0, 100], [0.0, 0.1], 300) is None


def test_read_run_gives_gains_over_base():
    r = controls.read_run([0, 100, 200], proxy=[0.3, 0.35, 0.4], gold=[0.2, 0.25, 0.22], budget=200)
    assert r.final_gold == pytest.approx(0.02)
    assert r.final_proxy == pytest.approx(0.1)
    assert r.drawdown == pytest.approx(0.03)
    assert r.gold_area == pytest.approx((0.5 * 100 * 0.05 + 100 * (0.05 + 0.02) / 2) / 200)


def test_rule_gives_the_oracle_pass_and_a_null_no_pass():
    base = {s: controls.RunReading(0.01 * (s % 3), 0.02, 0.0, 0.05) for s in range(8)}
    oracle = {s: controls.RunReading(0.05 + 0.01 * (s % 3) + 0.002 * (s % 2), 0.0, 0.03, 0.05) for s in range(8)}
    verdict, _, d = controls.rule_on_pair(oracle, base, sesoi=0.01, level=0.95, resamples=2000, seed=0)
    assert verdict == "PASS" and min(d) > 0
    same, _, _ = controls.rule_on_pair(base, base, sesoi=0.01, level=0.95, resamples=2000, seed=0)
    assert same == "FAIL"  # δ = 0 exactly: both upper bounds (0) < the smallest effect of interest


def test_t_power_tracks_the_effect_size():
    assert controls.t_power([0.05, 0.051, 0.049, 0.05], n=10) == pytest.approx(1.0)
    null = controls.t_power([-0.01, 0.01, -0.02, 0.02, 0.0], n=10, sims=20000)
    assert 0.0 < null < 0.06  # a zero-mean effect passes the one-sided lower bound about 2.5% of the time
    assert controls.t_power([0.1], n=10) is None


def test_plateau_and_later_half():
    assert controls.plateau_epoch([0.1, 0.5, 0.95, 1.0, 0.9]) == 2
    assert controls.plateau_epoch([-1.0, -2.0]) is None
    assert controls.later_half_median([1.0, 2.0, 3.0, 4.0, None]) == pytest.approx(3.5)


def test_controls_script_recomputes_v6s_failed_oracle(capsys):
    from benchmarks.overopt.controls import analyze

    res = json.loads((REPO / "benchmarks/overopt/results/overopt-v6/results.json").read_text())
    out = analyze(res, critic_neurons=336, drop=0.02)
    assert out["G0_gmp"]["verdict"] == "FAIL"  # the rule failed its positive control
    assert out["G0_gmp"]["mean"] == pytest.approx(0.0039, abs=1e-4)
    assert out["G0_gmp"]["t_ci"] == pytest.approx([-0.0011, 0.0089], abs=1e-4)
    assert out["G1"]["peak_then_fall"] == "2/10"
    assert out["shuffled"]["gmp_mean"] == pytest.approx(0.0196, abs=1e-4)
    assert out["G4"]["violations"] == "0/10"


# --------------------------------------------------------------- a final_gold protocol's gates and verdicts
def _final_gold_protocol(seeds):
    from rewardtune.testbed.protocol import load_protocol

    p = load_protocol(REPO / "benchmarks/overopt/protocol.yaml")
    data = p.model_dump()
    data["seeds"] = seeds
    data["primary"] |= {"metric": "final_gold", "sesoi": 0.01, "proxy_margin": 0.01, "bootstrap_resamples": 2000}
    data["gates"]["instrument"] = {}
    return type(p).model_validate(data)


def _run(arm, algorithm, seed, gold, proxy=(0.30, 0.35, 0.40, 0.45), fidelity=(0.9, 0.9, 0.9, 0.9), ev=None,
         dormant=None):
    jitter = 0.001 * seed
    curves = {"checkpoint": ["base", "c1", "c2", "c3"], "samples": [0, 100, 200, 300], "proxy": list(proxy),
              "gold": [g + (jitter if i == 3 else 0.0) for i, g in enumerate(gold)], "fidelity": list(fidelity),
              "diversity": [0.2] * 4, "path_kl": [0.0, 1.0, 4.0, 9.0], "lambda": [], "train_proxy": [0.3],
              "reset_epochs": [], "neurons_reset": []}
    train = {"epoch0_approx_kl": 0.01, "epoch0_clipfrac": 0.1, "median_approx_kl": 0.01, "threshold": None,
             "train_constraint": [], "explained_variance": ev, "explained_variance_last_third": ev and [0.8] * len(ev),
             "first_reset_epoch": None, "dormant_fraction_at_reset": dormant or []}
    return {"name": f"{arm}-seed{seed}", "spec": {"arm": arm, "seed": seed, "algorithm": algorithm}, "curves": curves,
            "train": train, "timing": {"train_s": 1.0, "eval_s": 1.0, "path_kl_s": 1.0}}


def _final_gold_records(seeds, oracle_gold):
    ev = [0.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]  # plateau at epoch 1: the 8-epoch reset period is > 2x that
    overopt = (0.50, 0.56, 0.53, 0.50)  # gold peaks at the first checkpoint and gives 0.06 back; proxy keeps rising
    records = []
    for s in seeds:
        records += [_run("ddpo", "ddpo", s, overopt, fidelity=(0.9, 0.85, 0.8, 0.75)),
                    _run("tdpo", "tdpo", s, (0.50, 0.55, 0.56, 0.56), ev=ev),
                    _run("tdpo_r", "tdpo_r", s, (0.50, 0.55, 0.56, 0.56), proxy=(0.30, 0.30, 0.31, 0.31), dormant=[0.4]),
                    _run("cdpo", "cdpo", s, overopt, dormant=[0.5]),
                    _run("ddpo_gold", "ddpo", s, oracle_gold),
                    _run("ddpo_shuffled", "ddpo", s, (0.5, 0.5, 0.5, 0.5), proxy=(0.3, 0.3, 0.3, 0.3))]
    return records


def test_final_gold_protocol_gates_and_verdicts_on_hand_built_runs():
    from rewardtune.testbed.benchmark import analyze
    from rewardtune.testbed.stats import FAIL, INCONCLUSIVE, NO_VERDICT, PASS

    seeds = list(range(8))
    p = _final_gold_protocol(seeds)
    res = analyze(p, _final_gold_records(seeds, (0.50, 0.55, 0.60, 0.65)), [{"n": 2, "kl": 0.2, "proxy_gain": 0.01, "gold_gain": 0.01}], [])
    g = res["gates"]
    assert {k for k in g if k.startswith("G")} == {"G0_oracle", "G0_shuffled", "G1_overoptimization", "G2_critic_learns",
                                                   "G3_reset_hits_learned_neurons", "G4_constraint_has_work"}
    assert g["G0_oracle"]["verdict"] == PASS and g["G0_oracle"]["power_at_planned_seeds"] == pytest.approx(1.0)
    assert g["G1_overoptimization"]["seeds"] == "8/8" and g["G4_constraint_has_work"]["seeds"] == "8/8"
    assert g["G2_critic_learns"]["ev_median"] == pytest.approx(0.7)
    assert g["G3_reset_hits_learned_neurons"]["dormant_median"] == pytest.approx(0.45)
    assert res["gates_hold"], {k: v["holds"] for k, v in g.items()}
    tdpo = res["arms"]["tdpo"]["delta"]
    # final gold at 300 queries: tdpo 0.56 + j vs ddpo 0.50 + j: δ = 0.06 for every seed
    assert tdpo["differences"] == pytest.approx([0.06] * 8) and tdpo["verdict"] == PASS and tdpo["proxy_comparable"]
    tdpo_r = res["arms"]["tdpo_r"]["delta"]  # the same gold, bought by optimizing the proxy 0.14 less
    assert tdpo_r["verdict"] == INCONCLUSIVE and not tdpo_r["proxy_comparable"]
    assert res["arms"]["cdpo"]["delta"]["verdict"] == FAIL  # δ = 0 < the smallest effect of interest
    from rewardtune.testbed.benchmark import markdown

    page = markdown(res, {"wall_s": 1, "jobs": 1, "threads": 1, "runs": 48, "median_train_s": 1, "median_eval_s": 1,
                          "median_path_kl_s": 1})
    assert "G1_overoptimization" in page and "final held-out gold at the budget" in page
    # an oracle the rule cannot tell from DDPO fails G0, and withholds every verdict
    blind = analyze(p, _final_gold_records(seeds, (0.50, 0.56, 0.53, 0.50)), [], [])
    assert not blind["gates"]["G0_oracle"]["holds"] and not blind["gates_hold"]
    assert blind["arms"]["tdpo"]["delta"]["verdict"] == NO_VERDICT


def test_final_gold_needs_a_sesoi_and_the_instrument_gates():
    from rewardtune.testbed.protocol import load_protocol

    p = load_protocol(REPO / "benchmarks/overopt/protocol.yaml")
    data = p.model_dump()
    data["primary"]["metric"] = "final_gold"
    with pytest.raises(ValueError, match="primary.sesoi"):
        type(p).model_validate(data)


def test_cross_reward_table_reads_every_reward_at_the_budget():
    p = _final_gold_protocol([0, 1])
    p = type(p).model_validate(p.model_dump() | {"unseen_rewards": ["testbed_proxy_b"], "primary": {**p.primary.model_dump(), "budget": 150}})
    runs = {}
    for s in (0, 1):
        r = _run("ddpo", "ddpo", s, (0.5, 0.56, 0.53, 0.50))
        r["curves"]["unseen"] = {"testbed_proxy_b": [0.2, 0.25 + 0.01 * s, 0.3, 0.35]}
        runs[s] = r
    table = controls.cross_reward_table(p, {"ddpo": runs})
    assert table["budget"] == 150 and table["rewards"] == ["proxy", "gold", "fidelity", "testbed_proxy_b"]
    row = table["arms"]["ddpo"]
    assert row["proxy"]["mean"] == pytest.approx(0.075)  # halfway between +0.05 (100) and +0.10 (200)
    assert row["gold"]["mean"] == pytest.approx(0.045)  # halfway between +0.06 and +0.03
    # seed 0: halfway between +0.05 and +0.10; seed 1: between +0.06 and +0.10
    assert row["testbed_proxy_b"]["mean"] == pytest.approx((0.075 + 0.08) / 2)
    assert row["testbed_proxy_b"]["n"] == 2


def test_issue31_arms_build_their_configs():
    """The arms issue 31 names (grpo with its own group section, cdpo_policy, tdpo_nocritic) build through the
    benchmark's run_config, with the arm's algorithm set before its overrides."""
    from rewardtune.testbed.benchmark import RunSpec, run_config
    from rewardtune.testbed.protocol import load_protocol

    p = load_protocol(REPO / "benchmarks/overopt/protocol.yaml")
    grpo = run_config(p, RunSpec("grpo", "grpo", 100, overrides=["algorithm.group={group_size: 4}"]), Path("/tmp"))
    assert grpo.algorithm.name == "grpo" and grpo.algorithm.group.group_size == 4
    policy = run_config(p, RunSpec("cdpo_policy", "cdpo", 100, overrides=["algorithm.reset.target=policy_lora",
                                                                          "algorithm.reset.rule=overactive"]), Path("/tmp"))
    assert (policy.algorithm.reset.target, policy.algorithm.reset.rule) == ("policy_lora", "overactive")
    assert [c.reward.name for c in policy.algorithm.constraints] == ["testbed_fidelity"]
    nocritic = run_config(p, RunSpec("tdpo_nocritic", "tdpo", 100, overrides=["algorithm.critic.hold_value_at_zero=true"]), Path("/tmp"))
    assert nocritic.algorithm.critic.hold_value_at_zero


def test_path_kl_of_a_full_fine_tune_is_zero_at_base_and_positive_after_training(tmp_path):
    """A full fine-tune has no adapters to turn off: the base mean comes from a frozen copy of the base UNet."""
    from rewardtune.testbed.benchmark import RunSpec, run_config
    from rewardtune.testbed.compare import write_prompts
    from rewardtune.testbed.probes import checkpoint_path_kl
    from rewardtune.testbed.protocol import load_protocol
    from rewardtune.trainer import Trainer

    p = load_protocol(REPO / "benchmarks/overopt/pilot-v7.yaml")
    p = type(p).model_validate(p.model_dump() | {"epochs": 2, "checkpoint_every": 1})
    prompts = write_prompts(tmp_path / "prompts")
    spec = RunSpec("full", "ddpo", 100, overrides=["model.finetune=full", "training.learning_rate=1.0e-3",
                                                   "training.batch_size=8"])
    cfg = run_config(p, spec, prompts)
    Trainer(cfg, tmp_path / "run").run()
    kl = checkpoint_path_kl(cfg, tmp_path / "run", prompts, ["base", "epoch-000002"], prompts=2, images=1)
    assert kl["base"] == 0.0 and kl["epoch-000002"] > 0


def test_pilot_gates_recompute_session_8s_table(capsys):
    """CALIBRATION.md's Session 8 numbers come from the committed pilot runs (benchmarks/overopt/results/pilot-v7)."""
    from benchmarks.overopt.pilot_gates import main

    assert main([str(REPO / "benchmarks/overopt/results/pilot-v7")]) == 0
    table = capsys.readouterr().out
    assert "| full1e-4 | DDPO n=2 |" in table and "G0 δ +0.033 (+0.053, +0.014)" in table and "G1 0/2" in table
    assert "G0 δ -0.011 (+0.023, -0.045)" in table and "drawdown 0.049, 0.094" in table
    assert "| fulltd16 | tdpo n=1 |" in table and "G2 EV +0.11; last third +0.26" in table
