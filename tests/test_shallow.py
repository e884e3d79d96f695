"""Theorem 1 and the output covariance of Affine-ReLU-Affine networks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momentkit.errors import MomentInputError
from momentkit.relu import relu_covariance
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean

F64 = torch.float64


def _net(seed, n=3, h=5, d=2):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(h, n, generator=g, dtype=F64)
    c1 = torch.randn(h, generator=g, dtype=F64)
    B = torch.randn(d, h, generator=g, dtype=F64)
    c2 = torch.randn(d, generator=g, dtype=F64)
    mu = torch.randn(n, generator=g, dtype=F64)
    L = torch.randn(n, n, generator=g, dtype=F64)
    cov = L @ L.T / n + 0.05 * torch.eye(n, dtype=F64)
    return A, c1, B, c2, mu, cov


def _monte_carlo(A, c1, B, c2, mu, cov, n_samples, seed):
    g = torch.Generator().manual_seed(seed)
    x = mu + torch.randn(n_samples, mu.numel(), generator=g, dtype=F64) @ torch.linalg.cholesky(
        cov
    ).T
    y = torch.relu(x @ A.T + c1) @ B.T + c2
    return y


@settings(max_examples=15)
@given(st.integers(0, 10_000), st.floats(0.05, 3.0))
def test_theorem1_mean_equals_monte_carlo(seed, scale):
    A, c1, B, c2, mu, cov = _net(seed)
    cov = cov * scale
    n = 100_000
    y = _monte_carlo(A, c1, B, c2, mu, cov, n, seed + 1)
    exact = affine_relu_affine_mean(mu, cov, A, c1, B, c2)
    stderr = y.std(0) / math.sqrt(n)
    # Tolerance derived from the standard error: 5 sigma, a false alarm < 1e-5 each.
    assert ((exact - y.mean(0)).abs() <= 5 * stderr).all()


def test_covariance_equals_monte_carlo():
    A, c1, B, c2, mu, cov = _net(7)
    n = 400_000
    y = _monte_carlo(A, c1, B, c2, mu, cov, n, 8)
    yc = y - y.mean(0)
    prods = yc.unsqueeze(-1) * yc.unsqueeze(-2)
    z = (affine_relu_affine_covariance(mu, cov, A, c1, B, c2) - prods.mean(0)) / (
        prods.std(0) / math.sqrt(n)
    )
    assert z.abs().max() < 5


def test_diagonal_and_full_forms_agree_and_batch():
    A, c1, B, c2, mu, cov = _net(3)
    var = torch.diagonal(cov)
    diag_cov = torch.diag(var)
    m_d = affine_relu_affine_mean(mu, var, A, c1, B, c2)
    m_f = affine_relu_affine_mean(mu, diag_cov, A, c1, B, c2)
    torch.testing.assert_close(m_d, m_f, rtol=1e-14, atol=1e-14)
    c_d = affine_relu_affine_covariance(mu, var, A, c1, B, c2)
    c_f = affine_relu_affine_covariance(mu, diag_cov, A, c1, B, c2)
    torch.testing.assert_close(c_d, c_f, rtol=1e-13, atol=1e-14)
    mus = torch.stack([mu, 2 * mu, -mu])
    batch = affine_relu_affine_mean(mus, cov.expand(3, -1, -1), A, c1, B, c2)
    torch.testing.assert_close(batch[1], affine_relu_affine_mean(2 * mu, cov, A, c1, B, c2))
    # with B = I the covariance is the ReLU covariance of the hidden layer
    eye = torch.eye(A.shape[0], dtype=F64)
    hidden = relu_covariance(A @ mu + c1, A @ cov @ A.T)
    torch.testing.assert_close(
        affine_relu_affine_covariance(mu, cov, A, c1, eye, None), hidden, rtol=1e-12,
        atol=1e-14,
    )


def test_gradcheck():
    A, c1, B, c2, mu, cov = _net(11, n=2, h=3, d=2)
    args = [t.clone().requires_grad_() for t in (mu, A, c1, B, c2)]

    def mean_fn(mu, A, c1, B, c2):
        return affine_relu_affine_mean(mu, cov, A, c1, B, c2)

    def cov_fn(mu, A, c1, B, c2):
        return affine_relu_affine_covariance(mu, cov, A, c1, B, c2)

    assert torch.autograd.gradcheck(mean_fn, args)
    assert torch.autograd.gradcheck(cov_fn, args)


@pytest.mark.parametrize("which", ["A", "c1", "B", "c2"])
def test_mismatched_shapes(which):
    A, c1, B, c2, mu, cov = _net(0)
    bad = dict(A=A, c1=c1, B=B, c2=c2)
    bad[which] = torch.ones(7, 7, dtype=F64) if which in "AB" else torch.ones(9, dtype=F64)
    with pytest.raises(MomentInputError, match=which):
        affine_relu_affine_mean(mu, cov, bad["A"], bad["c1"], bad["B"], bad["c2"])
