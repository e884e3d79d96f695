"""The float32 fast path of the ReLU moments (``ReluMomentsFast``) that ``network_moments``
uses for float32 activations: error bounds against the float64 path and mpmath, limits,
gradients, second derivatives, and the network it feeds.

Error bounds (``momentkit.relu``, "Float32 fast path"), with ``u = 2^-24``, ``t = |z|``,
``P = Phi(-t)``, ``phi = phi(t)``, ``q = h(-t) = phi - t P``:

* direct formulas (``t < FAST_TAIL_SWITCH + FAST_BLEND_WIDTH``), and every ``z > 0``:
  ``q = phi - t P`` in float32 errs by at most ``4 u (1 + t^2) (t P + phi)``: ``phi`` and
  ``P`` are each within a few ulps of their values at the rounded arguments, and the
  rounding of ``t`` (``1.5 u``) and of ``t^2`` (``u``) moves ``phi`` by ``t^2 u`` and
  ``P`` by ``t phi / P <= 1 + t^2`` times that, relatively. Then
  ``|dT| <= 2 u T + 4 u (1 + t^2) s (t P + phi)`` and
  ``|dVar| <= u Var + var u (1 + t^2) [3 P + 4 (t P + phi)(2 q + t) + 3 (P + q (q + t))]``.
* tail (``t`` beyond the blend, ``z < 0``): ``T = s phi g``, ``Var = var phi (w - phi g^2)``
  with ``g``, ``w`` from a continued fraction free of subtraction (a few ulps, truncation
  below ``u / 3``); the rounding of ``z`` (``u``) and of ``t^2`` (``u``) enter through
  ``phi``, ``t^2``-fold: ``|dT| <= 10 u (1 + t^2) T``, the same for ``Var``. ``t^2`` is
  the problem's own condition number there (``d log T / d log mu ~ t^2``).
* plus, where ``phi`` is subnormal in float32 (``t > 13.2``), an absolute
  ``16 * 2^-149 (s + 1)`` on the mean and ``16 * 2^-149 (var + 1)`` on the variance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from momentkit import MomentInputError, Normalize, network_moments
from momentkit._relu_kernels import (
    FAST_BLEND_WIDTH,
    FAST_CF_TERMS,
    FAST_TAIL_SWITCH,
    ReluMomentsFast,
    fast_tail_fraction,
    mills_tail,
)
from momentkit.network.gaussian_max import stein_weight
from momentkit.network.layers import relu_stats
from momentkit.relu import relu_moments
from tests.mp_reference import mp, relu_moments_ref
from tests.network.gradients import assert_finite_moments_and_gradients

F32, F64 = torch.float32, torch.float64
U = 2.0**-24
# Absolute floor where phi(t) is subnormal in float32: exp's subnormal results are within
# a few units of 2^-149 (up to 7 seen), 16 allowed.
TINY = 16 * 2.0**-149
EDGE = FAST_TAIL_SWITCH + FAST_BLEND_WIDTH


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (mu, var) over z in [-14, 14] (dense, and a hair either side of every branch
    point) and spreads from 1e-20 to 1e15."""
    z = torch.linspace(-14.0, 14.0, 20001, dtype=F64)
    marks = [FAST_TAIL_SWITCH, EDGE]
    extra = torch.tensor([sgn * (m + d) for m in marks for d in (-1e-6, 0.0, 1e-6)
                          for sgn in (-1, 1)], dtype=F64)
    z = torch.cat([z, extra])
    s = torch.tensor([1e-20, 1e-3, 1.0, 7.3, 1e15], dtype=F64)
    mu = (z.unsqueeze(0) * s.unsqueeze(1)).float().flatten()
    var = (s * s).unsqueeze(1).expand(-1, z.numel()).float().flatten()
    return mu, var


def _reference(mu: torch.Tensor, var: torch.Tensor):
    """float64 accurate path at the same float32 inputs, and the pieces of the bounds."""
    mu64, var64 = mu.double(), var.double()
    mean, v = relu_moments(mu64, var64)
    s = var64.sqrt()
    t = (mu64 / s).abs()
    p = 0.5 * torch.special.erfc(t / math.sqrt(2.0))
    phi = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    q = mean - mu64.clamp_min(0.0)  # s h(-t)
    return mean, v, s, t, p, phi, q / s


