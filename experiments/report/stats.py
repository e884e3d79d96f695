"""Statistics of the report: per-image robustness scores and paired bootstrap intervals.

**Robustness** (Eq. 6) of a model is ``R = trapz(curve, sigmas) / (sigmas[-1] - sigmas[0])``
where ``curve[k]`` is the fraction of test images whose prediction is unchanged under noise
``sigmas[k]``. Since ``curve[k] = mean_i robust[k, i]``, ``R = mean_i r_i`` with the per-image
score ``r_i = sum_k w_k robust[k, i]`` and trapezoid weights ``w`` (:func:`trapezoid_weights`),
so R and accuracy are both means over test images.

**Paired bootstrap** (:func:`paired_bootstrap`). Two models evaluated on the same test
images are compared by resampling image indices with replacement, the same indices for
both models (``scipy.stats.bootstrap`` with ``paired=True``), and taking percentile
intervals of each model's accuracy and R, of the differences and of the ratio of R. For a
difference of means the interval approaches ``d +- z * sd(d_i) / sqrt(n)``; the ratio
interval carries the uncertainty of a claim such as "twice as robust". It conditions on
the trained models: it does not cover seed-to-seed variation of training.

**Certified radii** (:func:`compare_certificates`) are compared the same way: the ACR is the
mean of the per-image certified radii ``radius_i * [correct_i]``, so the paired bootstrap
of two runs certified on the same images gives intervals for the ACR difference and ratio,
and for the difference of certified accuracies at radius 0 (the smoothed classifiers'
accuracies, abstentions counting as errors).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from experiments.report.certificates import Certificate
from experiments.report.records import RunRecord

__all__ = [
    "BOOTSTRAP_METHOD",
    "Interval",
    "certificates_comparable",
    "compare_certificates",
    "compare_records",
    "finite_or_none",
    "intervals_json",
    "paired_bootstrap",
    "per_image_robustness",
    "trapezoid_weights",
]

BOOTSTRAP_METHOD = "percentile"
"""``method`` of ``scipy.stats.bootstrap`` used for every interval of the report."""

_BATCH = 250  # resamples per vectorized call: memory O(_BATCH * n) per array


def trapezoid_weights(sigmas: np.ndarray) -> np.ndarray:
    """``w`` with ``w @ curve == trapz(curve, sigmas) / (sigmas[-1] - sigmas[0])``.

    Raises:
        ValueError: fewer than two sigmas or a zero-width range.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if s.ndim != 1 or s.size < 2 or s[-1] == s[0]:
        raise ValueError(f"sigmas must be a 1-d range of at least 2 distinct values, got {s}")
    d = np.diff(s)
    w = np.zeros_like(s)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w / (s[-1] - s[0])


def per_image_robustness(robust: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Per-image score ``r_i = sum_k w_k robust[k, i]``; its mean over images is R (Eq. 6).

    ``robust`` is ``(n_sigmas, n)``; the result is ``(n,)``.
    """
    return trapezoid_weights(sigmas) @ np.asarray(robust, dtype=np.float64)


@dataclass(frozen=True)
class Interval:
    """A point estimate and a percentile-bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float

    def fmt(self, digits: int = 4, pct: bool = False) -> str:
        k = 100.0 if pct else 1.0
        e, lo, hi = k * self.estimate, k * self.low, k * self.high
        return f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)


_NAMES = (
    "accuracy_a",
    "accuracy_b",
    "accuracy_diff",
    "robustness_a",
    "robustness_b",
    "robustness_diff",
    "robustness_ratio",
)


def _paired_statistics(
    correct_a: np.ndarray,
    score_a: np.ndarray,
    correct_b: np.ndarray,
    score_b: np.ndarray,
    axis: int = -1,
) -> np.ndarray:
    """The seven statistics of :data:`_NAMES` along ``axis``, stacked on a new first axis."""
    acc_a, acc_b = correct_a.mean(axis=axis), correct_b.mean(axis=axis)
    rob_a, rob_b = score_a.mean(axis=axis), score_b.mean(axis=axis)
    ratio = np.divide(rob_a, rob_b, out=np.full_like(rob_a, np.nan), where=rob_b > 0)
    return np.stack([acc_a, acc_b, acc_a - acc_b, rob_a, rob_b, rob_a - rob_b, ratio])


