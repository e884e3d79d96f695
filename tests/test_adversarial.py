"""Adversarial values over every public core function: a right answer or a clear error.

The values a demanding user (or a diverging training run) produces: infinities, NaN,
subnormal numbers, huge numbers (1e300, 3e38, 6e4 near the float16 limit), empty
tensors, covariances that are not positive semi-definite, and the four floating
dtypes. Every function must either return a finite tensor of the right shape or raise
:class:`MomentInputError`: never NaN, never another exception type.

The univariate special functions are elementwise maps whose infinite limits are the
right answers (``log Phi(-inf) = -inf``); for them the contract checked is "NaN in is
refused, no NaN from a non-NaN input, the right limit at infinity".
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from momentkit import (
    MomentInputError,
    affine_moments,
    affine_relu_affine_covariance,
    affine_relu_affine_mean,
    bivariate_normal_cdf,
    expected_prediction,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)

INF = math.inf
SPECIAL_VALUES = [
    INF, -INF, math.nan, 5e-324, 1e-310, 1e-45, -1e-45, 1e-300, 1e300, -1e300, 3e38, -3e38,
    6e4, -6e4, 0.0, -0.0, 1.0, -2.5,
]
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

values = st.one_of(st.sampled_from(SPECIAL_VALUES), st.floats(-10, 10, allow_nan=False))
dtypes = st.sampled_from(DTYPES)
sizes = st.integers(0, 3)


def vectors(n: int, nonneg: bool = False) -> st.SearchStrategy[list[float]]:
    v = st.lists(values, min_size=n, max_size=n)
    return v.map(lambda xs: [abs(x) for x in xs]) if nonneg else v


@st.composite
def covariances(draw, n: int) -> list[list[float]]:
    """A PSD Gram matrix at an adversarial scale, a symmetric matrix that is usually
    not PSD, or a PSD matrix with one adversarial entry placed symmetrically."""
    kind = draw(st.sampled_from(["gram", "symmetric", "poisoned"]))
    a = [[draw(st.floats(-3, 3)) for _ in range(n)] for _ in range(n)]
    if kind == "symmetric":
        return [[a[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)]
    scale = draw(st.sampled_from([1.0, 1e-300, 1e-40, 1e300, 3e38, 6e4, 5e-324]))
    cov = [[scale * sum(a[i][k] * a[j][k] for k in range(n)) for j in range(n)]
           for i in range(n)]
    if kind == "poisoned" and n:
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        cov[i][j] = cov[j][i] = draw(values)
    return cov


def tensor(xs, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64).to(dtype)


def finite_or_refused(call, *shapes: tuple[int, ...]) -> None:
    """``call()`` raises MomentInputError, or returns finite tensors of ``shapes``."""
    try:
        out = call()
    except MomentInputError:
        return
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(shapes)
    for t, shape in zip(outs, shapes, strict=True):
        assert tuple(t.shape) == shape
        assert bool(torch.isfinite(t).all()), f"non-finite answer {t}"


# ---------------------------------------------------------------- elementwise ReLU moments


@given(sizes, dtypes, st.data())
def test_relu_elementwise_functions(n, dtype, data):
    mean = tensor(data.draw(vectors(n)), dtype)
    spread = tensor(data.draw(vectors(n, nonneg=data.draw(st.booleans()))), dtype)
    finite_or_refused(lambda: relu_mean(mean, spread), (n,))
    finite_or_refused(lambda: relu_mean_std(mean, spread), (n,))
    finite_or_refused(lambda: relu_moments(mean, spread), (n,), (n,))


# ---------------------------------------------------------------- covariances


def _relu_covariance_case(n, dtype, data, means) -> None:
    mean = tensor(data.draw(st.lists(means, min_size=n, max_size=n)), dtype)
    cov = tensor(data.draw(covariances(n)), dtype).reshape(n, n)
    finite_or_refused(lambda: relu_covariance(mean, cov), (n, n))
    finite_or_refused(lambda: relu_covariance_zero_mean(cov), (n, n))


MODERATE = values.filter(lambda v: math.isnan(v) or abs(v) < 1e4)


@given(sizes, dtypes, st.data())
def test_relu_covariance_functions(n, dtype, data):
    _relu_covariance_case(n, dtype, data, MODERATE)


@given(sizes, dtypes, st.data())
def test_relu_covariance_functions_huge_means(n, dtype, data):
    _relu_covariance_case(n, dtype, data, values)


@pytest.mark.parametrize("z", [1e8, 1e300])
def test_relu_covariance_far_in_the_linear_regime(z):
    """For ``mean/std -> +inf`` both ReLUs are the identity: the covariance is the
    input's, ``rho s_i s_j`` (here 0.5), to float64 rounding."""
    cov = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    out = relu_covariance(torch.tensor([z, z], dtype=torch.float64), cov)
    assert abs(out[0, 1].item() - 0.5) <= 1e-12


