"""Tests of momentkit.smoothing against known answers.

The reference model is a linear two-class classifier ``f(x) = [w.x + b > 0 ? 0 : 1]``.
Its smoothed classifier is itself: ``P(f(x + eps) = f(x)) = Phi(|w.x + b| / (sigma ||w||))``
exceeds 1/2 exactly on f's side of the boundary, so Cohen et al.'s radius with the true
``p_A`` is ``sigma Phi^-1(p_A) = |w.x + b| / ||w||``, the exact distance to the decision
boundary (and no larger radius can be certified). Models run in float64 so rounding never
flips a prediction in the determinism tests.

Statistical tolerances: a certified radius above the exact one is a failure of the
``1 - alpha`` guarantee; over ``N`` independent images the number of such failures is at
most Binomial(N, alpha), so tests allow its ``1 - 1e-6`` quantile (a correct
implementation fails such a test with probability below 1e-6 for a fresh seed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from momentkit.errors import MomentInputError
from momentkit.smoothing import (
    SAMPLE_BLOCK,
    certify,
    lower_confidence_bound,
    smoothed_predict,
)

SIGMA = 0.5
D = 10
Q = 1 - 1e-6  # quantile of the binomial tolerances (see the module docstring)


def linear_classifier(seed: int = 0, device: str = "cpu") -> tuple[nn.Linear, torch.Tensor, float]:
    """``nn.Linear(D, 2)`` in float64 with logit difference ``w.x + b``; returns it, w, b."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = 0.3
    model = nn.Linear(D, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.stack([w / 2, -w / 2]))
        model.bias.copy_(torch.tensor([b / 2, -b / 2]))
    return model.to(device), w, b


