"""momentkit.network.gaussian_max: Clark's maximum against mpmath and Monte Carlo."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from momentkit.network.gaussian_max import clark_max, lower_relu_mean, stein_weight

mp.mp.dps = 40


def clark_ref(m1, v1, m2, v2, c12):
    """Clark's E[max] and E[max^2] - E[max]^2 at 40 digits (the naive difference is
    harmless at this precision)."""
    m1, v1, m2, v2, c12 = (mp.mpf(t) for t in (m1, v1, m2, v2, c12))
    theta2 = v1 + v2 - 2 * c12
    if theta2 <= 0:
        big = m1 if m1 >= m2 else m2
        return big, (v1 if m1 > m2 else v2 if m2 > m1 else (v1 + v2) / 2), None
    theta = mp.sqrt(theta2)
    a = (m1 - m2) / theta
    cdf, cdf_neg, pdf = mp.ncdf(a), mp.ncdf(-a), mp.npdf(a)
    mean = m1 * cdf + m2 * cdf_neg + theta * pdf
    second = (m1**2 + v1) * cdf + (m2**2 + v2) * cdf_neg + (m1 + m2) * theta * pdf
    return mean, second - mean * mean, cdf


CASES = [
    # (m1, v1, m2, v2, rho)
    (0.0, 1.0, 0.0, 1.0, 0.0),
    (1.0, 2.0, -0.5, 0.5, 0.3),
    (0.0, 1.0, 0.0, 1.0, -1.0),
    (3.0, 1.0, 0.0, 4.0, 0.9),
    (-2.0, 0.1, 5.0, 3.0, -0.5),
    (0.1, 1e-6, 0.0, 1e-6, 0.0),  # a = 70: the max is X1 to all digits
    (1e4, 1e-12, 1e4 - 1e-6, 1e-12, 0.2),  # tiny variances against huge means
    (1e4, 1e-12, 1e4, 2e-12, 0.5),  # and equal means
    (5.0, 1.0, 1.0, 1.0, 0.99),
    (0.0, 1.0, 8.0, 1e-3, 0.0),  # the dominant unit has the small variance
]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 2e-11), (torch.float32, 2e-5)])
def test_against_mpmath(dtype, rtol):
    # rtol: float64 inherits relu_mean's 1e-12 contract times the few terms added; float32
    # about 100 eps (the inputs are rounded to float32 first, and the reference sees the
    # rounded values).
    bad = []
    for m1, v1, m2, v2, rho in CASES:
        c = rho * math.sqrt(v1 * v2)
        args = [torch.tensor(t, dtype=dtype) for t in (m1, v1, m2, v2, c)]
        mean, var, w1, w2 = clark_max(*args)
        ref_mean, ref_var, ref_w = clark_ref(*(float(a) for a in args))
        err_m = abs(float(mean) - float(ref_mean)) / max(abs(float(ref_mean)), 1e-300)
        err_v = abs(float(var) - float(ref_var)) / max(float(ref_var), 1e-300)
        if err_m > rtol or err_v > 50 * rtol:
            bad.append((m1, v1, m2, v2, rho, err_m, err_v))
        if ref_w is not None:
            assert float(w1) == pytest.approx(float(ref_w), abs=4 * torch.finfo(dtype).eps)
            assert float(w1 + w2) == pytest.approx(1.0, abs=4 * torch.finfo(dtype).eps)
    # The variance rtol is 50x the mean's: the subtraction in Var loses up to a factor
    # log10(1 + a^2) of digits (module docstring).
    assert not bad, bad


def test_naive_variance_cancels_but_ours_does_not():
    m1, v1, m2, v2, c = 1e4, 1e-12, 1e4 - 1e-6, 1e-12, 0.0
    args = [torch.tensor(t, dtype=torch.float64) for t in (m1, v1, m2, v2, c)]
    mean, var, w1, w2 = clark_max(*args)
    theta = math.sqrt(v1 + v2)
    a = (m1 - m2) / theta
    cdf, pdf = 0.5 * math.erfc(-a / math.sqrt(2)), math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    naive_mean = m1 * cdf + m2 * (1 - cdf) + theta * pdf
    naive_second = (m1**2 + v1) * cdf + (m2**2 + v2) * (1 - cdf) + (m1 + m2) * theta * pdf
    ref = float(clark_ref(m1, v1, m2, v2, c)[1])
    assert abs(naive_second - naive_mean**2 - ref) / ref > 1.0  # every digit lost
    assert float(var) == pytest.approx(ref, rel=1e-9)


def test_against_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for m1, v1, m2, v2, rho in CASES[:5]:
        cov = torch.tensor([[v1, rho * math.sqrt(v1 * v2)], [rho * math.sqrt(v1 * v2), v2]])
        chol = torch.linalg.cholesky(cov.double() + 1e-12 * torch.eye(2, dtype=torch.float64))
        z = torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T
        x = z + torch.tensor([m1, m2], dtype=torch.float64)
        mx = x.max(1).values
        se_mean = mx.std() / math.sqrt(n)
        se_var = mx.var() * math.sqrt(2.0 / (n - 1)) * 2  # x2 for the heavy tails of max^2
        mean, var, *_ = clark_max(*(torch.tensor(t, dtype=torch.float64) for t in (
            m1, v1, m2, v2, float(cov[0, 1]))))
        # 5 standard errors: a false alarm has probability below 1e-6 per value.
        assert abs(float(mean - mx.mean())) < 5 * float(se_mean) + 1e-12
        assert abs(float(var - mx.var())) < 5 * float(se_var) + 1e-12


def test_ties_and_correlation_one_have_finite_gradients():
    m = torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    # X2 = X1 exactly (rho = 1, equal variances): theta = 0.
    mean, var, w1, w2 = clark_max(m, v, m.detach().clone().requires_grad_(), v, v)
    assert torch.equal(mean.detach(), m.detach())
    assert torch.allclose(var, v)
    assert torch.equal(w1.detach(), torch.full_like(w1, 0.5))
    (mean.sum() + var.sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()
    # rho = -1: theta = 2 s.
    mean, var, *_ = clark_max(m, v, -m, v, -v)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


def test_gradcheck():
    args = [
        torch.tensor(t, dtype=torch.float64, requires_grad=True)
        for t in ([0.3, -1.0, 2.0], [1.0, 0.5, 2.0], [0.1, 0.5, -1.0], [0.7, 2.0, 1.0],
                  [0.2, -0.3, 0.5])
    ]
    assert torch.autograd.gradcheck(lambda *a: clark_max(*a)[:2], args)


def test_float32_fast_path_gradients_match_float64():
    # Below float64 clark_max takes the float32 ReLU kernel (its own analytic backward);
    # its gradients are those of the float64 path to float32 accuracy. Derivatives of
    # the mean and variance are O(1) in these units, so the tolerance is absolute,
    # 1e-4 (a few hundred float32 ulps: the variance's derivative sums several terms).
    gen = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(2, 200, generator=gen, dtype=torch.float64) * 2.0
    v1, v2 = torch.rand(2, 200, generator=gen, dtype=torch.float64) * 2.0 + 0.01
    c = (torch.rand(200, generator=gen, dtype=torch.float64) * 1.8 - 0.9) * (v1 * v2).sqrt()
    grads = {}
    for dtype in (torch.float64, torch.float32):
        args = [t.detach().to(dtype).clone().requires_grad_() for t in (m1, v1, m2, v2, c)]
        mean, var, w1, w2 = clark_max(*args)
        (mean.sum() + 0.5 * var.sum() + 0.25 * w1.sum()).backward()
        grads[dtype] = [a.grad.double() for a in args]
        assert float((w1 + w2 - 1.0).detach().abs().max()) <= 4 * torch.finfo(dtype).eps
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        assert float((g32 - g64).abs().max()) < 1e-4


def test_float32_path_error_bound_on_random_cases():
    # The float32 maximum (direct tail formula with an exactly split exponent) against
    # the float64 path on the same rounded inputs, over ten decades of means and
    # variances and every correlation: the mean within 32 eps of the size of the
    # values it is made of, the variance within 64 eps of v1 w1 + v2 w2 (measured: 14
    # and 29 eps; the module docstring). Cases with t = |mu| / theta > 8 are included.
    gen = torch.Generator().manual_seed(1)
    n = 100_000

    def lognormal(scale):
        return torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * scale)

    m1 = torch.randn(n, generator=gen, dtype=torch.float64) * lognormal(3.0)
    m2 = m1 + torch.randn(n, generator=gen, dtype=torch.float64) * lognormal(3.0)
    v1, v2 = lognormal(4.0), lognormal(4.0)
    rho = torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0
    a32 = [t.float() for t in (m1, v1, m2, v2, rho * (v1 * v2).sqrt())]
    a64 = [t.double() for t in a32]
    (mean, var, w1, _), (ref_m, ref_v, ref_w1, ref_w2) = clark_max(*a32), clark_max(*a64)
    eps = torch.finfo(torch.float32).eps
    theta = (a64[1] + a64[3] - 2.0 * a64[4]).clamp_min(0.0).sqrt()
    assert float(((a64[0] - a64[2]).abs() / theta > 8.0).sum()) > 1000
    scale_m = a64[0].abs().maximum(a64[2].abs()) + theta
    assert float(((mean.double() - ref_m).abs() / scale_m).max()) < 32 * eps
    scale_v = a64[1] * ref_w1 + a64[3] * ref_w2
    assert float(((var.double() - ref_v).abs() / scale_v).max()) < 64 * eps
    assert float((w1.double() - ref_w1).abs().max()) < 32 * eps


def test_float32_ties_have_finite_gradients():
    m = torch.tensor([0.0, 1.0, 0.0, 2.0], requires_grad=True)
    v = torch.tensor([1.0, 1.0, 0.0, 0.0], requires_grad=True)
    mean, var, w1, w2 = clark_max(m, v, m.detach().clone(), v.detach().clone(), v.detach())
    assert torch.equal(mean.detach(), m.detach())
    assert torch.equal(w1.detach(), torch.full_like(w1, 0.5))
    (mean.sum() + var.sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()


def test_stein_weight_limits():
    m = torch.tensor([1.0, -1.0, 0.0, 0.5])
    v = torch.tensor([0.0, 0.0, 0.0, 0.25])
    w = stein_weight(m, v)
    assert w.tolist()[:3] == [1.0, 0.0, 0.5]
    assert float(w[3]) == pytest.approx(0.5 * math.erfc(-1 / math.sqrt(2)), rel=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 5e-5)])
def test_lower_relu_mean_matches_the_core(dtype, rtol):
    # Against momentkit.relu.relu_mean (continued fraction, 1e-12 contract), over x/s in
    # [-37, 0] and s from 1e-20 to 1e8 (float32: from 1e-3, since variances below
    # sqrt(tiny) = 1e-19 count as zero there); rtol: its contract plus our 3e-13
    # (float64), our 4 eps (1 + t^2) <= 4e-5 where T is a normal float32 number.
    from momentkit.relu import relu_mean

    z = -torch.cat([torch.linspace(0, 5, 51), torch.linspace(5, 37, 33)]).double()
    s = torch.tensor([1e-20, 1e-3, 1.0, 1e8], dtype=torch.float64)
    if dtype == torch.float32:
        s = s[1:]
    x = (z[:, None] * s[None, :]).to(dtype)
    var = (s * s).expand_as(x).to(dtype)
    ref = relu_mean(x.double(), var.double())
    ours = lower_relu_mean(x, var).double()
    ok = ref > s * torch.finfo(dtype).tiny / torch.finfo(dtype).eps
    rel = ((ours - ref).abs() / ref.clamp_min(1e-300))[ok]
    assert float(rel.max()) < rtol


def test_lower_relu_mean_float32_error_bound():
    # Evaluated in float32: relative error at most 4 eps (1 + t^2), t = -x / s, against
    # the float64 evaluation of the same (rounded) inputs, wherever T is a normal float32
    # number away from underflow (> tiny / eps; phi(t) is normal for t < 13.2); the
    # float64 reference's own error is 1e-16 (1 + t^2).
    t = torch.linspace(0.0, 13.0, 20001, dtype=torch.float64)
    for s in (1e-6, 1.0, 3e4):
        x = (-t * s).float()
        var = torch.full_like(x, s * s)
        ours = lower_relu_mean(x, var).double()
        ref = lower_relu_mean(x.double(), var.double())
        tt = -x.double() / var.double().sqrt()
        f32 = torch.finfo(torch.float32)
        bound = 4 * f32.eps * (1 + tt * tt)
        ok = ref > f32.tiny / f32.eps
        assert int(ok.sum()) > 15000
        assert bool(((ours - ref).abs() <= bound * ref)[ok].all())


def test_lower_relu_mean_gradients():
    x = torch.tensor([-0.5, -3.0, -10.0, 0.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, 0.5, 2.0, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lower_relu_mean, (x, v))
    x0 = torch.tensor([0.0, -1.0], dtype=torch.float64, requires_grad=True)
    v0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lower_relu_mean(x0, v0).sum().backward()
    assert x0.grad.tolist() == [0.5, 0.0] and torch.isfinite(v0.grad).all()
