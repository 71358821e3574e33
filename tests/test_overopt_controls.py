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