def points_at_distances(w: torch.Tensor, b: float, dist: torch.Tensor, seed: int) -> torch.Tensor:
    """Points whose signed distance to ``w.x + b = 0`` is ``dist`` (positive: class 0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(dist), D, generator=g, dtype=torch.float64)
    unit = w / w.norm()
    on_boundary = x0 - ((x0 @ w + b) / w.norm())[:, None] * unit
    return on_boundary + dist[:, None] * unit


def true_class(w: torch.Tensor, b: float, x: torch.Tensor) -> torch.Tensor:
    return torch.where(x @ w + b > 0, 0, 1)


def exact_radius(w: torch.Tensor, b: float, x: torch.Tensor) -> torch.Tensor:
    return (x @ w + b).abs() / w.norm()


# --------------------------------------------------------------------------- the bound


def test_lower_bound_equals_scipys_exact_interval() -> None:
    # the closed form is the lower end of the two-sided exact interval at 1 - 2 alpha
    for k, n, alpha in [(1, 1, 0.001), (5, 10, 0.05), (9_000, 10_000, 0.001),
                        (99_999, 100_000, 0.001), (50, 100, 0.3)]:
        ref = stats.binomtest(k, n).proportion_ci(1 - 2 * alpha, method="exact").low
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_bound_coverage_is_exact(n: int, alpha: float) -> None:
    """``P(p_lower(K) > p) <= alpha`` summed exactly over K ~ Binomial(n, p) on a grid of p."""
    bounds = np.array([lower_confidence_bound(k, n, alpha) for k in range(n + 1)])
    for p in np.linspace(0.001, 0.999, 199):
        miss = stats.binom.pmf(np.arange(n + 1), n, p)[bounds > p].sum()
        assert miss <= alpha * (1 + 1e-9), (p, miss)


@pytest.mark.slow
def test_certify_coverage_by_simulation() -> None:
    """End to end: how often p_lower exceeds the true probability of the selected class."""
    model, w, b = linear_classifier(1)
    n_images, alpha = 600, 0.1
    dist = torch.linspace(-1.5, 1.5, n_images, dtype=torch.float64) * SIGMA
    x = points_at_distances(w, b, dist, seed=2)
    res = certify(model, x, SIGMA, n0=20, n=100, alpha=alpha, seed=3)
    p_class0 = torch.from_numpy(stats.norm.cdf((x @ w + b).numpy() / (SIGMA * w.norm().item())))
    p_true = torch.where(res.top_class == 0, p_class0, 1 - p_class0)
    misses = int((res.p_lower > p_true).sum())
    assert misses <= stats.binom.ppf(Q, n_images, alpha), misses
    # and the bound is not vacuous: it is within 5 binomial sd of the truth
    sd = torch.sqrt(p_true * (1 - p_true) / res.n)
    assert bool((res.p_lower > p_true - 5 * sd - 4.0 / res.n).all())


# --------------------------------------------------------------------------- known radius


@pytest.mark.slow
def test_soundness_never_above_the_distance_to_the_boundary() -> None:
    model, w, b = linear_classifier(4)
    n_images, alpha = 200, 0.001
    dist = torch.linspace(-3, 3, n_images, dtype=torch.float64) * SIGMA
    x = points_at_distances(w, b, dist, seed=5)
    res = certify(model, x, SIGMA, n=10_000, alpha=alpha, seed=6)
    answered = res.prediction != -1
    wrong = answered & (res.prediction != true_class(w, b, x))
    too_far = answered & (res.radius > exact_radius(w, b, x) * (1 + 1e-12))
    failures = int((wrong | too_far).sum())
    assert failures <= stats.binom.ppf(Q, n_images, alpha), failures
    assert bool((res.radius >= 0).all()) and bool((res.radius[~answered] == 0).all())
    assert int(answered.sum()) > n_images // 2  # most points are far enough to certify


@pytest.mark.slow
def test_tightness_reaches_the_exact_radius() -> None:
    """With n = 1e5, radii in [0.25, 2) sigma are certified to at least 90 %.

    Derived bound: with ``k`` at 5 binomial sd below its mean, ``p_lower`` is
    ``lower_confidence_bound(k, n, alpha)``; the certificate must reach the radius of that
    pessimistic ``p_lower``. Near radius 0 the gap ``sigma * 3.1 sqrt(p(1-p)/n) / phi(0)``
    (about 0.012 sigma, plus the noise of ``k``) is a large fraction of a small radius,
    so the 90 % check starts at 0.25 sigma, where the pessimistic bound gives 93 %.
    """
    model, w, b = linear_classifier(7)
    n, alpha = 100_000, 0.001
    dist = torch.tensor([0.25, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 1.8, 1.99], dtype=torch.float64)
    dist = torch.cat([dist, -dist]) * SIGMA
    x = points_at_distances(w, b, dist, seed=8)
    res = certify(model, x, SIGMA, n=n, alpha=alpha, seed=9)
    exact = exact_radius(w, b, x)
    assert torch.equal(res.prediction, true_class(w, b, x))
    p_true = torch.from_numpy(stats.norm.cdf(exact.numpy() / SIGMA))
    k = res.counts.gather(1, res.prediction[:, None])[:, 0].double()
    sd = torch.sqrt(n * p_true * (1 - p_true))
    assert bool(((k - n * p_true).abs() <= 5 * sd).all())  # noise is N(0, sigma^2 I)
    k_low = np.floor((n * p_true - 5 * sd).numpy()).astype(int)
    r_low = torch.tensor([SIGMA * stats.norm.ppf(lower_confidence_bound(int(kk), n, alpha))
                          for kk in k_low], dtype=torch.float64)
    assert bool((res.radius >= r_low).all())
    assert bool((res.radius >= 0.9 * exact).all()), (res.radius / exact).min()
    assert bool((res.radius <= exact).all())


@pytest.mark.slow
def test_abstains_at_the_boundary() -> None:
    model, w, b = linear_classifier(10)
    n_images, alpha = 20, 0.001
    x = points_at_distances(w, b, torch.zeros(n_images, dtype=torch.float64), seed=11)
    assert float(exact_radius(w, b, x).max()) < 1e-12
    res = certify(model, x, SIGMA, n=10_000, alpha=alpha, seed=12)
    answered = int((res.prediction != -1).sum())
    assert answered <= stats.binom.ppf(Q, n_images, alpha)
    assert bool((res.radius[res.prediction == -1] == 0).all())
    predicted = int((smoothed_predict(model, x, SIGMA, n=10_000, alpha=alpha) != -1).sum())
    assert predicted <= stats.binom.ppf(Q, n_images, alpha)


def test_smoothed_predict_returns_the_class_away_from_the_boundary() -> None:
    model, w, b = linear_classifier(13)
    dist = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], dtype=torch.float64) * SIGMA
    x = points_at_distances(w, b, dist, seed=14)
    # at 0.5 sigma p_A = 0.69; 1000 copies separate 690 from 310 with p-value ~1e-33
    assert torch.equal(smoothed_predict(model, x, SIGMA), true_class(w, b, x))


def test_radius_cap_and_zero_sigma() -> None:
    model, w, b = linear_classifier(15)
    x = points_at_distances(w, b, torch.tensor([20.0], dtype=torch.float64), seed=16)
    n, alpha = 1000, 0.001
    res = certify(model, x, SIGMA, n=n, alpha=alpha)
    cap = SIGMA * stats.norm.ppf(alpha ** (1 / n))  # all n copies agree
    assert res.radius.item() == pytest.approx(cap, rel=1e-12)
    zero = certify(model, x, 0.0, n=n, alpha=alpha)
    assert zero.prediction.item() == 0 and zero.radius.item() == 0.0


# --------------------------------------------------------------------------- determinism


def test_results_do_not_depend_on_batch_size_or_batch_composition() -> None:
    model, w, b = linear_classifier(17)
    dist = torch.linspace(-0.3, 0.3, 4, dtype=torch.float64) * SIGMA
    x = points_at_distances(w, b, dist, seed=18)
    kw = dict(n0=150, n=1234, alpha=0.01, seed=19)  # partial blocks on purpose
    ref = certify(model, x, SIGMA, batch_size=1000, **kw)
    for batch_size in (1, 7, SAMPLE_BLOCK, 250, 5000):
        other = certify(model, x, SIGMA, batch_size=batch_size, **kw)
        assert torch.equal(other.counts, ref.counts) and torch.equal(
            other.counts_selection, ref.counts_selection)
    alone = certify(model, x[2:3], SIGMA, indices=[2], **kw)
    assert torch.equal(alone.counts[0], ref.counts[2])
    reseeded = certify(model, x, SIGMA, **{**kw, "seed": 20})
    assert not torch.equal(reseeded.counts, ref.counts)
    preds = [smoothed_predict(model, x, SIGMA, n=500, batch_size=bs) for bs in (3, 1000)]
    assert torch.equal(preds[0], preds[1])


class _Recorder(nn.Module):
    """Wraps a model; records the batch sizes and training flags it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.sizes, self.modes = inner, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        self.modes.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("batch_size", [30, 250])
