"""momentkit.relu: accuracy against mpmath, limits, gradients, invariants, Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from momentkit._relu_kernels import CF_TERMS, mills_tail
from momentkit.errors import MomentInputError
from momentkit.relu import (
    relu_covariance,
    relu_covariance_zero_mean,
    relu_mean,
    relu_mean_std,
    relu_moments,
)
from momentkit.special import normal_cdf, normal_pdf
from tests.mp_reference import mp, relu_covariance_ref, relu_moments_ref

F32, F64 = torch.float32, torch.float64
# The accuracy contract, per dtype.
REL_TOL = {F64: 1e-12, F32: 1e-5}

# mean/std from -40 to 40, with the branch switches at |z| = 1 and 3 and a hair
# either side, and the point z = -5 where the naive float32 formula is worthless.
Z_GRID = sorted(
    set(np.linspace(-40, 40, 81).tolist())
    | {-5.0, -13.0, -37.5, -3.0000001, -3.0, -2.9999999, -1.0000001, -1.0, -0.9999999,
       2.9999999, 3.0, 3.0000001, -1e-9, 1e-9}
)
S_GRID = [1e-30, 1e-12, 1e-3, 1.0, 7.3, 1e4, 1e8]


def _accuracy_failures(dtype):
    """Every (z, s, quantity) where a result is off by more than the contract."""
    info = torch.finfo(dtype)
    pairs = [(z, s) for s in S_GRID for z in Z_GRID]
    mu = torch.tensor([z * s for z, s in pairs], dtype=dtype)
    s = torch.tensor([s for _, s in pairs], dtype=dtype)
    mean_std = relu_mean_std(mu, s)
    var_in = s * s
    mean_var = relu_mean(mu, var_in)
    m_mom, v_mom = relu_moments(mu, var_in)
    bad = []
    for i in range(len(pairs)):
        mu_i, s_i = float(mu[i]), float(s[i])
        s_v = math.sqrt(float(var_in[i]))  # the std the variance-taking functions see
        t_mean, _ = relu_moments_ref(mu_i, s_i)
        tv_mean, tv_var = relu_moments_ref(mu_i, s_v)
        for name, got, true in (
            ("relu_mean_std", mean_std[i], t_mean),
            ("relu_mean", mean_var[i], tv_mean),
            ("relu_moments.mean", m_mom[i], tv_mean),
            ("relu_moments.var", v_mom[i], tv_var),
        ):
            true = float(true)
            if not (info.tiny <= abs(true) <= info.max):
                continue  # the contract covers normal numbers of the dtype
            err = abs(float(got) - true) / abs(true)
            if err > REL_TOL[dtype]:
                bad.append((name, mu_i, s_i, float(got), true, err))
    return bad


@pytest.mark.parametrize("dtype", [F64, F32])
def test_accuracy_against_mpmath(dtype):
    bad = _accuracy_failures(dtype)
    assert not bad, f"{len(bad)} points over {REL_TOL[dtype]}:\n" + "\n".join(map(str, bad))


def test_naive_float32_formula_fails_where_the_stable_one_holds():
    # Documents why the stable form exists: at z = -5 the textbook float32 mean
    # (Phi through erf) is off by far more than the contract, the stable one is within.
    mu, s = torch.tensor([-5.0]), torch.tensor([1.0])
    z = mu / s
    naive = mu * 0.5 * (1 + torch.erf(z / math.sqrt(2))) + s * normal_pdf(z)
    true = float(relu_moments_ref(-5.0, 1.0)[0])
    assert abs(naive.item() - true) / true > 1e-3
    assert abs(relu_mean_std(mu, s).item() - true) / true < REL_TOL[F32]


def test_continued_fraction_truncation_is_negligible():
    t = torch.tensor([3.0, 3.5, 6.0, 12.0, 40.0], dtype=F64)
    g, w = mills_tail(t)
    for ti, gi, wi in zip(t.tolist(), g.tolist(), w.tolist(), strict=True):
        r = mp.ncdf(-ti) / mp.npdf(ti)
        g_ref = 1 - ti * r
        w_ref = r - ti * g_ref
        assert abs(gi - float(g_ref)) <= 4e-16 * float(g_ref), (ti, CF_TERMS)
        assert abs(wi - float(w_ref)) <= 4e-16 * float(w_ref), (ti, CF_TERMS)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zero_variance_is_exactly_relu(dtype):
    mu = torch.tensor([-3.0, -1e-20, 0.0, 1e-20, 2.5, 1e30], dtype=dtype)
    zero = torch.zeros_like(mu)
    assert torch.equal(relu_mean_std(mu, zero), torch.relu(mu))
    assert torch.equal(relu_mean(mu, zero), torch.relu(mu))
    m, v = relu_moments(mu, zero)
    assert torch.equal(m, torch.relu(mu)) and torch.equal(v, zero)


def test_zero_std_gradients_are_the_limits():
    mu = torch.tensor([-2.0, 0.0, 3.0], dtype=F64, requires_grad=True)
    s = torch.zeros(3, dtype=F64, requires_grad=True)
    relu_mean_std(mu, s).sum().backward()
    assert mu.grad.tolist() == [0.0, 0.5, 1.0]  # Phi(-inf), Phi(0), Phi(+inf)
    assert s.grad.tolist() == [0.0, pytest.approx(1 / math.sqrt(2 * math.pi)), 0.0]


def test_zero_variance_gradients_are_finite():
    mu = torch.tensor([-2.0, 0.0, 3.0], dtype=F64, requires_grad=True)
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    m, var = relu_moments(mu, v)
    (m.sum() + var.sum() + relu_mean(mu, v).sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(v.grad).all()


def _naive(mu, s):
    z = mu / s
    mean = mu * normal_cdf(z) + s * normal_pdf(z)
    second = (mu * mu + s * s) * normal_cdf(z) + mu * s * normal_pdf(z)
    return mean, second - mean * mean


def test_equal_to_naive_formula_on_benign_inputs_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    mu = (2 * torch.randn(200, generator=g, dtype=F64)).requires_grad_()
    s = (0.2 + torch.rand(200, generator=g, dtype=F64)).requires_grad_()
    m_ref, v_ref = _naive(mu, s)
    m, v = relu_moments(mu, s * s)
    torch.testing.assert_close(m, m_ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(v, v_ref, rtol=1e-11, atol=1e-14)
    grads = torch.autograd.grad((m + v).sum(), (mu, s))
    grads_ref = torch.autograd.grad((m_ref + v_ref).sum(), (mu, s))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(relu_mean_std(mu, s), m_ref, rtol=1e-13, atol=1e-15)


def _cov_inputs(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    cov = a @ a.T + 0.1 * torch.eye(n, dtype=F64)
    mean = torch.randn(n, generator=g, dtype=F64)
    return mean, cov


def sym_cov_fn(m, c):
    """relu_covariance of the symmetric part of c, so that checks may perturb c freely."""
    return relu_covariance(m, 0.5 * (c + c.T))


def sym_zero_fn(c):
    """relu_covariance_zero_mean of the symmetric part of c."""
    return relu_covariance_zero_mean(0.5 * (c + c.T))


def test_gradcheck_every_function():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    v = (0.1 + torch.rand(6, generator=g, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(relu_mean, (mu, v))
    assert torch.autograd.gradcheck(relu_mean_std, (mu, v))
    assert torch.autograd.gradcheck(relu_moments, (mu, v))
    mean, cov = _cov_inputs(2)
    assert torch.autograd.gradcheck(sym_cov_fn, (mean.requires_grad_(), cov.requires_grad_()))
    assert torch.autograd.gradcheck(sym_zero_fn, (cov,))


def test_covariance_example_nonzero_means():
    mean = torch.tensor([-2.0, -2.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=F64)
    exact = relu_covariance(mean, cov)[0, 1].item()
    ref = float(relu_covariance_ref(-2.0, -2.0, 1.0, 1.0, 0.8))
    assert exact == pytest.approx(ref, rel=1e-12)
    assert exact == pytest.approx(0.00291, abs=5e-6)
    assert relu_covariance_zero_mean(cov)[0, 1].item() == pytest.approx(0.2544, abs=1e-4)


@pytest.mark.parametrize(
    "m1, m2, s1, s2, r",
    [(0.3, -1.2, 0.7, 2.0, 0.35), (1.5, 2.5, 1.0, 0.5, -0.9), (-3.5, 0.5, 1.0, 1.0, 0.97),
     (-1.0, -1.0, 2.0, 2.0, -0.5), (4.0, 4.0, 1.0, 1.0, 0.999999)],
)
def test_covariance_against_high_precision_reference(m1, m2, s1, s2, r):
    mean = torch.tensor([m1, m2], dtype=F64)
    c = r * s1 * s2
    cov = torch.tensor([[s1 * s1, c], [c, s2 * s2]], dtype=F64)
    got = relu_covariance(mean, cov)[0, 1].item()
    ref = float(relu_covariance_ref(m1, m2, s1, s2, r))
    # The cross moment is exact up to the bivariate cdf (1e-16 absolute, scaled by
    # s1 s2 and by |ab + rho| <= ~20 here); the subtraction of the product of means
    # cancels at most a few digits in these cases.
    assert abs(got - ref) <= 1e-13 * s1 * s2 * (1 + abs(m1 * m2) / (s1 * s2))


# Standardized means from the far lower tail to the far linear regime (1e300 is clamped
# to 1e10 inside; the reference takes 60, beyond which every tail term is below 1e-780),
# with mixed signs, and correlations including the degenerate +-1 and a hair inside.
FAR_Z = [-1e300, -30.0, -2.0, 0.0, 0.3, 5.0, 1e8]
FAR_Z2 = [-1e8, -0.5, 1.0, 1e300]
FAR_RHO = [-1.0, -0.999999, -0.5, 0.0, 0.5, 0.999999, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("rho", FAR_RHO)
def test_covariance_far_means_against_high_precision_reference(rho):
    s1, s2 = 0.5, 3.0
    cov = torch.tensor([[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]], dtype=F64)
    for a in FAR_Z:
        for b in FAR_Z2:
            mean = torch.tensor([a * s1, b * s2], dtype=F64)
            got = relu_covariance(mean, cov)[0, 1].item()
            ref = float(relu_covariance_ref(*(max(min(z, 60.0), -60.0) * s for z, s in
                                              ((a, s1), (b, s2))), s1, s2, rho))
            # In units of s1 s2 the result is a sum of terms bounded by ~1 (rho times
            # probabilities, and lower-tail moments), each a few ulps accurate, plus the
            # bivariate cdf's 1e-16; measured worst 2.2e-16 (one ulp of 1).
            assert abs(got - ref) <= 1e-15 * s1 * s2, (a, b, rho, got, ref)


@pytest.mark.parametrize("z", [1e8, -1e8, 1e300, -1e300])
@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.5, 1.0])
def test_covariance_linear_regime_limits(z, rho):
    """Far from 0 each ReLU is the identity (mean/std -> +inf) or 0 (-> -inf), so the
    covariance is exactly ``rho s1 s2``, ``rho s1 s2 Phi(b)`` with the other standardized
    mean ``b`` (Stein's lemma), or 0; the old Rosenbaum form lost it to cancellation."""
    s1, s2, b = 2.0, 0.5, 0.7
    cov = torch.tensor([[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]], dtype=F64)
    both = relu_covariance(torch.tensor([z * s1, z * s2], dtype=F64), cov)[0, 1].item()
    mixed = relu_covariance(torch.tensor([z * s1, b * s2], dtype=F64), cov)[0, 1].item()
    if z > 0:
        assert abs(both - rho * s1 * s2) <= 4 * 2.0**-53 * s1 * s2
        expect = rho * s1 * s2 * normal_cdf(torch.tensor(b, dtype=F64)).item()
        assert abs(mixed - expect) <= 4 * 2.0**-53 * s1 * s2
    else:
        assert both == 0.0 and mixed == 0.0


def test_covariance_limits_unit_correlation_and_zero_mean():
    s = torch.tensor([1.3, 1.3], dtype=F64)
    mean = torch.tensor([0.4, 0.4], dtype=F64)
    cov = torch.outer(s, s)  # rho = 1: the two variables are equal
    out = relu_covariance(mean, cov)
    var = relu_moments(mean[:1], s[:1] ** 2)[1].item()
    assert out[0, 1].item() == pytest.approx(var, rel=1e-12)
    # rho = -1, zero means: ReLU(X) ReLU(-X) = 0, so the covariance is -E[ReLU(X)]^2.
    anti = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64)
    got = relu_covariance(torch.zeros(2, dtype=F64), anti)[0, 1].item()
    assert got == pytest.approx(-1 / (2 * math.pi), rel=1e-12)
    # zero means: exact formula and Bibi et al.'s formula agree.
    mean0, cov0 = _cov_inputs(3)
    torch.testing.assert_close(
        relu_covariance(torch.zeros_like(mean0), cov0), relu_covariance_zero_mean(cov0),
        rtol=1e-12, atol=1e-13,
    )