def _bounds(mu, var):
    mean, v, s, t, p, phi, q = _reference(mu, var)
    k = 1.0 + t * t
    direct = (t < EDGE) | (mu.double() > 0)
    tol_mean = torch.where(direct, 2 * U * mean + 4 * U * k * s * (t * p + phi), 10 * U * k * mean)
    cdf = torch.where(mu.double() > 0, 1.0 - p, p)
    tol_var = torch.where(
        direct,
        U * v + var.double() * U * k * (3 * p + 4 * (t * p + phi) * (2 * q + t)
                                        + 3 * (cdf + q * (q + t))),
        10 * U * k * v,
    )
    return mean, v, tol_mean + TINY * (s + 1), tol_var + TINY * (var.double() + 1)


def test_values_within_the_derived_bounds_of_the_float64_path():
    mu, var = _grid()
    mean, v, cdf = ReluMomentsFast.apply(mu, var)
    ref_mean, ref_var, tol_mean, tol_var = _bounds(mu, var)
    err_mean = (mean.double() - ref_mean).abs()
    err_var = (v.double() - ref_var).abs()
    assert bool((err_mean <= tol_mean).all()), float((err_mean / tol_mean).max())
    assert bool((err_var <= tol_var).all()), float((err_var / tol_var).max())
    # The Stein weight Phi(z) = P or 1 - P: erfc at the rounded argument, relative
    # error 3 u (1 + t^2) (t phi / P <= 1 + t^2 times the argument's rounding).
    z = mu.double() / var.double().sqrt()
    ref_cdf = 0.5 * torch.special.erfc(-z / math.sqrt(2.0))
    tol_cdf = 3 * U * (1 + z * z) * ref_cdf + TINY
    assert bool(((cdf.double() - ref_cdf).abs() <= tol_cdf).all())
    # Not vacuous: the bounds are within 1e-4 relative wherever the values are normal
    # numbers and t <= 3 (they grow like t^2 beyond, with the problem's condition).
    normal = (ref_var > 1e-30) & (z.abs() <= 3)
    assert float((tol_var / ref_var)[normal].max()) < 1e-4
    assert float((tol_mean / ref_mean)[normal].max()) < 3e-5


def test_against_mpmath_in_the_tail_and_at_the_switch():
    # The float64 path is itself exact to 1e-13; here the fast path meets the same bounds
    # against 30-digit references directly.
    zs = [-13.0, -9.0, -5.0, -EDGE - 1e-3, -EDGE, -FAST_TAIL_SWITCH, -1.0, 0.0, 2.0, 6.0]
    for s in (1e-3, 1.0, 37.0):
        mu = torch.tensor([z * s for z in zs], dtype=F32)
        var = torch.full_like(mu, s * s)
        mean, v, _ = ReluMomentsFast.apply(mu, var)
        _, _, tol_mean, tol_var = _bounds(mu, var)
        for i in range(len(zs)):
            ref_m, ref_v = relu_moments_ref(float(mu[i]), math.sqrt(float(var[i])))
            assert abs(mp.mpf(float(mean[i])) - ref_m) <= float(tol_mean[i]) * 1.001
            assert abs(mp.mpf(float(v[i])) - ref_v) <= float(tol_var[i]) * 1.001


def test_started_continued_fraction_truncation_is_below_a_third_of_an_ulp():
    t = torch.tensor([FAST_TAIL_SWITCH, 2.5, 4.0, 9.0, 40.0], dtype=F64)
    g60, w60 = mills_tail(t)  # the float64 path's 60-term fraction, exact to 1e-17

    def worst(terms: int) -> float:
        g, w = fast_tail_fraction(t, terms)
        return max(float(((g - g60) / g60).abs().max()), float(((w - w60) / w60).abs().max()))

    assert worst(FAST_CF_TERMS) < U / 3
    assert worst(FAST_CF_TERMS - 4) > U / 3  # and the count is not oversized by much


def _reference_autograd(mu, var):
    """(mean, var, Phi(z)) of the float64 accurate path, differentiable."""
    mean, v = relu_moments(mu, var)
    return mean, v, stein_weight(mu, var)


