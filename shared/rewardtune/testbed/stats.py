"""The statistics of the overoptimization benchmark (benchmarks/overopt/PROTOCOL.md), as pure functions.

Everything the verdict depends on is here, so each number can be re-derived by hand: GMP (gold at a
matched proxy gain, from a least-squares line per run), the paired Student-t and bootstrap intervals of
δ = method − DDPO, the PASS / FAIL / INCONCLUSIVE rule, best-of-n's analytic KL, the path KL of a
Gaussian denoising chain, and the Gao et al. (2022) gold-vs-√KL fit. numpy only (scipy is not a dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PASS, FAIL, INCONCLUSIVE, NO_VERDICT = "PASS", "FAIL", "INCONCLUSIVE", "NO VERDICT"


# ------------------------------------------------------------------------------------------ per run
def gmp(proxy_gain: Sequence[float], gold: Sequence[float], at: float) -> float | None:
    """Gold at proxy gain `at` from the least-squares line gold = a + b · proxy_gain over a run's checkpoints.

    A line over all checkpoints uses every evaluation (less noisy than interpolating the two around `at`);
    None when the proxy gain never varies (no line). Reading outside the observed range extrapolates: the
    caller records whether the run reached `at`.
    """
    x, y = np.asarray(proxy_gain, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"proxy_gain has {len(x)} points, gold {len(y)}")
    if len(x) < 2 or float(np.ptp(x)) == 0.0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * at)


# ------------------------------------------------------------------------------------------ t quantile
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (Lentz's method, Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on t_cdf; 1e-12 absolute)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1 (got p={p}, df={df})")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def paired_t_ci(differences: Sequence[float], level: float = 0.95) -> Interval | None:
    """mean ± t_{(1+level)/2, n-1} · sd / √n of paired differences; None under 2 pairs."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile((1 + level) / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Interval(mean, mean - half, mean + half, len(d))


def bootstrap_ci(differences: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval | None:
    """Percentile bootstrap of the mean of paired differences (resampling pairs); None under 2 pairs.

    Percentiles use numpy's 'lower'/'higher' order statistics, so the bounds are always resampled means.
    """
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1 - level) / 2
    low = float(np.quantile(means, alpha, method="lower"))
    high = float(np.quantile(means, 1 - alpha, method="higher"))
    return Interval(float(d.mean()), low, high, len(d))


# ------------------------------------------------------------------------------------------ verdict
def verdict(t_ci: Interval | None, boot_ci: Interval | None, secondary_signs: Sequence[float], sesoi: float,
            gates_hold: bool) -> tuple[str, str]:
    """The pre-registered rule (PROTOCOL.md §Decision rule); returns (verdict, the reason in words).

    NO VERDICT: a validity gate failed, or fewer than 2 pairs.
    PASS: both intervals' lower bounds > 0 and every secondary δ mean > 0 (they agree in sign).
    FAIL: both intervals' upper bounds < sesoi (any benefit is smaller than the smallest effect of interest).
    INCONCLUSIVE: anything else.
    """
    if not gates_hold:
        return NO_VERDICT, "a validity gate failed"
    if t_ci is None or boot_ci is None:
        return NO_VERDICT, "fewer than 2 paired seeds"
    if t_ci.low > 0 and boot_ci.low > 0:
        if all(s > 0 for s in secondary_signs):
            return PASS, f"both 95% lower bounds > 0 ({t_ci.low:.4f}, {boot_ci.low:.4f}) and the secondary metrics agree"
        return INCONCLUSIVE, "primary lower bounds > 0 but a secondary metric disagrees in sign"
    if t_ci.high < sesoi and boot_ci.high < sesoi:
        return FAIL, f"both 95% upper bounds < {sesoi:.4f} ({t_ci.high:.4f}, {boot_ci.high:.4f})"
    return INCONCLUSIVE, "the intervals include 0 and effects of at least the smallest effect of interest"


# ------------------------------------------------------------------------------------------ KL
def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base) for a continuous score: log n − (n−1)/n (Stiennon et al. 2020; an upper bound in general)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1 (got {n})")
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[float, float]:
    """Expected (proxy, gold) of the proxy-best of n samples drawn without replacement from each row's m
    samples (rows: prompts), averaged over rows: the unbiased all-subsets estimator (Nakano et al. 2021).

    With a row sorted by proxy, its i-th smallest (1-based) is the best of a random n-subset with
    probability C(i-1, n-1) / C(m, n).
    """
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    m = proxy.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt (have {m})")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=np.float64) / math.comb(m, n)
    order = np.argsort(proxy, axis=1, kind="stable")
    p = np.take_along_axis(proxy, order, 1) @ weights
    g = np.take_along_axis(gold, order, 1) @ weights
    return float(p.mean()), float(g.mean())


def path_kl(mean_policy: np.ndarray, mean_base: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Σ_t ‖μ_θ − μ_base‖² / 2σ_t² per sample: the KL of two Gaussian denoising chains with shared σ_t,
    evaluated along the policy's own trajectory. Arrays [B, K, ...] (means) and [B, K] or [K] (std)."""
    diff = np.asarray(mean_policy, dtype=np.float64) - np.asarray(mean_base, dtype=np.float64)
    sq = (diff**2).reshape(diff.shape[0], diff.shape[1], -1).sum(axis=2)
    std = np.asarray(std, dtype=np.float64)
    std = np.broadcast_to(std, sq.shape)
    return (sq / (2 * std**2)).sum(axis=1)


def fit_gold_vs_sqrt_kl(sqrt_kl: Sequence[float], gold_gain: Sequence[float]) -> tuple[float, float] | None:
    """Least squares of gold gain on d = √KL with Gao et al.'s RL form R(d) = d (α − β log d); returns (α, β).

    d = 0 contributes 0 = 0 (its log term is taken as 0). None when no point has d > 0.
    """
    d, r = np.asarray(sqrt_kl, dtype=np.float64), np.asarray(gold_gain, dtype=np.float64)
    keep = d > 0
    if keep.sum() < 2:
        return None
    x = np.stack([d[keep], -d[keep] * np.log(d[keep])], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(x, r[keep], rcond=None)
    return float(alpha), float(beta)


def bootstrap_fit(runs: Sequence[tuple[Sequence[float], Sequence[float]]], resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, list[float]] | None:
    """Bootstrap over runs (each a (√KL, gold gain) curve) of (α, β): their [low, high] percentile intervals."""
    fits = []
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = rng.integers(len(runs), size=len(runs))
        d = [v for i in pick for v in runs[i][0]]
        g = [v for i in pick for v in runs[i][1]]
        fit = fit_gold_vs_sqrt_kl(d, g)
        if fit is not None:
            fits.append(fit)
    if not fits:
        return None
    arr = np.asarray(fits)
    a = (1 - level) / 2
    return {"alpha": [float(np.quantile(arr[:, 0], a)), float(np.quantile(arr[:, 0], 1 - a))],
            "beta": [float(np.quantile(arr[:, 1], a)), float(np.quantile(arr[:, 1], 1 - a))]}
