"""The benchmark's statistics (rewardtune.testbed.stats) against values derived by hand."""

import math

import numpy as np
import pytest

from rewardtune.testbed import stats
from rewardtune.testbed.stats import FAIL, INCONCLUSIVE, NO_VERDICT, PASS, Interval


def test_gmp_is_the_least_squares_line_read_at_the_gain():
    assert stats.gmp([0.0, 0.1], [0.5, 0.6], 0.05) == pytest.approx(0.55)
    # (0,0), (1,1), (2,1): slope Sxy/Sxx = 1/2, intercept 2/3 - 1/2 = 1/6; at 0.5: 1/6 + 1/4
    assert stats.gmp([0.0, 1.0, 2.0], [0.0, 1.0, 1.0], 0.5) == pytest.approx(1 / 6 + 1 / 4)
    assert stats.gmp([0.1, 0.1], [0.2, 0.3], 0.05) is None  # the proxy never moved: no line
    assert stats.gmp([0.0], [0.2], 0.05) is None


def test_t_distribution_matches_closed_forms_and_tables():
    assert stats.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.5 + math.atan(1.0) / math.pi)  # Cauchy: 0.75
    # df = 2 has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so F^-1(0.975) = sqrt(2 * 0.95^2 / (1 - 0.95^2))
    assert stats.t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), abs=1e-9)
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-8)  # 12.7062
    assert stats.t_quantile(0.975, 9) == pytest.approx(2.262157163, abs=1e-8)  # printed tables


def test_paired_t_interval_by_hand():
    ci = stats.paired_t_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, half = t(0.975, 2) / sqrt(3)
    half = math.sqrt(2 * 0.95**2 / (1 - 0.95**2)) / math.sqrt(3)
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.low == pytest.approx(2 - half) and ci.high == pytest.approx(2 + half)
    assert stats.paired_t_ci([0.3]) is None


def test_bootstrap_of_two_pairs_spans_their_extremes():
    # resampled means of {0, 1} are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: 2.5% -> 0, 97.5% -> 1
    ci = stats.bootstrap_ci([0.0, 1.0], resamples=10_000)
    assert (ci.low, ci.mean, ci.high) == (0.0, 0.5, 1.0)
    constant = stats.bootstrap_ci([0.2, 0.2, 0.2])
    assert constant.low == pytest.approx(0.2) and constant.high == pytest.approx(0.2)
    assert stats.bootstrap_ci([1.0, 2.0, 3.0], seed=3) == stats.bootstrap_ci([1.0, 2.0, 3.0], seed=3)


def test_verdict_rule():
    pos, zero, small = Interval(0.1, 0.02, 0.2, 10), Interval(0.0, -0.1, 0.1, 10), Interval(-0.01, -0.03, 0.005, 10)
    assert stats.verdict(pos, pos, [0.1, 0.3], sesoi=0.01, gates_hold=True)[0] == PASS
    assert stats.verdict(pos, pos, [0.1, -0.3], sesoi=0.01, gates_hold=True)[0] == INCONCLUSIVE
    assert stats.verdict(small, small, [0.1], sesoi=0.01, gates_hold=True)[0] == FAIL
    assert stats.verdict(zero, zero, [0.1], sesoi=0.01, gates_hold=True)[0] == INCONCLUSIVE
    assert stats.verdict(pos, zero, [0.1], sesoi=0.01, gates_hold=True)[0] == INCONCLUSIVE  # both must agree
    assert stats.verdict(pos, pos, [0.1], sesoi=0.01, gates_hold=False)[0] == NO_VERDICT
    assert stats.verdict(None, None, [], sesoi=0.01, gates_hold=True)[0] == NO_VERDICT


def test_best_of_n():
    assert stats.best_of_n_kl(1) == 0.0
    assert stats.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert stats.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    proxy, gold = np.array([[1.0, 3.0, 2.0, 0.0]]), np.array([[10.0, 20.0, 30.0, 40.0]])
    # sorted by proxy: 0 (gold 40), 1 (10), 2 (30), 3 (20); best of a random pair is rank i w.p. (i-1)/6
    p2, g2 = stats.best_of_n(proxy, gold, 2)
    assert p2 == pytest.approx((1 * 1 + 2 * 2 + 3 * 3) / 6) and g2 == pytest.approx((10 * 1 + 30 * 2 + 20 * 3) / 6)
    assert stats.best_of_n(proxy, gold, 1) == pytest.approx((1.5, 25.0))  # the plain mean
    assert stats.best_of_n(proxy, gold, 4) == (3.0, 20.0)  # all four: the proxy's argmax
    with pytest.raises(ValueError):
        stats.best_of_n(np.zeros((1, 3)), np.zeros((1, 3)), 4)


def test_path_kl_by_hand():
    mu_p = np.zeros((1, 2, 2))
    mu_b = np.array([[[1.0, 1.0], [2.0, 0.0]]])
    # step 0: |(1,1)|^2 / (2 * 1^2) = 1; step 1: 4 / (2 * 2^2) = 0.5
    assert stats.path_kl(mu_p, mu_b, np.array([1.0, 2.0])).tolist() == [1.5]
    assert stats.path_kl(mu_b, mu_b, np.array([1.0, 2.0])).tolist() == [0.0]


def test_sqrt_kl_fit_recovers_gao_coefficients():
    d = np.array([0.0, 0.2, 0.5, 1.0, 2.0])
    r = np.where(d > 0, d * (0.3 - 0.1 * np.log(np.where(d > 0, d, 1.0))), 0.0)
    alpha, beta = stats.fit_gold_vs_sqrt_kl(d, r)
    assert alpha == pytest.approx(0.3) and beta == pytest.approx(0.1)
    assert stats.fit_gold_vs_sqrt_kl([0.0, 0.0], [0.0, 0.0]) is None
    ci = stats.bootstrap_fit([(d, r), (d, r)], resamples=50)
    assert ci["alpha"] == pytest.approx([0.3, 0.3]) and ci["beta"] == pytest.approx([0.1, 0.1])


def test_bonferroni_reading_widens_each_interval(tmp_path, capsys):
    """benchmarks/overopt/multiplicity.py: intervals at 1 − 0.05/3 for three methods. For d = (0, 0.01, 0.02)
    the t interval is 0.01 ± t · 0.01/√3, with t = √(2q²/(1 − q²)) = 7.649 for df 2, q = 1 − 0.05/3: ±0.04416."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "overopt" / "multiplicity.py"
    spec = importlib.util.spec_from_file_location("multiplicity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    delta = {"differences": [0.0, 0.01, 0.02], "sesoi": 0.05,
             "secondary": {"final_gold_gain": 0.01, "gold_at_gain_interpolated": 0.01}}
    results = {"arms": {"ddpo": {"delta": None}, "a": {"delta": delta}, "b": {"delta": delta}, "c": {"delta": delta}},
               "protocol": {"primary": {"level": 0.95, "bootstrap_resamples": 1000, "bootstrap_seed": 0}},
               "gates_hold": True}
    rows = [row for row in module.bonferroni_rows(results) if row.startswith("| a |")]
    low, high = (float(x) for x in rows[0].split("|")[2].strip(" []").split(","))
    assert low == pytest.approx(0.01 - 0.04416, abs=1e-4) and high == pytest.approx(0.01 + 0.04416, abs=1e-4)
    assert rows[0].rstrip(" |").endswith(INCONCLUSIVE)  # lower bound < 0, upper 0.054 > SESOI 0.05
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert module.main([str(tmp_path / "r.json")]) == 0
    assert "| a | [" in capsys.readouterr().out
    assert module.main([]) == 2