def test_gradients_within_bounds_of_the_float64_path():
    mu, var = _grid()
    keep = var > 0
    mu, var = mu[keep][::7].clone(), var[keep][::7].clone()
    torch.manual_seed(0)
    w = torch.randn(3, mu.numel(), dtype=F64)
    m32, v32 = mu.clone().requires_grad_(), var.clone().requires_grad_()
    outs = ReluMomentsFast.apply(m32, v32)
    sum(o.double() * wi for o, wi in zip(outs, w, strict=True)).sum().backward()
    m64, v64 = mu.double().requires_grad_(), var.double().requires_grad_()
    ref = _reference_autograd(m64, v64)
    # The terms of each derivative, to bound their float32 rounding one by one.
    with torch.no_grad():
        s = v64.sqrt()
        z = m64 / s
        cdf = ref[2]
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        cdf_neg = stein_weight(-m64, v64)
        t_mu = [w[0] * cdf, w[1] * 2 * ref[0] * cdf_neg, w[2] * phi / s]
        h = ref[0] / s
        t_var = [w[0] * phi / (2 * s), w[1] * cdf, w[1] * h * phi, w[2] * z * phi / (2 * v64)]
    sum(o * wi for o, wi in zip(ref, w, strict=True)).sum().backward()
    k = 1.0 + z.detach() ** 2
    # Each factor (Phi, phi, T, 1/s, h) within 10 u (1 + t^2) as the values are, so each
    # product of up to three within 32 u (1 + t^2); where phi is subnormal in float32 its
    # absolute error 2^-149 enters every term that holds it (T through s phi g).
    with torch.no_grad():
        phi_terms_mu = t_mu[2].abs() / phi + 2 * w[1].abs() * (s + 1)
        phi_terms_var = (t_var[0].abs() + t_var[2].abs() + t_var[3].abs()) / phi
    tol_mu = 32 * U * k * sum(t.abs() for t in t_mu) + TINY * (1 + phi_terms_mu)
    tol_var = 32 * U * k * sum(t.abs() for t in t_var) + TINY * (1 + phi_terms_var)
    err_mu = (m32.grad.double() - m64.grad).abs()
    assert bool((err_mu <= tol_mu).all()), float((err_mu / tol_mu).max())
    # The float64 path reports 0 for dVar/dvar where var = 0 only; here var > 0.
    # dPhi(z)/dvar = -z phi(z) / (2 var) passes float32's range where var is subnormal
    # (s = 1e-20 here): there the float32 result is an infinity of the right sign, never NaN.
    big = v64.grad.abs() > torch.finfo(F32).max
    assert bool(big.any())
    assert torch.equal(v32.grad[big], torch.sign(v64.grad[big]).float() * math.inf)
    err_var = (v32.grad.double() - v64.grad).abs()[~big]
    assert bool((err_var <= tol_var[~big]).all()), float((err_var / tol_var[~big]).max())