@given(sizes, st.integers(0, 3), dtypes, st.booleans(), st.data())
def test_affine_moments(n, m, dtype, full, data):
    mean = tensor(data.draw(vectors(n)), dtype)
    matrix = tensor(data.draw(st.lists(vectors(n), min_size=m, max_size=m)), dtype).reshape(m, n)
    bias = tensor(data.draw(vectors(m)), dtype)
    if full:
        cov = tensor(data.draw(covariances(n)), dtype).reshape(n, n)
        finite_or_refused(lambda: affine_moments(matrix, mean, cov, bias), (m,), (m, m))
    else:
        var = tensor(data.draw(vectors(n, nonneg=True)), dtype)
        finite_or_refused(lambda: affine_moments(matrix, mean, var, bias), (m,), (m,))


@given(st.integers(0, 3), st.integers(0, 3), dtypes, st.booleans(), st.data())
def test_affine_relu_affine(n, h, dtype, full, data):
    d = 2
    mean = tensor(data.draw(vectors(n)), dtype)
    if full:
        cov = tensor(data.draw(covariances(n)), dtype).reshape(n, n)
    else:
        cov = tensor(data.draw(vectors(n, nonneg=data.draw(st.booleans()))), dtype)
    A = tensor(data.draw(st.lists(vectors(n), min_size=h, max_size=h)), dtype).reshape(h, n)
    c1 = tensor(data.draw(vectors(h)), dtype)
    B = tensor(data.draw(st.lists(vectors(h), min_size=d, max_size=d)), dtype).reshape(d, h)
    c2 = tensor(data.draw(vectors(d)), dtype)
    finite_or_refused(lambda: affine_relu_affine_mean(mean, cov, A, c1, B, c2), (d,))
    finite_or_refused(lambda: affine_relu_affine_covariance(mean, cov, A, c1, B, c2), (d, d))


# ---------------------------------------------------------------- the regularizer


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@given(st.integers(0, 3), dtypes, st.data())
def test_expected_prediction(batch, dtype, data):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    x = tensor(data.draw(st.lists(vectors(3), min_size=batch, max_size=batch)), dtype)
    x = x.reshape(batch, 3)
    sigma = data.draw(st.one_of(values, st.sampled_from([0.0, 0.1, 0.5])))
    finite_or_refused(lambda: tuple(expected_prediction(model, x, sigma)), (batch, 2), (batch, 2))


# ---------------------------------------------------------------- special functions


def _bvn_case(n, dtype, data, allow_inf: bool) -> None:
    h = tensor(data.draw(vectors(n)), dtype)
    k = tensor(data.draw(vectors(n)), dtype)
    if not allow_inf:  # after the cast: 1e300 is inf in float32
        assume(not bool(torch.isinf(h).any() or torch.isinf(k).any()))
    rho = tensor(data.draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)), dtype)
    finite_or_refused(lambda: bivariate_normal_cdf(h, k, rho), (n,))


