"""Monte Carlo references against closed forms, with tolerances of k standard errors.

Every comparison uses a fixed seed, so the tests are deterministic. The tolerance
``K = 5`` standard errors: a correct estimator exceeds it with probability
5.7e-7 per compared value, so over the few hundred values compared here a false
failure has probability below 1e-3 for any seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from momentkit.errors import MomentInputError
from momentkit.references.montecarlo import (
    monte_carlo_affine_relu_affine,
    monte_carlo_moments,
)
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean

K = 5.0
F64 = torch.float64


def _network(n: int, p: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=F64) / math.sqrt(n)
    c1 = torch.randn(p, generator=g, dtype=F64)
    B = torch.randn(d, p, generator=g, dtype=F64) / math.sqrt(p)
    c2 = torch.randn(d, generator=g, dtype=F64)
    return A, c1, B, c2


def _assert_within(estimate, stderr, exact, what: str) -> None:
    z = (estimate - exact) / stderr
    bad = z.abs() > K
    assert not bool(bad.any()), f"{what}: |z| > {K} at {bad.nonzero().tolist()}; z = {z[bad]}"


def test_one_relu_matches_closed_form_moments():
    """E[ReLU(X)], Var[ReLU(X)] for X ~ N(mu, s^2): the scipy closed form (Eq. 1)."""
    mus = np.array([-2.0, -0.3, 0.0, 0.7, 3.0])
    s = 1.5
    res = monte_carlo_affine_relu_affine(
        mus[:, None],
        np.full((5, 1), s * s),
        np.eye(1),
        np.zeros(1),
        np.eye(1),
        np.zeros(1),
        n_samples=200_000,
        seed=11,
    )
    z = mus / s
    mean = mus * norm.cdf(z) + s * norm.pdf(z)
    second = (mus**2 + s * s) * norm.cdf(z) + mus * s * norm.pdf(z)
    _assert_within(res.mean[:, 0], res.stderr[:, 0], torch.from_numpy(mean), "mean")
    _assert_within(
        res.cov[:, 0, 0], res.cov_stderr[:, 0, 0], torch.from_numpy(second - mean**2), "var"
    )


@pytest.mark.parametrize("full", [False, True])
def test_matches_theorem_1_and_analytic_covariance(full: bool):
    n, p, d = 6, 12, 4
    A, c1, B, c2 = _network(n, p, d, seed=1)
    g = torch.Generator().manual_seed(2)
    mean_x = torch.randn(3, n, generator=g, dtype=F64)
    if full:
        M = torch.randn(3, n, n, generator=g, dtype=F64)
        cov_x = M @ M.transpose(-1, -2) / n
    else:
        cov_x = torch.rand(3, n, generator=g, dtype=F64) * 2.0
    res = monte_carlo_affine_relu_affine(mean_x, cov_x, A, c1, B, c2, 100_000, seed=3)
    assert res.mean.shape == (3, d) and res.cov.shape == (3, d, d) and res.n_samples == 100_000
    _assert_within(
        res.mean, res.stderr, affine_relu_affine_mean(mean_x, cov_x, A, c1, B, c2), "mean"
    )
    exact_cov = affine_relu_affine_covariance(mean_x, cov_x, A, c1, B, c2)
    _assert_within(res.cov, res.cov_stderr, exact_cov, "cov")


def test_singular_covariance_is_legal():
    """Correlation +1: x2 = x1, so ReLU(x1) - ReLU(x2) is identically 0."""
    cov = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    res = monte_carlo_affine_relu_affine(
        torch.tensor([0.2, 0.2], dtype=F64),
        cov,
        torch.eye(2, dtype=F64),
        torch.zeros(2, dtype=F64),
        torch.tensor([[1.0, -1.0]], dtype=F64),
        torch.zeros(1, dtype=F64),
        10_000,
        seed=0,
    )
    # x = mean + L eps with L L^T = cov from an eigendecomposition: both rows of L
    # agree to rounding, so the difference is rounding noise.
    assert abs(float(res.mean)) < 1e-12 and float(res.cov) < 1e-24


def test_stderr_matches_gaussian_theory():
    """In the linear regime (large positive pre-activations) the output is Gaussian:
    Var[mean estimate] = c_ii / N and Var[cov estimate]_ij = (c_ii c_jj + c_ij^2) / N.

    The estimated standard errors carry their own sampling error: the fourth-moment
    estimate has relative standard deviation about sqrt(96) / 3 / sqrt(N) = 1% at
    N = 1e5, so 5% relative tolerance on the squared errors is 5 of those.
    """
    n, N = 3, 100_000
    A = torch.eye(n, dtype=F64)
    B = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=F64)
    cov_x = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    res = monte_carlo_affine_relu_affine(
        torch.full((n,), 50.0, dtype=F64),
        cov_x,
        A,
        torch.zeros(n, dtype=F64),
        B,
        torch.zeros(2, dtype=F64),
        N,
        seed=5,
    )
    c = B @ torch.diag(cov_x) @ B.T
    expected_cov_var = (torch.outer(c.diagonal(), c.diagonal()) + c * c) / N
    assert torch.allclose(res.stderr**2, c.diagonal() / N, rtol=0.05, atol=0)
    assert torch.allclose(res.cov_stderr**2, expected_cov_var, rtol=0.05, atol=0)


def test_reproducible_for_a_seed_on_any_thread_count():
    A, c1, B, c2 = _network(5, 9, 3, seed=4)
    args = (torch.zeros(2, 5, dtype=F64), torch.ones(5, dtype=F64), A, c1, B, c2, 5_000)
    first = monte_carlo_affine_relu_affine(*args, seed=7, n_threads=2)
    again = monte_carlo_affine_relu_affine(*args, seed=7, n_threads=2)
    one_thread = monte_carlo_affine_relu_affine(*args, seed=7, n_threads=1)
    other = monte_carlo_affine_relu_affine(*args, seed=8, n_threads=2)
    for res in (again, one_thread):
        assert torch.equal(res.mean, first.mean) and torch.equal(res.cov, first.cov)
    assert not torch.equal(other.mean, first.mean)


def test_blocking_does_not_change_the_samples():
    """Each stream's normals are a fixed sequence: another block size (and a sample
    count that is not a multiple of it or of the streams) only regroups the sums, so
    results agree to rounding (a few eps relative to the second moments)."""
    A, c1, B, c2 = _network(3, 5, 2, seed=6)
    args = (torch.ones(3, dtype=F64), torch.full((3,), 0.5, dtype=F64), A, c1, B, c2, 9_999)
    a = monte_carlo_affine_relu_affine(*args, seed=1, block=7, n_streams=13)
    b = monte_carlo_affine_relu_affine(*args, seed=1, block=256, n_streams=13)
    scale = float(a.cov.abs().max() + a.mean.abs().max() ** 2)
    assert torch.allclose(a.mean, b.mean, rtol=0, atol=64 * 2.2e-16 * scale)
    assert torch.allclose(a.cov, b.cov, rtol=0, atol=64 * 2.2e-16 * scale)


def test_mean_only_mode_skips_covariance():
    A, c1, B, c2 = _network(4, 6, 3, seed=8)
    res = monte_carlo_affine_relu_affine(
        torch.zeros(4, dtype=F64),
        torch.ones(4, dtype=F64),
        A,
        c1,
        B,
        c2,
        50_000,
        seed=2,
        compute_cov=False,
    )
    assert res.cov is None and res.cov_stderr is None
    exact = affine_relu_affine_mean(
        torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), A, c1, B, c2
    )
    _assert_within(res.mean, res.stderr, exact, "mean")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"cov_x": -np.ones(3)}, "cov_x"),
        ({"cov_x": np.ones(4)}, "cov_x"),
        ({"cov_x": np.diag([1.0, -1.0, 1.0])}, "cov_x"),
        ({"cov_x": np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])}, "cov_x"),
        ({"A": np.ones((5, 2))}, "A"),
        ({"c1": np.ones(4)}, "c1"),
        ({"B": np.ones((2, 4))}, "B"),
        ({"c2": np.ones(3)}, "c2"),
        ({"n_samples": 1}, "n_samples"),
        ({"seed": -1}, "seed"),
        ({"mean_x": np.array([0.0, np.nan, 0.0])}, "mean_x"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {
        "mean_x": np.zeros(3),
        "cov_x": np.ones(3),
        "A": np.ones((5, 3)),
        "c1": np.zeros(5),
        "B": np.ones((2, 5)),
        "c2": np.zeros(2),
        "n_samples": 10,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(MomentInputError, match=name):
        monte_carlo_affine_relu_affine(**args)


def _ara_module(n: int, p: int, d: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n, p), nn.ReLU(), nn.Linear(p, d)).double()


def test_module_estimator_matches_theorem_1_with_covariance():
    net = _ara_module(5, 10, 3)
    W1, b1, W2, b2 = (t.detach() for t in net.parameters())
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    var = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.0], dtype=F64)
    res = monte_carlo_moments(net, x, var, 60_000, seed=3, batch_size=5_000, compute_cov=True)
    assert res.mean.shape == (4, 3) and res.cov.shape == (4, 3, 3)
    cov_x = var.expand_as(x)
    _assert_within(res.mean, res.stderr, affine_relu_affine_mean(x, cov_x, W1, b1, W2, b2), "mean")
    _assert_within(
        res.cov, res.cov_stderr, affine_relu_affine_covariance(x, cov_x, W1, b1, W2, b2), "cov"
    )


def test_module_estimator_keeps_output_shape_and_is_reproducible():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    x = torch.rand(2, 1, 4, 4)
    a = monte_carlo_moments(conv, x, 0.01, 300, seed=5, batch_size=64)
    b = monte_carlo_moments(conv, x, 0.01, 300, seed=5, batch_size=64)
    assert a.mean.shape == (2, 2, 4, 4) and a.stderr.shape == (2, 2, 4, 4) and a.cov is None
    assert torch.equal(a.mean, b.mean) and torch.equal(a.stderr, b.stderr)
    c = monte_carlo_moments(conv, x, 0.01, 300, seed=6, batch_size=64)
    assert not torch.equal(a.mean, c.mean)


def test_module_estimator_bad_input():
    net = _ara_module(3, 4, 2)
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(MomentInputError, match="var"):
        monte_carlo_moments(net, x, -1.0, 10)
    with pytest.raises(MomentInputError, match="var"):
        monte_carlo_moments(net, x, torch.ones(4, dtype=F64), 10)
    with pytest.raises(MomentInputError, match="n_samples"):
        monte_carlo_moments(net, x, 1.0, 1)
    with pytest.raises(MomentInputError, match="mean"):
        monte_carlo_moments(net, torch.zeros(2, 3, dtype=torch.int64), 1.0, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_module_estimator_on_cuda_matches_theorem_1():
    net = _ara_module(4, 8, 2).cuda()
    W1, b1, W2, b2 = (t.detach() for t in net.parameters())
    x = torch.randn(2, 4, dtype=F64, device="cuda")
    res = monte_carlo_moments(net, x, 0.5, 50_000, seed=1)
    exact = affine_relu_affine_mean(x, torch.full_like(x, 0.5), W1, b1, W2, b2)
    assert res.mean.device.type == "cuda"
    _assert_within(res.mean, res.stderr, exact, "mean")


def test_antithetic_pairs_are_unbiased_and_reduce_the_error():
    """sigma = 1 with pre-activations near 0: kinks are crossed by most samples, so the
    pair-based standard error is reliable and the 5-standard-error test applies."""
    net = _ara_module(4, 6, 2)
    W1, b1, W2, b2 = (t.detach() for t in net.parameters())
    x = torch.zeros(2, 4, dtype=F64)
    exact = affine_relu_affine_mean(x, torch.ones_like(x), W1, b1, W2, b2)
    anti = monte_carlo_moments(net, x, 1.0, 40_000, seed=2, antithetic=True)
    plain = monte_carlo_moments(net, x, 1.0, 40_000, seed=2)
    _assert_within(anti.mean, anti.stderr, exact, "antithetic mean")
    assert anti.n_samples == 40_000 and bool((anti.stderr < plain.stderr).all())
    with pytest.raises(MomentInputError, match="antithetic"):
        monte_carlo_moments(net, x, 1.0, 41, antithetic=True)