def test_zero_variance_gives_exact_limits_and_finite_gradients():
    mu = torch.tensor([-3.0, -1e-30, 0.0, 1e-38, 2.5, -1e30, 1e30], requires_grad=True)
    var = torch.zeros(7, requires_grad=True)
    mean, v, cdf = ReluMomentsFast.apply(mu, var)
    assert torch.equal(mean, mu.detach().clamp_min(0.0))
    assert torch.equal(v, torch.zeros(7))
    step = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0])
    assert torch.equal(cdf, step)
    g_mu, g_var = torch.autograd.grad(mean.sum() + v.sum() + cdf.sum(), (mu, var))
    # dT/dmu = step, dVar/dvar -> step (one-sided, var -> 0+; Phi(0) - phi(0)^2 at mu = 0),
    # the terms in 1/s are 0 (their limits, and 0 at mu = 0 where they are unbounded).
    assert torch.equal(g_mu, step)
    at_zero = 0.5 - 1.0 / (2.0 * math.pi)
    expect = torch.tensor([0.0, 0.0, at_zero, 1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(g_var, expect, rtol=4 * U, atol=0.0)


@pytest.mark.parametrize("scale", [1e-22, 1.0, 1e18])
def test_huge_mean_over_std_and_extreme_scales_stay_finite(scale):
    mu = torch.tensor([-3e38, -1e30, -20.0, 20.0, 1e30, 3e38]) * min(scale, 1.0)
    var = torch.full_like(mu, scale).requires_grad_()
    mu.requires_grad_()
    outs = ReluMomentsFast.apply(mu, var)
    for o in outs:
        assert torch.isfinite(o).all()
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (mu, var))
    for g in grads:
        assert torch.isfinite(g).all()
    # far below: 0 and 0; far above: mu and var (z = +-1e10 at most after clamping)
    ref_mean, ref_var = relu_moments(mu.detach().double(), var.detach().double())
    torch.testing.assert_close(outs[0].double(), ref_mean, rtol=2 * U, atol=TINY)
    torch.testing.assert_close(outs[1].double(), ref_var, rtol=200 * 401 * U, atol=TINY)


def test_nan_propagates_to_the_mean():
    mean, _, _ = ReluMomentsFast.apply(torch.tensor([float("nan"), 1.0]),
                                       torch.tensor([1.0, float("nan")]))
    assert torch.isnan(mean).all()


def test_second_derivatives_match_the_float64_path():
    # create_graph recomputes the derivatives with differentiable float32 operations.
    z = torch.tensor([-6.0, -3.0, -2.1, -1.0, -0.2, 0.0, 0.7, 2.0, 4.0])
    mu = (z * 0.3).requires_grad_()
    var = torch.full_like(z, 0.09).requires_grad_()
    torch.manual_seed(1)
    w = torch.randn(3, z.numel())

    def second(fn, a, b):
        outs = fn(a, b)
        total = sum((o * wi.to(o.dtype)).sum() for o, wi in zip(outs, w, strict=True))
        ga, gb = torch.autograd.grad(total, (a, b), create_graph=True)
        return torch.autograd.grad((ga * ga).sum() + (ga * gb).sum(), (a, b))

    got = second(ReluMomentsFast.apply, mu, var)
    m64 = mu.detach().double().requires_grad_()
    v64 = var.detach().double().requires_grad_()
    ref = second(_reference_autograd, m64, v64)
    # Products of up to six float32 factors, each within 10 u (1 + t^2) (t <= 6): 60 u
    # (1 + t^2) relative, against the largest entry (terms of both signs add up).
    for g, r in zip(got, ref, strict=True):
        tol = 60 * U * (1 + z.double() ** 2) * float(r.abs().max())
        assert bool(((g.double() - r).abs() <= tol).all())


def test_relu_stats_keeps_float64_on_the_accurate_path():
    mu = torch.linspace(-40, 5, 50, dtype=F64)
    var = torch.full_like(mu, 0.7)
    mean, v, g = relu_stats(mu, var)
    ref_mean, ref_var = relu_moments(mu, var)
    assert torch.equal(mean, ref_mean) and torch.equal(v, ref_var)
    assert torch.equal(g, stein_weight(mu, var))


def lenet_like() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        Normalize([0.1], [0.3]), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3),
    ).eval()


@pytest.mark.parametrize("mode", ["diagonal", "factor"])
def test_float32_network_agrees_with_float64(mode):
    model = lenet_like()
    x = torch.rand(3, 1, 8, 8)
    res = network_moments(model, x, 0.2, covariance=mode)
    res64 = network_moments(model.double(), x.double(), 0.2, covariance=mode)
    # float32 layers (sums of up to 96 products) and the moment functions, each within
    # a few hundred u of their values here (|z| small in this network): 1e-4 relative to
    # the output's scale, as for the paper's LeNet (tests/network/test_lenet_accuracy.py).
    scale_m = float(res64.mean.detach().abs().max())
    scale_v = float(res64.var.detach().abs().max())
    torch.testing.assert_close(res.mean.double(), res64.mean, rtol=1e-4, atol=1e-5 * scale_m)
    torch.testing.assert_close(res.var.double(), res64.var, rtol=1e-4, atol=1e-5 * scale_v)


@pytest.mark.parametrize("mode", ["diagonal", "factor"])
def test_float32_dead_units_zero_variance_and_huge_means_give_finite_gradients(mode):
    model = lenet_like()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([-5.0, 0.0, 3.0, 1e6]))  # dead, kink, linear, huge
    x = torch.rand(2, 1, 8, 8)
    sigma = torch.tensor([0.0, 0.5]).repeat_interleave(32).reshape(1, 8, 8)
    assert_finite_moments_and_gradients(model, x, sigma, mode)


def test_nonfinite_input_or_parameter_is_named():
    model = lenet_like()
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(MomentInputError, match="network_moments: x contains NaN"):
        network_moments(model, x, 0.1, covariance="diagonal")
    with torch.no_grad():
        model[4].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(MomentInputError, match="network_moments: .*'4.weight' contains inf"):
        network_moments(model, torch.rand(2, 1, 8, 8), 0.1, covariance="diagonal")
