"""Second derivatives (Hessians, gradient penalties) of every public core function of
momentkit.special and momentkit.relu: gradgradcheck in float64 at benign points and
either side of each branch switch, exact values against closed forms, and the refusal
where no second derivative exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from momentkit._relu_kernels import RECOMPUTE_Z_FLOAT64, TAIL_SWITCH
from momentkit.relu import (
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)
from momentkit.special import (
    BVN_HIGH_CORRELATION,
    bivariate_normal_cdf,
    log_normal_cdf,
    mills_ratio,
    normal_cdf,
    normal_pdf,
)
from tests.mp_reference import mp
from tests.test_relu import _cov_inputs, sym_cov_fn, sym_zero_fn

F64 = torch.float64


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_hessian_through_a_scaled_input_example():
    # d/da of d/dmu T(a mu, 1) = d/da [a Phi(a mu)] = Phi(a mu) + a mu phi(a mu).
    a = torch.tensor(1.5, dtype=F64, requires_grad=True)
    mu = torch.tensor([0.3], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(
        relu_mean(a * mu, torch.tensor([1.0])).sum(), mu, create_graph=True
    )
    (got,) = torch.autograd.grad(g.sum(), a)
    x = 1.5 * 0.3
    exact = _cdf(x) + x * _phi(x)
    assert exact == pytest.approx(0.8359, abs=1e-4)  # the value from the report
    # Phi and phi to a few ulps each, a handful of roundings: 16 eps.
    assert abs(got.item() - exact) <= 16 * np.finfo(np.float64).eps


# z = mu / s from the far lower tail through each branch switch (at the switch and a
# hair either side) to the upper tail; gradgradcheck's finite differences (step 1e-6)
# straddle the switches, so these also show the forward pass continuous across them.
_Z_POINTS = [-30.0, -8.0, RECOMPUTE_Z_FLOAT64 - 1e-9, RECOMPUTE_Z_FLOAT64,
             RECOMPUTE_Z_FLOAT64 + 1e-9, -2.0, -0.4, 0.0, 1.3, TAIL_SWITCH - 1e-9,
             TAIL_SWITCH, TAIL_SWITCH + 1e-9, 6.0]


def _mu_s():
    s = torch.tensor([0.7, 1.0, 2.5] * 5, dtype=F64)[: len(_Z_POINTS)]
    mu = torch.tensor(_Z_POINTS, dtype=F64) * s
    return mu.requires_grad_(), s.requires_grad_()


@pytest.mark.parametrize("fn", [relu_mean, relu_mean_std, relu_moments])
def test_gradgradcheck_relu_moments(fn):
    mu, s = _mu_s()
    spread = (s * s).detach().requires_grad_() if fn is not relu_mean_std else s
    assert torch.autograd.gradgradcheck(fn, (mu, spread))


@pytest.mark.parametrize("fn", [normal_pdf, normal_cdf, log_normal_cdf, mills_ratio])
def test_gradgradcheck_univariate(fn):
    x = torch.tensor([-12.0, -3.0, -0.5, 0.0, 0.8, 4.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gradgradcheck_bivariate_cdf_each_side_of_the_switch():
    c = BVN_HIGH_CORRELATION
    rho = torch.tensor([0.0, 0.2, -0.6, c - 1e-4, c + 1e-4, -c - 1e-4, -c + 1e-4, 0.99],
                       dtype=F64, requires_grad=True)
    h = torch.tensor([-1.3, 0.2, 2.0, 0.5, -0.4, 1.1, 0.0, -2.2], dtype=F64, requires_grad=True)
    k = torch.tensor([0.4, -0.7, 1.1, 0.5, 0.9, -1.5, 0.3, -1.9], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(bivariate_normal_cdf, (h, k, rho))


@pytest.mark.parametrize("seed", [0, 1])
def test_gradgradcheck_covariances(seed):
    mean, cov = _cov_inputs(seed, n=3)
    assert torch.autograd.gradgradcheck(sym_cov_fn,
                                        (mean.requires_grad_(), cov.requires_grad_()))
    assert torch.autograd.gradgradcheck(sym_zero_fn, (cov,))


@pytest.mark.parametrize("z", [-30.0, -5.0, -3.0, -1.0, 0.0, 2.0, 8.0])
def test_relu_mean_std_hessian_is_exact(z):
    # T(mu, s): d2T/dmu2 = phi(z)/s, d2T/dmu ds = -z phi(z)/s, d2T/ds2 = z^2 phi(z)/s,
    # relative to mpmath even in the far tail where phi(z) ~ 1e-196.
    s0 = 1.7
    mu = torch.tensor(z * s0, dtype=F64, requires_grad=True)
    s = torch.tensor(s0, dtype=F64, requires_grad=True)
    g_mu, g_s = torch.autograd.grad(relu_mean_std(mu, s), (mu, s), create_graph=True)
    h_mm, h_ms = torch.autograd.grad(g_mu, (mu, s), retain_graph=True)
    h_sm, h_ss = torch.autograd.grad(g_s, (mu, s))
    zz = mp.mpf(z * s0) / s0
    base = mp.npdf(zz) / s0
    for got, ref in ((h_mm, base), (h_ms, -zz * base), (h_sm, -zz * base),
                     (h_ss, zz * zz * base)):
        ref = float(ref)
        # phi(z) through exp(-z^2/2): the rounding of z costs z^2 ulps; 16 eps otherwise.
        assert abs(got.item() - ref) <= 16 * (1 + z * z) * 2.2e-16 * abs(ref) + 1e-300


def test_relu_mean_hessian_against_finite_differences_of_the_gradient():
    g = torch.Generator().manual_seed(3)
    mu0 = 2 * torch.randn(5, generator=g, dtype=F64)
    var0 = 0.2 + torch.rand(5, generator=g, dtype=F64)
    x0 = torch.cat([mu0, var0])

    def grad_at(x):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(relu_mean(x[:5], x[5:]).sum(), x)
        return gx

    def f(x):
        return relu_mean(x[:5], x[5:]).sum()

    hess = torch.autograd.functional.hessian(f, x0)
    step = 1e-5
    fd = torch.stack([(grad_at(x0 + step * e) - grad_at(x0 - step * e)) / (2 * step)
                      for e in torch.eye(10, dtype=F64)])
    # Central differences: truncation step^2 / 6 * |third derivative| (below ~1e3 here
    # for var >= 0.2) ~ 2e-8, rounding eps / step ~ 2e-11.
    torch.testing.assert_close(hess, fd, rtol=0, atol=3e-8)
    torch.testing.assert_close(hess, hess.T, rtol=0, atol=1e-15)


def test_second_derivatives_finite_at_zero_variance():
    mu = torch.tensor([-2.0, 0.0, 3.0], dtype=F64, requires_grad=True)
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    for fn in (relu_mean, relu_mean_std, lambda m, x: sum(relu_moments(m, x))):
        g_mu, g_v = torch.autograd.grad(fn(mu, v).sum(), (mu, v), create_graph=True)
        second = torch.autograd.grad(g_mu.sum() + g_v.sum(), (mu, v))
        for t in second:
            assert torch.isfinite(t).all()
        # For mu != 0, T(mu, s) = ReLU(mu) + O(exp(-mu^2 / 2 s^2)): every derivative
        # of order two vanishes in the limit.
        if fn is not relu_mean_std:  # (in s, d2T/ds2 -> 0 too, but through z^2 phi(z)/s)
            assert second[0][[0, 2]].tolist() == [0.0, 0.0]


def test_bivariate_cdf_second_derivatives_at_unit_correlation_are_the_limits():
    # rho = 1, k < h: Phi2 = Phi(k), so d2/dk2 = -k phi(k) and the others vanish.
    h = torch.tensor(0.3, dtype=F64, requires_grad=True)
    k = torch.tensor(-0.2, dtype=F64, requires_grad=True)
    r = torch.tensor(1.0, dtype=F64, requires_grad=True)
    g_h, g_k, g_r = torch.autograd.grad(bivariate_normal_cdf(h, k, r), (h, k, r),
                                        create_graph=True)
    assert g_k.item() == pytest.approx(_phi(-0.2), rel=1e-15)
    d2 = torch.autograd.grad(g_k, (h, k, r))
    assert d2[0].item() == 0 and d2[2].item() == 0
    assert d2[1].item() == pytest.approx(0.2 * _phi(-0.2), rel=1e-14)


def test_covariance_gradient_at_unit_correlation_is_prices_theorem():
    # d Cov(ReLU X0, ReLU X1) / d cov_01 = P(X0 > 0, X1 > 0) = Phi2(a, b; rho), also at
    # rho = +-1 (the one-sided derivative from inside the cone).
    for rho, mean in ((1.0, [0.5, -0.2]), (-1.0, [0.5, 0.3]), (0.4, [0.5, -0.2])):
        mean_t = torch.tensor(mean, dtype=F64)
        cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(relu_covariance(mean_t, cov)[0, 1], cov)
        ref = bivariate_normal_cdf(mean_t[0], mean_t[1], torch.tensor(rho, dtype=F64))
        assert g[0, 1].item() == pytest.approx(ref.item(), rel=1e-13, abs=1e-15)


def test_no_second_derivative_at_a_kink_raises():
    one = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(relu_covariance_zero_mean(one).sum(), one, create_graph=True)
    with pytest.raises(RuntimeError, match="relu_covariance_zero_mean"):
        torch.autograd.grad(g[0, 1], one)
    (g,) = torch.autograd.grad(relu_covariance(torch.zeros(2, dtype=F64), one).sum(), one,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="bivariate_normal_cdf.*relu_covariance"):
        torch.autograd.grad(g[0, 1], one)
    # Means with a != b at rho = 1: no kink is met, the second derivatives are the limits
    # (d2/dcov_11 of Phi2(a, b; 1) = Phi(b): phi(b) db/dcov_11 = -phi(b) mu_1 / 2).
    mean = torch.tensor([0.3, -0.5], dtype=F64)
    (g,) = torch.autograd.grad(relu_covariance(mean, one).sum(), one, create_graph=True)
    (h,) = torch.autograd.grad(g[0, 1], one)
    assert h[1, 1].item() == pytest.approx(_phi(-0.5) * 0.25, rel=1e-13)
    assert h[0, 1].item() == 0.0


@given(st.floats(-50, 50, allow_nan=False),
       st.one_of(st.just(0.0), st.floats(1e-6, 1e6)),
       st.sampled_from([torch.float32, F64]))
def test_second_derivatives_never_nan(mu, s, dtype):
    # Second derivatives are bounded by phi(0) / s^3 in var (about 4e17 at s = 1e-6),
    # finite in both dtypes over this range; s = 0 gives the limits.
    m_t = torch.tensor(mu, dtype=dtype, requires_grad=True)
    s_t = torch.tensor(s, dtype=dtype, requires_grad=True)
    v_t = torch.tensor(s * s, dtype=dtype, requires_grad=True)
    out = relu_mean_std(m_t, s_t) + relu_mean(m_t, v_t) + sum(relu_moments(m_t, v_t))
    grads = torch.autograd.grad(out, (m_t, s_t, v_t), create_graph=True)
    second = torch.autograd.grad(sum(grads), (m_t, s_t, v_t))
    for t in (*grads, *second):
        assert torch.isfinite(t).all()


def test_covariance_second_derivatives_finite_with_a_constant_variable():
    # A zero-variance variable is constant: its row and column are 0 at every order.
    mean = torch.tensor([0.5, -0.2, 1.0], dtype=F64, requires_grad=True)
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64,
                       requires_grad=True)
    for fn in (lambda m, c: relu_covariance(m, c), lambda m, c: relu_covariance_zero_mean(c)):
        g = torch.autograd.grad(fn(mean, cov).sum(), (mean, cov), create_graph=True,
                                allow_unused=True)
        g = [t for t in g if t is not None]
        second = torch.autograd.grad(sum(t.sum() for t in g), (mean, cov), allow_unused=True)
        for t in second:
            if t is not None:
                assert torch.isfinite(t).all()
                assert t[..., 2].abs().sum() == 0
