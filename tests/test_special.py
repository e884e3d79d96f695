"""momentkit.special against mpmath and against the naive formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from momentkit.errors import MomentInputError
from momentkit.special import (
    BVN_HIGH_CORRELATION,
    BVN_HK_CUTOFF,
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


@pytest.mark.slow
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


# Each region of Genz's (2004) algorithm on its own, as BoTorch's test_bvn does: the
# regions of his BVNU (6, 12 and 20 Gauss-Legendre points below |rho| = 0.3, 0.75 and
# BVN_HIGH_CORRELATION; Drezner-Wesolowsky above; the degenerate rho = +-1), although
# this implementation uses GL_POINTS points in all three low-correlation ones.
BVN_REGIONS = {
    "abs(rho)<0.3": [0.05, -0.15, 0.29],
    "abs(rho)<0.75": [0.31, -0.5, 0.74],
    "abs(rho)<0.925": [0.76, -0.85, 0.92],
    "abs(rho)>=0.925": [0.93, -0.97, 0.99999],
    "abs(rho)=1": [1.0, -1.0],
}
REGION_H = [-5.0, -1.2, 0.0, 0.8, 3.0]
REGION_K = [-2.5, 0.4, 4.0]


@pytest.mark.slow
@pytest.mark.parametrize("region", list(BVN_REGIONS))
def test_bivariate_cdf_each_region_against_mpmath(region):
    pts = list(itertools.product(REGION_H, REGION_K, BVN_REGIONS[region]))
    h, k, r = (torch.tensor(c, dtype=F64) for c in zip(*pts, strict=True))
    got = bivariate_normal_cdf(h, k, r)
    # Absolute accuracy 1e-16 (Genz 2004); 8 eps for the rounding of the final sums.
    refs = [float(bvn_ref(*p)) for p in pts]
    bad = [(p, g, ref) for p, g, ref in zip(pts, got.tolist(), refs, strict=True)
           if abs(g - ref) > 8 * EPS64]
    assert not bad, bad
    # Identities: symmetry in (h, k) and Phi2(h, k; rho) + Phi2(h, -k; -rho) = Phi(h);
    # each side carries at most two 8-eps errors.
    torch.testing.assert_close(got, bivariate_normal_cdf(k, h, r), rtol=0, atol=16 * EPS64)
    torch.testing.assert_close(got + bivariate_normal_cdf(h, -k, -r), normal_cdf(h),
                               rtol=0, atol=16 * EPS64)


@pytest.mark.parametrize("region", [r for r in BVN_REGIONS if r != "abs(rho)=1"])
def test_bivariate_cdf_each_region_derivatives(region):
    rho = BVN_REGIONS[region]
    n = len(rho)
    h = torch.tensor(REGION_H[1:1 + n], dtype=F64, requires_grad=True)
    k = torch.tensor(REGION_K[:n], dtype=F64, requires_grad=True)
    r = torch.tensor(rho, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(bivariate_normal_cdf, (h, k, r))
    assert torch.autograd.gradgradcheck(bivariate_normal_cdf, (h, k, r))


def _ulps_around(x: float) -> list[float]:
    return [float(np.nextafter(x, -np.inf)), x, float(np.nextafter(x, np.inf))]


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bivariate_cdf_brackets_the_high_correlation_switch(sign):
    pts = list(itertools.product([-3.0, -0.3, 1.1], [-1.0, 0.6],
                                 _ulps_around(sign * BVN_HIGH_CORRELATION)))
    h, k, r = (torch.tensor(c, dtype=F64) for c in zip(*pts, strict=True))
    got = bivariate_normal_cdf(h, k, r).tolist()
    bad = [(p, g) for p, g in zip(pts, got, strict=True)
           if abs(g - float(bvn_ref(*p))) > 8 * EPS64]
    assert not bad, bad


@pytest.mark.parametrize("rho, h, k", [(0.95, 16.0, -10.0), (-0.95, 16.0, 10.0),
                                       (0.99, 12.8, -12.5)])
def test_bivariate_cdf_brackets_the_tail_cutoff(rho, h, k):
    # h k (k flipped for rho < 0) crosses BVN_HK_CUTOFF = -160 as k moves by one ulp
    # (checked below), and the dropped term is 0 either side.
    vals, hks = [], []
    for kk in _ulps_around(k):
        hks.append(h * (kk if rho > 0 else -kk))
        got = bivariate_normal_cdf(*(torch.tensor(v, dtype=F64) for v in (h, kk, rho)))
        assert abs(got.item() - float(bvn_ref(h, kk, rho))) <= 8 * EPS64
        vals.append(got.item())
    assert min(hks) < BVN_HK_CUTOFF < max(hks) or BVN_HK_CUTOFF in hks
    # Two ulps of k move Phi2 by up to 2 ulp(k) phi(k)/Phi(k) ~ 2 k^2 eps relative
    # (the Mills ratio: phi(k)/Phi(k) ~ |k| for k << 0), plus the rounding of each value.
    assert max(vals) - min(vals) <= (2 * k * k + 4) * EPS64 * max(vals)
