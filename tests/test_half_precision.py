"""bfloat16 and float16 inputs to every public function of momentkit.special and
momentkit.relu: results and gradients come back in the input's dtype, equal to the
float64 result at the same (rounded) inputs up to one rounding to that dtype.

Tolerance: the work is done in float32 (float64 for the variance, the covariances and
the bivariate cdf), within 1e-5 relative by the float32 contract, then rounded once to
the half dtype (at most eps/2 relative); so ``eps`` of the half dtype bounds the error.
Inputs are chosen so that every result is a normal number of the half dtype.
"""

from __future__ import annotations

import pytest
import torch

from momentkit.relu import (
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)
from momentkit.special import (
    bivariate_normal_cdf,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
)

F64 = torch.float64
HALF = [torch.bfloat16, torch.float16]


def _outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


def _check(fn, args, dtype):
    """Values and gradients of ``fn`` at half-precision ``args`` against float64 at the
    same values."""
    eps = torch.finfo(dtype).eps
    half = [a.to(dtype).requires_grad_() for a in args]
    wide = [a.detach().to(F64).requires_grad_() for a in half]
    got, ref = _outputs(fn(*half)), _outputs(fn(*wide))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r.detach(), rtol=eps, atol=0)
    sum(o.float().sum() for o in got).backward()
    sum(o.sum() for o in ref).backward()
    for h, w in zip(half, wide, strict=True):
        assert h.grad is not None and h.grad.dtype == dtype
        # The gradient is rounded once to the half dtype as well; entries that are 0 in
        # float64 (a constant direction) must be 0.
        torch.testing.assert_close(h.grad.double(), w.grad, rtol=eps, atol=0)


X = torch.tensor([-2.5, -1.0, -0.3, 0.0, 0.7, 2.0], dtype=F64)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fn", [normal_pdf, normal_cdf, mills_ratio])
def test_univariate_half(fn, dtype):
    _check(fn, (X,), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_log_normal_cdf_half(dtype):
    # log Phi(x) crosses 0 as x grows: away from it (x <= 0.7 keeps |log Phi| >= 0.28).
    _check(log_normal_cdf, (X[:-1],), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_bivariate_cdf_half(dtype):
    h = torch.tensor([-1.0, 0.5, 1.5, 0.0, -0.5], dtype=F64)
    k = torch.tensor([0.3, -0.2, 1.0, 0.0, 1.2], dtype=F64)
    r = torch.tensor([0.2, -0.6, 0.95, 0.5, -0.97], dtype=F64)
    _check(bivariate_normal_cdf, (h, k, r), dtype)


MU = torch.tensor([-2.5, -1.2, -0.4, 0.0, 0.9, 3.0], dtype=F64)
SPREAD = torch.tensor([0.8, 1.0, 2.0, 0.5, 1.5, 1.0], dtype=F64)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fn", [relu_mean, relu_mean_std, relu_moments])
def test_relu_moments_half(fn, dtype):
    _check(fn, (MU, SPREAD), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_relu_mean_half_broadcast_variance(dtype):
    # A half model's layer: a batch of means, one variance image broadcast over it.
    mu = torch.linspace(-3, 3, 24, dtype=F64).reshape(4, 6)
    _check(relu_mean, (mu, SPREAD.reshape(1, 6)), dtype)


def _cov():
    a = torch.tensor([[1.0, 0.3, -0.2], [0.0, 0.8, 0.5], [0.4, 0.0, 1.1]], dtype=F64)
    return a @ a.T + 0.25 * torch.eye(3, dtype=F64)


@pytest.mark.parametrize("dtype", HALF)
def test_relu_covariance_half(dtype):
    mean = torch.tensor([0.4, -0.6, 1.0], dtype=F64)

    def fn(m, c):
        return relu_covariance(m, 0.5 * (c + c.T))

    _check(fn, (mean, _cov()), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_relu_covariance_zero_mean_half(dtype):
    def fn(c):
        return relu_covariance_zero_mean(0.5 * (c + c.T))

    _check(fn, (_cov(),), dtype)