def test_batches_are_bounded_and_mode_is_restored(batch_size: int) -> None:
    model = _Recorder(linear_classifier(21)[0]).train()
    x = torch.zeros(2, D, dtype=torch.float64)
    certify(model, x, SIGMA, n0=50, n=3000, batch_size=batch_size)
    assert max(model.sizes) <= batch_size and sum(model.sizes) == 2 * (50 + 3000)
    assert not any(model.modes) and model.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_deterministic_and_agrees_in_distribution() -> None:
    model, w, b = linear_classifier(22, device="cuda")
    x = points_at_distances(w, b, torch.tensor([0.2, 1.0]) * SIGMA, seed=23)
    n = 20_000
    runs = [certify(model, x.cuda(), SIGMA, n=n, batch_size=bs) for bs in (64, 1000)]
    assert torch.equal(runs[0].counts, runs[1].counts)
    cpu = certify(model.cpu(), x, SIGMA, n=n)
    p = cpu.counts[:, 0].double() / n
    sd = torch.sqrt(2 * n * p * (1 - p))  # the difference of two independent counts
    assert bool(((runs[0].counts[:, 0] - cpu.counts[:, 0]).abs() <= 5 * sd).all())


# --------------------------------------------------------------------------- summaries


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": math.nan}, "sigma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"n": 0}, "n"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"x": torch.zeros(D)}, "x"),
        ({"x": torch.full((1, D), math.nan)}, "x"),
        ({"indices": [0, 1]}, "indices"),
    ],
)
@pytest.mark.parametrize("fn", [certify, smoothed_predict])
def test_bad_input_names_function_and_argument(kwargs: dict, argument: str, fn) -> None:
    model = linear_classifier(24)[0].float()
    args = {"x": torch.zeros(1, D), "sigma": SIGMA, **kwargs}
    with pytest.raises(MomentInputError, match=rf"{fn.__name__}: {argument}\b"):
        fn(model, args.pop("x"), args.pop("sigma"), **args)


@pytest.mark.parametrize("n0", [0, 1.5, True])
def test_bad_n0(n0: object) -> None:
    model = linear_classifier(25)[0].float()
    with pytest.raises(MomentInputError, match=r"certify: n0\b"):
        certify(model, torch.zeros(1, D), SIGMA, n0=n0)