@given(sizes, dtypes, st.data())
def test_bivariate_normal_cdf(n, dtype, data):
    _bvn_case(n, dtype, data, allow_inf=False)


@given(sizes, dtypes, st.data())
def test_bivariate_normal_cdf_at_infinity(n, dtype, data):
    _bvn_case(n, dtype, data, allow_inf=True)


@pytest.mark.parametrize("fn, at_minus_inf, at_plus_inf", [
    (normal_cdf, 0.0, 1.0), (normal_pdf, 0.0, 0.0), (log_normal_cdf, -INF, 0.0),
    (mills_ratio, INF, 0.0),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_univariate_special_functions_limits_and_no_nan(fn, at_minus_inf, at_plus_inf, dtype):
    finite = [v for v in SPECIAL_VALUES if not math.isnan(v) and not math.isinf(v)]
    x = tensor(finite, dtype)
    out = fn(x)
    assert out.shape == x.shape and not bool(torch.isnan(out).any())
    assert fn(tensor([-INF], dtype)).item() == at_minus_inf
    assert fn(tensor([INF], dtype)).item() == at_plus_inf
    assert fn(torch.empty(0, dtype=dtype)).shape == (0,)


@pytest.mark.parametrize("fn", [normal_cdf, normal_pdf, log_normal_cdf, mills_ratio])
@pytest.mark.parametrize("dtype", DTYPES)
def test_univariate_special_functions_refuse_nan(fn, dtype):
    x = tensor([0.5, math.nan], dtype)
    with pytest.raises(MomentInputError, match=rf"^{fn.__name__}: x contains NaN"):
        fn(x)


@pytest.mark.parametrize("fn, at_inf", [(normal_cdf, 0.0), (normal_pdf, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_univariate_special_functions_gradient_at_infinity(fn, at_inf, dtype):
    """The derivative's limit at +-inf (``phi``, ``-x phi``) is 0, and so is the gradient."""
    x = tensor([-INF, INF], dtype).requires_grad_()
    fn(x).sum().backward()
    assert x.grad.tolist() == [at_inf, at_inf]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rho", [-1.0, -0.999999, -0.93, -0.5, 0.0, 0.3, 0.925, 0.99, 1.0])
@pytest.mark.parametrize("k", [-INF, -38.0, -5.0, -1.0, 0.0, 0.5, 3.0, 40.0, 1e300, INF])
def test_bivariate_normal_cdf_limits_at_infinity(dtype, rho, k):
    """``Phi2(+inf, k) = Phi2(k, +inf) = Phi(k)`` and ``Phi2(-inf, k) = 0`` exactly (as
    ``Phi(k)`` is rounded to the dtype), with gradients the limits ``0``, ``phi(k)``, 0."""
    kt = tensor([k], dtype)
    limit = normal_cdf(kt.double()).to(dtype)
    slope = normal_pdf(kt.double()).to(dtype)
    for h, expect, d_k in ((INF, limit, slope), (-INF, torch.zeros_like(kt), 0 * slope)):
        ht, kk, rt = (tensor([v], dtype).requires_grad_() for v in (h, k, rho))
        out = bivariate_normal_cdf(ht, kk, rt)
        out.backward()
        assert out.tolist() == expect.tolist()
        assert bivariate_normal_cdf(kt, ht.detach(), rt.detach()).tolist() == expect.tolist()
        assert ht.grad.tolist() == [0.0] and rt.grad.tolist() == [0.0]
        # d Phi(k)/dk is autograd's derivative of erfc, exp(-k^2/2) formed another way:
        # the rounding of the exponent, amplified k^2/2-fold, plus a few ulps (and the
        # final cast to the dtype); beyond |k| ~ 38.6 both are exactly 0.
        amplification = min(k * k / 2, 1e3) + 4
        torch.testing.assert_close(
            kk.grad, d_k, rtol=amplification * torch.finfo(dtype).eps, atol=0
        )
