"""Tests of experiments.report.stats: trapezoid weights, per-image robustness and the paired
bootstrap (scipy.stats.bootstrap with paired=True)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report import paired_bootstrap, per_image_robustness, trapezoid_weights
from experiments.report.stats import BOOTSTRAP_METHOD
from tests.experiments.report_runs import EPS, SIGMAS, trapezoid


def test_trapezoid_weights_integrate_like_the_trapezoid_rule() -> None:
    rng = np.random.default_rng(0)
    sigmas = np.sort(rng.random(17)) * 0.5
    curve = rng.random(17)
    w = trapezoid_weights(sigmas)
    expected = trapezoid(curve, sigmas) / (sigmas[-1] - sigmas[0])
    assert abs(w @ curve - expected) <= 8 * EPS
    assert abs(w.sum() - 1.0) <= 8 * EPS
    np.testing.assert_allclose(trapezoid_weights(SIGMAS), [1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8])
    with pytest.raises(ValueError, match="sigmas"):
        trapezoid_weights(np.zeros(3))


def test_per_image_scores_average_to_the_robustness() -> None:
    rng = np.random.default_rng(1)
    robust = rng.random((5, 300)) < 0.8
    r = per_image_robustness(robust, SIGMAS)
    assert r.shape == (300,)
    assert abs(r.mean() - trapezoid(robust.mean(1), SIGMAS) / 0.5) <= 8 * EPS


def _paired_sample(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    correct_b = rng.random(n) < 0.9
    flip = rng.random(n) < 0.05
    correct_a = np.where(flip, ~correct_b, correct_b)
    score_b = rng.beta(5, 2, n)
    score_a = np.clip(score_b + rng.normal(0.05, 0.1, n), 0, 1)
    return correct_a, score_a, correct_b, score_b


def test_paired_bootstrap_agrees_with_normal_theory() -> None:
    """For means of n=4000 paired per-image values the bootstrap distribution is close to
    normal, so its 95% percentile interval must be est +- 1.96 sd/sqrt(n) (difference) and
    the delta-method interval (ratio). Tolerance: 0.2 standard errors, which covers the
    Monte Carlo error of a 2.5% quantile from 4000 resamples (about 0.04 standard errors,
    taken 4 times) plus the O(1/sqrt(n)) skewness of the resampled means."""
    n = 4000
    correct_a, score_a, correct_b, score_b = _paired_sample(n, 2)
    iv = paired_bootstrap(correct_a, score_a, correct_b, score_b, n_boot=4000, seed=3)
    z = stats.norm.ppf(0.975)
    d_acc = correct_a.astype(float) - correct_b
    d_rob = score_a - score_b
    ratio = score_a.mean() / score_b.mean()
    lin = (score_a - ratio * score_b) / score_b.mean()  # delta-method influence values
    for name, values, est in (
        ("accuracy_diff", d_acc, d_acc.mean()),
        ("robustness_diff", d_rob, d_rob.mean()),
        ("robustness_ratio", lin, ratio),
    ):
        se = values.std(ddof=1) / math.sqrt(n)
        got = iv[name]
        assert abs(got.estimate - est) <= 64 * EPS * max(1.0, abs(est)), name
        assert abs(got.low - (est - z * se)) <= 0.2 * se, (name, got, est, se)
        assert abs(got.high - (est + z * se)) <= 0.2 * se, (name, got, est, se)
    # the single-model intervals too
    se_a = score_a.std(ddof=1) / math.sqrt(n)
    assert abs(iv["robustness_a"].low - (score_a.mean() - z * se_a)) <= 0.2 * se_a
    # pairing matters: the difference interval is far narrower than an unpaired one
    unpaired = z * math.sqrt(score_a.var(ddof=1) / n + score_b.var(ddof=1) / n)
    assert iv["robustness_diff"].high - iv["robustness_diff"].low < unpaired


def test_paired_bootstrap_is_scipys_paired_percentile_bootstrap() -> None:
    """The intervals are those of scipy.stats.bootstrap(paired=True, method="percentile")
    with a Generator seeded by ``seed``: equal to rounding (the same resamples, the same
    quantile rule), and reproducible for a fixed seed."""
    data = _paired_sample(300, 5)
    iv = paired_bootstrap(*data, n_boot=500, seed=11)
    assert BOOTSTRAP_METHOD == "percentile"
    ref = stats.bootstrap(
        (data[1], data[3]),
        lambda a, b, axis=-1: a.mean(axis=axis) / b.mean(axis=axis),
        n_resamples=500,
        paired=True,
        method="percentile",
        rng=np.random.default_rng(11),
    )
    ci = ref.confidence_interval
    assert abs(iv["robustness_ratio"].low - ci.low) <= 16 * EPS
    assert abs(iv["robustness_ratio"].high - ci.high) <= 16 * EPS
    assert paired_bootstrap(*data, n_boot=500, seed=11) == iv
    other = paired_bootstrap(*data, n_boot=500, seed=12)
    assert other["robustness_ratio"] != iv["robustness_ratio"]
    assert other["robustness_ratio"].estimate == iv["robustness_ratio"].estimate


def test_ratio_is_nan_when_the_reference_is_never_robust() -> None:
    n = 50
    ones, zeros = np.ones(n), np.zeros(n)
    iv = paired_bootstrap(ones, ones, ones, zeros, n_boot=50)
    assert math.isnan(iv["robustness_ratio"].estimate)
    assert math.isnan(iv["robustness_ratio"].low) and math.isnan(iv["robustness_ratio"].high)
    assert iv["robustness_diff"].estimate == 1.0 == iv["robustness_diff"].low


def test_paired_bootstrap_rejects_bad_input() -> None:
    a = np.ones(5)
    with pytest.raises(ValueError, match="four"):
        paired_bootstrap(a, a, a, np.ones(4))
    with pytest.raises(ValueError, match="n >= 2"):
        paired_bootstrap(*[np.ones(1)] * 4)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(a, a, a, a, n_boot=5)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, a, a, a, level=1.0)