def test_covariance_degenerate_variable_and_unit_rho_gradients_finite():
    mean = torch.tensor([0.5, -0.2, 1.0], dtype=F64, requires_grad=True)
    cov = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64,
                       requires_grad=True)
    out = relu_covariance(mean, cov)
    assert out[2].abs().sum() == 0 and out[:, 2].abs().sum() == 0
    out.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(cov.grad).all()
    cz = cov.detach().clone().requires_grad_()
    relu_covariance_zero_mean(cz).sum().backward()
    assert torch.isfinite(cz.grad).all()


def test_covariance_against_monte_carlo():
    mean, cov = _cov_inputs(4, n=3)
    g = torch.Generator().manual_seed(5)
    n = 400_000
    x = mean + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    y = torch.relu(x)
    yc = y - y.mean(0)
    prods = yc.unsqueeze(-1) * yc.unsqueeze(-2)
    mc = prods.mean(0)
    stderr = prods.std(0) / math.sqrt(n)
    exact = relu_covariance(mean, cov)
    z = (exact - mc) / stderr
    # 5 standard errors: a false alarm has probability < 1e-5 per entry.
    assert z.abs().max() < 5, z


finite = st.floats(-50, 50, allow_nan=False)
spread = st.floats(0, 50, allow_nan=False)


