"""momentkit.special against mpmath and against the naive formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from momentkit.errors import MomentInputError
from momentkit.special import (
    bivariate_normal_cdf,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
)
from tests.mp_reference import bvn_ref, mp

F64 = torch.float64
EPS64 = torch.finfo(F64).eps

# Points on both sides of the |rho| = 0.925 switch, at +-1 and near it, and h, k
# from the far lower tail to the upper tail.
H = [-7.0, -0.3, 0.7, 6.0]
K = [-4.0, 0.0, 1.5]
RHO = [-1.0, -0.9999, -0.95, -0.925, -0.9, -0.5, 0.0, 0.3, 0.8, 0.924, 0.925, 0.926,
       0.99, 0.999999, 1.0]


def test_bivariate_cdf_matches_mpmath_everywhere():
    pts = list(itertools.product(H, K, RHO))
    h, k, r = (torch.tensor(c, dtype=F64) for c in zip(*pts, strict=True))
    got = bivariate_normal_cdf(h, k, r)
    bad = []
    for (hh, kk, rr), g in zip(pts, got.tolist(), strict=True):
        ref = float(bvn_ref(hh, kk, rr))
        # Genz's algorithm is accurate to about 1e-16 absolute; 8 eps leaves room for
        # the rounding of the final sums.
        if abs(g - ref) > 8 * EPS64:
            bad.append((hh, kk, rr, g, ref, abs(g - ref)))
    assert not bad, f"{len(bad)} points off: {bad}"


def test_bivariate_cdf_special_cases():
    x = torch.linspace(-4, 4, 17, dtype=F64)
    y = torch.linspace(3, -3, 17, dtype=F64)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    torch.testing.assert_close(bivariate_normal_cdf(x, y, zero), normal_cdf(x) * normal_cdf(y),
                               rtol=4 * EPS64, atol=4 * EPS64)
    torch.testing.assert_close(bivariate_normal_cdf(x, y, one), normal_cdf(torch.minimum(x, y)),
                               rtol=0, atol=0)
    # rho = -1 subtracts the two cdfs in another order: equal up to one rounding.
    torch.testing.assert_close(bivariate_normal_cdf(x, y, -one),
                               (normal_cdf(x) - normal_cdf(-y)).clamp_min(0), rtol=0, atol=EPS64)


def test_bivariate_cdf_gradcheck():
    h = torch.tensor([-1.3, 0.2, 2.0, 0.5], dtype=F64, requires_grad=True)
    k = torch.tensor([0.4, -0.7, 1.1, 0.5], dtype=F64, requires_grad=True)
    r = torch.tensor([0.3, -0.6, 0.95, -0.97], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(bivariate_normal_cdf, (h, k, r))


def test_bivariate_cdf_gradient_finite_at_unit_correlation():
    h = torch.tensor([0.3, -1.0], dtype=F64, requires_grad=True)
    k = torch.tensor([-0.2, 2.0], dtype=F64, requires_grad=True)
    r = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
    bivariate_normal_cdf(h, k, r).sum().backward()
    for g in (h.grad, k.grad, r.grad):
        assert torch.isfinite(g).all()
    # rho = 1: Phi(min(h, k)) depends on k only (k < h).
    assert h.grad[0] == 0 and k.grad[0] == pytest.approx(float(normal_pdf(k[0].detach())))


def test_bivariate_cdf_float32_rounds_the_float64_value():
    h, k, r = torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([0.6])
    got = bivariate_normal_cdf(h, k, r)
    assert got.dtype == torch.float32
    ref = float(bvn_ref(0.5, -0.5, float(r)))
    assert abs(got.item() - ref) <= torch.finfo(torch.float32).eps * ref


@pytest.mark.parametrize(
    "bad, msg", [((0.0, 0.0, 1.5), "rho"), ((float("nan"), 0.0, 0.1), "h"),
                 ((0.0, float("nan"), 0.1), "k")]
)
def test_bivariate_cdf_bad_input(bad, msg):
    with pytest.raises(MomentInputError, match=msg):
        bivariate_normal_cdf(*(torch.tensor(v, dtype=F64) for v in bad))


@pytest.mark.parametrize("x", [-37.0, -20.0, -5.0, -1.0, 0.0, 0.5, 3.0, 8.0])
def test_univariate_functions_match_mpmath(x):
    t = torch.tensor(x, dtype=F64)
    assert normal_pdf(t).item() == pytest.approx(float(mp.npdf(x)), rel=4 * EPS64 * (1 + x * x))
    assert normal_cdf(t).item() == pytest.approx(float(mp.ncdf(x)), rel=8 * EPS64 * (1 + x * x))
    assert log_normal_cdf(t).item() == pytest.approx(float(mp.log(mp.ncdf(x))), rel=1e-13)
    mills = (1 - mp.ncdf(x)) / mp.npdf(x)
    # erfcx(x/sqrt 2) grows like exp(x^2/2) for x < 0: rounding x costs x^2 ulps.
    assert mills_ratio(t).item() == pytest.approx(float(mills), rel=8 * EPS64 * (1 + x * x))


def test_univariate_functions_equal_naive_on_benign_inputs():
    x = torch.linspace(-3, 3, 101, dtype=F64)
    torch.testing.assert_close(normal_cdf(x), 0.5 * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(
        mills_ratio(x), (1 - normal_cdf(x)) / normal_pdf(x), rtol=1e-13, atol=0
    )
    assert np.allclose(log_normal_cdf(x).numpy(), np.log(normal_cdf(x).numpy()), rtol=1e-14)
