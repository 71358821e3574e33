"""The overoptimization benchmark: plan, analysis and verdict on hand-built curves; the CLI end to end (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewardtune.testbed.benchmark import (
    GOLD_CONTROL,
    SHUFFLED_CONTROL,
    analyze,
    markdown,
    plan,
    run_metrics,
    train_summary,
)
from rewardtune.testbed.protocol import load_protocol, smoke
from rewardtune.testbed.stats import FAIL, NO_VERDICT, PASS

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "benchmarks" / "overopt" / "protocol.yaml"
PROXY = [0.3, 0.36, 0.42]  # held-out proxy gains 0, 0.06, 0.12


def _record(arm: str, seed: int, gold_slope: float, proxy=PROXY, algorithm: str = "ddpo") -> dict:
    gold = [0.5 + gold_slope * (p - proxy[0]) for p in proxy]
    curves = {"checkpoint": ["base", "c1", "c2"], "proxy": list(proxy), "gold": gold, "fidelity": [0.9, 0.89, 0.88],
              "diversity": [0.2, 0.2, 0.19], "path_kl": [0.0, 0.04, 0.16], "lambda": [0.0, 0.1], "train_proxy": [0.3, 0.4],
              "reset_epochs": [], "samples": [0, 16, 32]}
    train = {"epoch0_approx_kl": 0.03, "epoch0_clipfrac": 0.1, "median_approx_kl": 0.01,
             "explained_variance_before_reset": None, "threshold": None, "train_constraint": []}
    return {"name": f"{arm}-seed{seed}", "spec": {"arm": arm, "seed": seed, "algorithm": algorithm}, "curves": curves,
            "train": train, "timing": {"train_s": 1.0, "eval_s": 1.0, "path_kl_s": 1.0}}


def _protocol(**changes):
    p = load_protocol(PROTOCOL)
    data = p.model_dump()
    data.update(changes)
    return type(p).model_validate(data)


def test_plan_is_every_arm_times_seed_then_the_controls():
    p = load_protocol(PROTOCOL)
    runs = plan(p)
    arms = [a.name for a in p.arms]
    assert [r.name for r in runs[: len(arms)]] == [f"{a}-seed{p.seeds[0]}" for a in arms]  # whole pairs first
    assert len(runs) == len(arms) * len(p.seeds) + len(p.gates.gold_trained.seeds) + len(p.gates.shuffled_proxy.seeds)
    assert {r.reward for r in runs if r.arm == GOLD_CONTROL} == {"testbed_gold"}
    assert {r.reward for r in runs if r.arm == SHUFFLED_CONTROL} == {"testbed_proxy_shuffled"}
    from rewardtune.testbed.benchmark import run_config

    for spec in (runs[0], next(r for r in runs if r.arm == GOLD_CONTROL), next(r for r in runs if r.arm == SHUFFLED_CONTROL)):
        cfg = run_config(p, spec, Path("prompts"))  # every run is judged on proxy, gold and fidelity
        assert {cfg.reward.name, *(r.name for r in cfg.eval_rewards)} >= {"testbed_proxy", "testbed_gold", "testbed_fidelity"}
        assert cfg.reward.name not in {r.name for r in cfg.eval_rewards}
        assert (cfg.training.epochs, cfg.evaluation.num_heldout_prompts) == (p.epochs, 54)
    tiny = smoke(p)
    assert (tiny.seeds, tiny.epochs, tiny.smoke) == (p.seeds[:2], 4, True)


@pytest.mark.parametrize(("threshold", "expected"), [(None, {"threshold": None, "relative_margin": 0.05}),
                                                      (0.48, {"threshold": 0.48, "relative_margin": None})])
def test_cdpo_constraint_is_the_protocols_absolute_threshold_or_its_margin(threshold, expected):
    from rewardtune.testbed.benchmark import run_config

    p = _protocol(cdpo_fidelity_threshold=threshold, cdpo_fidelity_margin=0.05)
    cdpo = next(r for r in plan(p) if r.algorithm == "cdpo")
    (constraint,) = run_config(p, cdpo, Path("prompts")).algorithm.constraints
    assert constraint.reward.name == "testbed_fidelity"
    assert {"threshold": constraint.threshold, "relative_margin": constraint.relative_margin} == expected
    ddpo = next(r for r in plan(p) if r.algorithm == "ddpo")
    assert run_config(p, ddpo, Path("prompts")).algorithm.constraints == []


def test_run_metrics_by_hand():
    m = run_metrics(_record("ddpo", 0, -0.2)["curves"], 0.05)
    assert m["gmp"] == pytest.approx(-0.2 * 0.05)  # the line gold gain = -0.2 x proxy gain, read at +0.05
    assert m["reached"] and m["final_gold_gain"] == pytest.approx(-0.2 * 0.12)
    assert m["gold_at_gain_interpolated"] == pytest.approx(-0.01)
    assert m["sqrt_kl"] == pytest.approx([0.0, 0.2, 0.4])


def test_train_summary_explained_variance_before_the_first_reset():
    evs = [0.0, 0.2, -0.1, 0.3, 0.4, 0.1, 0.9]
    records = [{"epoch": e, "approx_kl": 0.01, "clipfrac": 0.1, "global_step": 20 * (e + 1), "reset": e == 5,
                "value_explained_variance": v} for e, v in enumerate(evs)]
    s = train_summary(records)
    assert s["explained_variance_before_reset"] == pytest.approx(0.1)  # epoch 5, the reset epoch
    assert s["explained_variance_before_reset_mean"] == pytest.approx((-0.1 + 0.3 + 0.4 + 0.1) / 4)  # epochs 2-5
    assert s["optimizer_steps_per_epoch"] == 20


def test_train_summary_explained_variance_by_thirds_before_the_first_reset():
    records = [{"epoch": e, "approx_kl": 0.01, "clipfrac": 0.1, "global_step": 20 * (e + 1), "reset": e == 5,
                "value_explained_variance_first_third": -0.1 * e, "value_explained_variance_middle_third": None if e == 4 else 0.1,
                "value_explained_variance_last_third": 0.1 * e} for e in range(7)]
    s = train_summary(records)
    first, middle, last = s["explained_variance_thirds_before_reset_mean"]
    assert first == pytest.approx(-0.1 * (2 + 3 + 4 + 5) / 4)  # epochs 2-5, the reset epoch last
    assert middle == pytest.approx(0.1)  # epoch 4 logged none: the 4 latest logged values (epochs 1, 2, 3, 5)
    assert last == pytest.approx(0.1 * (2 + 3 + 4 + 5) / 4)
    assert train_summary([{"epoch": 0, "approx_kl": 0.0, "clipfrac": 0.0, "global_step": 2}])[
        "explained_variance_thirds_before_reset_mean"] == [None, None, None]  # DDPO logs no critic


def test_analysis_verdicts_and_gates_on_hand_built_runs():
    seeds = [0, 1, 2, 3]
    primary = {**load_protocol(PROTOCOL).primary.model_dump(), "proxy_gain": 0.05, "sesoi_fraction": 0.2}
    p = _protocol(seeds=seeds, primary=primary)  # the numbers below are derived at +0.05, SESOI 0.01
    records = []
    for s in seeds:
        records.append(_record("ddpo", s, -0.2))
        records.append(_record("tdpo", s, 0.4 + 0.02 * s))  # GMP 0.02 + 0.001 s: δ = 0.03 + 0.001 s > 0
        records.append(_record("tdpo_r", s, -0.2))  # identical to DDPO: δ = 0, below the 0.01 effect of interest
        records.append(_record("cdpo", s, -0.2 + (0.3 if s % 2 else -0.3)))  # ±0.015: wide, straddles 0
    records += [_record(GOLD_CONTROL, s, 0.5) for s in (0, 1, 2)]
    records += [_record(SHUFFLED_CONTROL, s, 0.0, proxy=[0.3, 0.3, 0.31]) for s in (0, 1, 2)]
    bon = [{"n": 1, "kl": 0.0, "proxy_gain": 0.0, "gold_gain": 0.0}, {"n": 2, "kl": 0.19, "proxy_gain": 0.03, "gold_gain": 0.02}]
    res = analyze(p, records, bon, [])
    assert res["gates_hold"], res["gates"]
    tdpo = res["arms"]["tdpo"]["delta"]
    assert tdpo["differences"] == pytest.approx([0.03 + 0.001 * s for s in seeds])
    assert tdpo["t_ci"]["mean"] == pytest.approx(0.0315) and tdpo["verdict"] == PASS
    assert res["arms"]["tdpo_r"]["delta"]["verdict"] == FAIL
    assert res["arms"]["cdpo"]["delta"]["verdict"] == "INCONCLUSIVE"
    assert res["arms"]["ddpo"]["gmp"]["mean"] == pytest.approx(-0.01)
    assert "PASS" in markdown(res, {"wall_s": 1, "jobs": 1, "threads": 1, "runs": len(records), "median_train_s": 1,
                                    "median_eval_s": 1, "median_path_kl_s": 1})
    # a failed gate withholds every verdict; so does a smoke protocol
    bad = analyze(p, [r for r in records if r["spec"]["arm"] != GOLD_CONTROL], bon, [])
    assert not bad["gates_hold"] and bad["arms"]["tdpo"]["delta"]["verdict"] == NO_VERDICT
    assert analyze(smoke(p), records, bon, [])["arms"]["tdpo"]["delta"]["verdict"] == NO_VERDICT


def test_bad_protocol_is_one_line_error(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(PROTOCOL.read_text().replace("baseline: ddpo", "baseline: dpo"))
    out = subprocess.run([sys.executable, "-m", "rewardtune.cli", "testbed", "benchmark", "--protocol", str(bad),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "baseline" in out.stderr and "Traceback" not in out.stderr


def test_benchmark_continues_only_with_its_thread_count(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "execution.json").write_text(json.dumps({"threads": 2}))  # as a benchmark started with 2 threads leaves it
    base = [sys.executable, "-m", "rewardtune.cli", "testbed", "benchmark", "--protocol", str(PROTOCOL), "--out", str(out)]
    for extra, needle in ((["--threads", "1"], "--threads 2"), (["--threads", "0"], "at least 1 torch thread")):
        res = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (out / "runs").exists()  # refused before any run started


@pytest.mark.slow
def test_smoke_benchmark_end_to_end_and_resumes(tmp_path):
    """`--smoke`: every arm and control trains, evaluates and is analysed; a rerun finds every run finished."""
    cmd = [sys.executable, "-m", "rewardtune.cli", "testbed", "benchmark", "--protocol", str(PROTOCOL),
           "--out", str(tmp_path), "--smoke", "--jobs", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == len(plan(smoke(load_protocol(PROTOCOL))))
    for r in res["runs"].values():
        assert len(r["curves"]["gold"]) == 3 and r["curves"]["path_kl"][0] == 0.0 and r["curves"]["path_kl"][-1] > 0
    assert all(e["delta"]["verdict"] == NO_VERDICT for e in res["arms"].values() if e.get("delta"))
    assert res["gates"]["best_of_n"]["table"][0]["kl"] == 0.0 and res["gates"]["probes"]["table"]
    assert "<img" in (tmp_path / "results.html").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{len(res['runs'])} already finished, 0 to run" in again.stdout


def test_new_config_fields_validate_with_one_line_errors():
    from rewardtune.config import load_config
    from rewardtune.errors import ConfigError

    cfg = load_config(REPO / "configs" / "testbed.yaml")
    assert cfg.sampling.images_per_prompt == 4 and cfg.algorithm.lagrange.normalize == "base_std"
    with pytest.raises(ConfigError, match="images_per_prompt=3 must divide sampling.batch_size=8"):
        load_config(REPO / "configs" / "testbed.yaml", ["sampling.images_per_prompt=3"])
    with pytest.raises(ConfigError, match="algorithm.lagrange.normalize"):
        load_config(REPO / "configs" / "testbed.yaml", ["algorithm.lagrange.normalize=std"])