@given(finite, spread)
def test_properties_of_the_moments(mu, s):
    m_t, s_t = torch.tensor(mu, dtype=F64), torch.tensor(s, dtype=F64)
    mean, var = relu_moments(m_t, s_t * s_t)
    tol = 1e-12 * (abs(mu) + s + 1e-300)
    assert var.item() >= 0
    assert mean.item() >= max(0.0, mu) - tol
    # E[ReLU(X)] - E[ReLU(-X)] = E[X] = mu
    mean_neg = relu_mean_std(-m_t, s_t)
    assert abs(relu_mean_std(m_t, s_t).item() - mean_neg.item() - mu) <= 4 * tol + 1e-300
    # positive homogeneity: moments of ReLU(cX) = (c mean, c^2 var)
    c = 3.7
    mean_c, var_c = relu_moments(c * m_t, (c * s_t) ** 2)
    assert mean_c.item() == pytest.approx(c * mean.item(), rel=1e-12, abs=1e-300)
    assert var_c.item() == pytest.approx(c * c * var.item(), rel=1e-10, abs=1e-300)
    for out in (mean, var):
        assert torch.isfinite(out).all()


@given(finite, st.floats(0, 1e6), st.sampled_from([F32, F64]))
def test_no_nan_or_inf_in_values_or_gradients(mu, s, dtype):
    m_t = torch.tensor(mu, dtype=dtype, requires_grad=True)
    s_t = torch.tensor(s, dtype=dtype, requires_grad=True)
    v_t = torch.tensor(s * s, dtype=dtype, requires_grad=True)
    out = relu_mean_std(m_t, s_t) + relu_mean(m_t, v_t) + sum(relu_moments(m_t, v_t))
    out.backward()
    for t in (out, m_t.grad, s_t.grad, v_t.grad):
        assert torch.isfinite(t).all()