def paired_bootstrap(
    correct_a: np.ndarray,
    score_a: np.ndarray,
    correct_b: np.ndarray,
    score_b: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Paired percentile bootstrap over test images for models ``a`` and ``b``.

    ``scipy.stats.bootstrap(..., paired=True, method="percentile")``: each of ``n_boot``
    resamples draws n image indices with replacement and applies them to all four arrays.

    Args:
        correct_a, correct_b: (n,) clean correctness of each model on the same n images.
        score_a, score_b: (n,) per-image robustness scores (:func:`per_image_robustness`).
        n_boot: bootstrap resamples; the Monte Carlo error of an interval end is of order
            ``sd / sqrt(n * n_boot)`` of the statistic's scale.
        level: two-sided confidence level.
        seed: seed of the ``numpy.random.Generator`` that draws the resamples (the same
            seed gives the same intervals).

    Returns:
        Intervals for ``accuracy_a``, ``accuracy_b``, ``accuracy_diff`` (a - b),
        ``robustness_a``, ``robustness_b``, ``robustness_diff`` (a - b) and
        ``robustness_ratio`` (a / b). The ratio's estimate is nan when R_b = 0, and its
        interval is nan when R_b = 0 in some resample (the ratio is then unbounded).

    Raises:
        ValueError: arrays of different length or fewer than 2 images, ``n_boot < 10``,
            level outside (0, 1).
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (correct_a, score_a, correct_b, score_b)]
    n = arrays[0].shape[0] if arrays[0].ndim == 1 else 0
    if n < 2 or any(x.shape != (n,) for x in arrays):
        raise ValueError(
            "paired_bootstrap needs four (n,) arrays with n >= 2, got "
            f"{[x.shape for x in arrays]}"
        )
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    with warnings.catch_warnings():
        # scipy warns when a statistic is nan in some resample (the ratio with R_b = 0
        # there); the nan interval below says it
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(arrays),
            _paired_statistics,
            n_resamples=n_boot,
            batch=_BATCH,
            vectorized=True,
            paired=True,
            confidence_level=level,
            method=BOOTSTRAP_METHOD,
            rng=np.random.default_rng(seed),
        )
    estimates = _paired_statistics(*arrays)
    low, high = res.confidence_interval
    return {
        name: Interval(float(estimates[k]), float(low[k]), float(high[k]), level)
        for k, name in enumerate(_NAMES)
    }


def compare_records(
    a: RunRecord, b: RunRecord, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Interval]:
    """:func:`paired_bootstrap` of two complete runs from their ``per_image.npz``.

    Raises:
        ValueError: the runs were not evaluated on the same test images and sigmas.
    """
    ca, ra = a.per_image()
    cb, rb = b.per_image()
    if ca.shape != cb.shape or not np.array_equal(a.sigmas, b.sigmas):
        raise ValueError(
            f"runs {a.run_id} and {b.run_id} were not evaluated on the same test images/sigmas"
        )
    return paired_bootstrap(
        ca,
        per_image_robustness(ra, a.sigmas),
        cb,
        per_image_robustness(rb, b.sigmas),
        n_boot=n_boot,
        level=level,
        seed=seed,
    )


def finite_or_none(value: float) -> float | None:
    """``value`` as a float, or ``None`` when it is nan or infinite (for strict JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def intervals_json(intervals: Mapping[str, Interval]) -> dict[str, dict[str, float | None]]:
    """Named intervals as strict-JSON dicts ``{estimate, low, high, level}`` (nan: ``None``)."""
    return {
        k: {f: finite_or_none(v) for f, v in vars(i).items()} for k, i in intervals.items()
    }


_CERTIFIED_NAMES = {
    "accuracy_a": "certified_accuracy_a",
    "accuracy_b": "certified_accuracy_b",
    "accuracy_diff": "certified_accuracy_diff",
    "robustness_a": "acr_a",
    "robustness_b": "acr_b",
    "robustness_diff": "acr_diff",
    "robustness_ratio": "acr_ratio",
}


def certificates_comparable(a: Certificate, b: Certificate) -> bool:
    """True when ``a`` and ``b`` certify the same image indices at the same sigma, n, alpha."""
    return a.settings() == b.settings() and np.array_equal(a.index, b.index)


def compare_certificates(
    a: Certificate, b: Certificate, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Interval]:
    """Paired bootstrap of two runs' certificates on the same images (:func:`paired_bootstrap`).

    The per-image score is the certified radius ``radius_i * [correct_i]`` (mean: the ACR)
    and the per-image correctness is ``correct_i`` (mean: certified accuracy at radius 0).

    Returns:
        Intervals ``certified_accuracy_a``, ``certified_accuracy_b``,
        ``certified_accuracy_diff`` (a - b), ``acr_a``, ``acr_b``, ``acr_diff`` (a - b) and
        ``acr_ratio`` (a / b; nan when an ACR of b is 0, as in :func:`paired_bootstrap`).

    Raises:
        ValueError: the certificates differ in sigma, n, alpha or image indices
            (:func:`certificates_comparable`), or hold fewer than 2 images.
    """
    if not certificates_comparable(a, b):
        raise ValueError(
            f"compare_certificates: {a.path} and {b.path} do not certify the same images at "
            f"the same (sigma, n, alpha): {a.settings()} with {a.n_images} images against "
            f"{b.settings()} with {b.n_images}"
        )
    iv = paired_bootstrap(
        a.correct,
        a.certified_radius,
        b.correct,
        b.certified_radius,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
    return {_CERTIFIED_NAMES[k]: v for k, v in iv.items()}