@given(st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_covariance_is_positive_semidefinite(seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    cov = a @ a.T  # may be singular: rank-deficient covariances are legal
    mean = 3 * torch.randn(n, generator=g, dtype=F64)
    for out in (relu_covariance(mean, cov), relu_covariance_zero_mean(cov)):
        torch.testing.assert_close(out, out.T)
        eig = torch.linalg.eigvalsh(out)
        assert eig.min() >= -1e-12 * max(1.0, eig.abs().max().item())


def test_batched_and_float32():
    mean, cov = _cov_inputs(6)
    batch_mean = torch.stack([mean, -mean])
    batch_cov = torch.stack([cov, 2 * cov])
    out = relu_covariance(batch_mean, batch_cov)
    torch.testing.assert_close(out[1], relu_covariance(-mean, 2 * cov))
    out32 = relu_covariance(mean.float(), cov.float())
    assert out32.dtype == F32
    torch.testing.assert_close(out32, relu_covariance(mean, cov).float())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: relu_mean(torch.tensor([1.0]), torch.tensor([-1.0])), "var"),
        (lambda: relu_mean_std(torch.tensor([1.0]), torch.tensor([-0.1])), "std"),
        (lambda: relu_moments(torch.tensor([float("nan")]), torch.tensor([1.0])), "mean"),
        (lambda: relu_moments(torch.tensor([1.0]), torch.tensor([float("nan")])), "var"),
        (lambda: relu_mean(torch.ones(3), torch.ones(2)), "broadcast"),
        (lambda: relu_covariance(torch.zeros(2), torch.ones(2, 3)), "square"),
        (lambda: relu_covariance(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.1, 1.0]])),
         "symmetric"),
        (lambda: relu_covariance(torch.zeros(3), torch.eye(2)), "mean"),
        (lambda: relu_covariance_zero_mean(-torch.eye(2)), "negative"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(MomentInputError, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    mu = torch.linspace(-40, 40, 101, dtype=F64)
    s = torch.rand(101, dtype=F64, generator=torch.Generator().manual_seed(0))
    cpu = relu_moments(mu, s)
    gpu = relu_moments(mu.cuda(), s.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-12, atol=0)
