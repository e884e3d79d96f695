"""Bad input is refused at the boundary of the function the user called.

Covariances that are not positive semi-definite, infinities, empty input and the
names in the messages (each case here was once answered with a wrong number, a NaN,
a crash or the name of an inner function).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from momentkit import (
    MomentInputError,
    Normalize,
    affine_moments,
    affine_relu_affine_covariance,
    affine_relu_affine_mean,
    expected_prediction,
    moment_regularized_loss,
    relu_covariance,
    relu_covariance_zero_mean,
)
from momentkit._validate import PSD_ULPS, check_covariance_matrix
from momentkit.references.montecarlo import monte_carlo_affine_relu_affine

F64 = torch.float64

# A 3x3 symmetric matrix with eigenvalues (2, 1, -0.8) and the positive diagonal
# (0.9, 0.9, 0.4): eigenvectors (1, -1, 0)/sqrt 2, (1, 1, -2)/sqrt 6, (1, 1, 1)/sqrt 3.
_Q = torch.tensor([[1 / 2**0.5, 1 / 6**0.5, 1 / 3**0.5], [-1 / 2**0.5, 1 / 6**0.5, 1 / 3**0.5],
                   [0.0, -2 / 6**0.5, 1 / 3**0.5]], dtype=F64)
NOT_PSD_3 = _Q @ torch.diag(torch.tensor([2.0, 1.0, -0.8], dtype=F64)) @ _Q.T
NOT_PSD_3 = 0.5 * (NOT_PSD_3 + NOT_PSD_3.T)
NOT_PSD_2 = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # |rho| = 2


def _net(h: int = 3, n: int = 3, d: int = 2, dtype=F64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(h, n, generator=g, dtype=dtype), torch.randn(h, generator=g, dtype=dtype),
            torch.randn(d, h, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype))


# ---------------------------------------------------------------- not PSD (item 3)


def test_not_psd_fixture_has_the_stated_spectrum():
    assert bool((torch.diagonal(NOT_PSD_3) > 0).all())
    torch.testing.assert_close(torch.linalg.eigvalsh(NOT_PSD_3),
                               torch.tensor([-0.8, 1.0, 2.0], dtype=F64))


@pytest.mark.parametrize("cov", [NOT_PSD_2, NOT_PSD_3], ids=["rho=2", "eig=-0.8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_not_psd_covariance_is_refused_naming_function_and_argument(cov, dtype):
    cov = cov.to(dtype)
    n = cov.shape[-1]
    mean = torch.zeros(n, dtype=dtype)
    A, c1, B, c2 = _net(n=n, dtype=dtype)
    calls = {
        "relu_covariance: cov": lambda: relu_covariance(mean, cov),
        "relu_covariance_zero_mean: cov": lambda: relu_covariance_zero_mean(cov),
        "affine_moments: var_or_cov": lambda: affine_moments(torch.eye(n, dtype=dtype), mean, cov),
        "affine_relu_affine_mean: cov_x": lambda: affine_relu_affine_mean(mean, cov, A, c1, B, c2),
        "affine_relu_affine_covariance: cov_x":
            lambda: affine_relu_affine_covariance(mean, cov, A, c1, B, c2),
        "monte_carlo_affine_relu_affine: cov_x":
            lambda: monte_carlo_affine_relu_affine(mean, cov, A, c1, B, c2, 10),
    }
    for prefix, call in calls.items():
        with pytest.raises(MomentInputError, match=f"^{prefix}.*positive semi-definite"):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n, m", [(2, 1), (8, 3), (40, 5), (40, 40), (120, 30), (60, 600)])
def test_gemm_gram_matrices_pass_the_psd_check(dtype, n, m):
    """``A @ A.T`` is PSD up to its rounding, rank-deficient (``m < n``) included, with
    rows of very different scales: the tolerance must never refuse it."""
    g = torch.Generator().manual_seed(n * 1000 + m)
    for _ in range(5):
        a = torch.randn(n, m, generator=g, dtype=dtype)
        a = a * torch.rand(n, 1, generator=g, dtype=dtype) ** 3
        check_covariance_matrix(a @ a.T, "test")
        relu_covariance(torch.zeros(n, dtype=dtype), a @ a.T)


def test_psd_tolerance_is_where_the_docstring_says():
    """``diag(1, -t)`` (rotated) passes at ``t`` half the documented tolerance
    ``n max(diag) (PSD_ULPS eps(float32 at least) + eps(dtype))`` and is refused at
    twice it."""
    for dtype in (torch.float32, F64):
        tol = 2 * (PSD_ULPS + 1) * torch.finfo(dtype).eps
        # diag(1, -t) has a negative diagonal entry; rotate it so that the diagonal is
        # positive and the smallest eigenvalue is -t.
        c, s = math.cos(0.3), math.sin(0.3)
        rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
        for factor, ok in ((0.5, True), (2.0, False)):
            eig = torch.tensor([1.0, -factor * tol], dtype=F64)
            m = (rot @ torch.diag(eig) @ rot.T).to(dtype)
            scale = float(torch.diagonal(m).max())
            m = (m / scale).to(dtype)  # max diag 1 so that tol is exact
            m = 0.5 * (m + m.T)
            if ok:
                check_covariance_matrix(m, "test")
            else:
                with pytest.raises(MomentInputError, match="positive semi-definite"):
                    check_covariance_matrix(m, "test")


# ---------------------------------------------------------------- infinity (item 4)


def test_infinite_means_are_refused_not_nan():
    inf = float("inf")
    with pytest.raises(MomentInputError, match="^relu_covariance: mean contains inf"):
        relu_covariance(torch.tensor([inf, -inf]), torch.eye(2))
    A, c1, B, c2 = _net()
    mean = torch.tensor([0.0, inf, 1.0], dtype=F64)
    with pytest.raises(MomentInputError, match="^affine_relu_affine_mean: mean_x contains inf"):
        affine_relu_affine_mean(mean, torch.ones(3, dtype=F64), A, c1, B, c2)
    with pytest.raises(MomentInputError, match="^affine_moments: mean contains inf"):
        affine_moments(A, mean, torch.ones(3, dtype=F64))
    with pytest.raises(MomentInputError, match="^affine_relu_affine_covariance: A contains inf"):
        affine_relu_affine_covariance(mean.nan_to_num(posinf=0.0), torch.ones(3, dtype=F64),
                                      torch.full_like(A, inf), c1, B, c2)


def test_overflow_inside_is_refused_naming_the_intermediate():
    A, c1, B, c2 = _net()
    big = torch.full((3,), 1e300, dtype=F64)
    with pytest.raises(MomentInputError,
                       match="^affine_relu_affine_mean: the pre-activation variance"):
        affine_relu_affine_mean(torch.zeros(3, dtype=F64), big, A * 1e10, c1, B, c2)
    with pytest.raises(MomentInputError, match="^affine_moments: the output variance overflows"):
        affine_moments(A * 1e10, torch.zeros(3, dtype=F64), big)


# ---------------------------------------------------------------- empty input (item 6)


def test_empty_input_gives_an_empty_or_exact_answer():
    assert relu_covariance(torch.empty(0), torch.empty(0, 0)).shape == (0, 0)
    assert relu_covariance(torch.empty(4, 0), torch.empty(4, 0, 0)).shape == (4, 0, 0)
    # No hidden units: the output is the constant c2, with zero covariance.
    A, c1, B, c2 = torch.empty(0, 3, dtype=F64), torch.empty(0, dtype=F64), torch.empty(
        2, 0, dtype=F64), torch.tensor([1.0, -2.0], dtype=F64)
    mean, var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    assert torch.equal(affine_relu_affine_covariance(mean, var, A, c1, B, c2),
                       torch.zeros(2, 2, dtype=F64))
    assert torch.equal(affine_relu_affine_mean(mean, var, A, c1, B, c2), c2)
    full = torch.eye(3, dtype=F64)
    assert torch.equal(affine_relu_affine_covariance(mean, full, A, c1, B, c2),
                       torch.zeros(2, 2, dtype=F64))
    # An empty batch of points.
    A, c1, B, c2 = _net()
    out = affine_relu_affine_covariance(torch.zeros(0, 3, dtype=F64), torch.ones(0, 3, dtype=F64),
                                        A, c1, B, c2)
    assert out.shape == (0, 2, 2)


# ---------------------------------------------------------------- names (item 9)


def test_errors_name_the_called_function_not_an_inner_one():
    A, c1, B, c2 = _net()
    # A variance that overflows inside used to surface as "relu_mean: var contains inf".
    with pytest.raises(MomentInputError, match="^affine_relu_affine_mean: ") as info:
        affine_relu_affine_mean(torch.zeros(3, dtype=F64), torch.full((3,), 1e300, dtype=F64),
                                A * 1e10, c1, B, c2)
    assert "relu_mean" not in str(info.value)
    # A negative variance used to surface as "relu_covariance: cov has a negative variance".
    with pytest.raises(MomentInputError, match="^affine_relu_affine_covariance: cov_x") as info:
        affine_relu_affine_covariance(torch.zeros(3, dtype=F64), -torch.ones(3, dtype=F64),
                                      A, c1, B, c2)
    assert "relu_covariance" not in str(info.value)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_diverged_model_is_named_by_its_parameter():
    model = _Net()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    x = torch.rand(2, 4)
    with pytest.raises(MomentInputError, match="^expected_prediction: .*'affine.weight'.*NaN"):
        expected_prediction(model, x, 0.1)
    with pytest.raises(MomentInputError, match="^moment_regularized_loss: .*NaN"):
        moment_regularized_loss(model, x, torch.tensor([0, 1]), 0.1, 1.0)
    model = _Net()
    with torch.no_grad():
        model.fc2.bias[1] = float("inf")
    with pytest.raises(MomentInputError, match="^expected_prediction: .*'fc2.bias'.*inf"):
        expected_prediction(model, x, 0.1)


def test_regularizer_refuses_infinite_and_empty_input():
    model = _Net()
    x = torch.rand(2, 4)
    x[1, 2] = float("inf")
    with pytest.raises(MomentInputError, match="^expected_prediction: x contains inf"):
        expected_prediction(model, x, 0.1)
    with pytest.raises(MomentInputError, match="^moment_regularized_loss: x is an empty batch"):
        moment_regularized_loss(model, torch.rand(0, 4), torch.zeros(0, dtype=torch.long), 0.1, 1)
    out = expected_prediction(model, torch.rand(0, 4), 0.1)
    assert out.surrogate.shape == (0, 3)


def test_normalize_raises_moment_input_error():
    with pytest.raises(MomentInputError, match="^Normalize: mean has 2 channels"):
        Normalize([0.1, 0.2], [0.3])
    with pytest.raises(MomentInputError, match="^Normalize: std must be positive"):
        Normalize([0.1], [0.0])
    with pytest.raises(MomentInputError, match="^Normalize: std contains inf"):
        Normalize([0.1], [float("inf")])


def test_count_and_seed_checks_name_function_and_argument():
    args = (np.zeros(3), np.ones(3), np.ones((5, 3)), np.zeros(5), np.ones((2, 5)), np.zeros(2))
    with pytest.raises(MomentInputError, match="^monte_carlo_affine_relu_affine: n_samples"):
        monte_carlo_affine_relu_affine(*args, n_samples=True)
    with pytest.raises(MomentInputError, match="^monte_carlo_affine_relu_affine: seed"):
        monte_carlo_affine_relu_affine(*args, n_samples=10, seed=2**64)


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_and_shallow_work_in_half_precision(dtype):
    """Results in the input dtype, equal to the float32 computation rounded once
    (so within half an ulp of the half type, relative)."""
    A, c1, B, c2 = (t.float() for t in _net(h=6, n=4, d=3))
    mean = torch.tensor([0.5, -1.0, 0.25, 2.0])
    var = torch.tensor([0.5, 1.0, 0.25, 0.125])
    half = [t.to(dtype) for t in (mean, var, A, c1, B, c2)]
    ref32 = [t.to(dtype).float() for t in (mean, var, A, c1, B, c2)]  # the same numbers
    got = affine_relu_affine_mean(*half)
    assert got.dtype == dtype
    torch.testing.assert_close(got, affine_relu_affine_mean(*ref32).to(dtype), rtol=0, atol=0)
    got = affine_relu_affine_covariance(*half)
    assert got.dtype == dtype
    torch.testing.assert_close(got, affine_relu_affine_covariance(*ref32).to(dtype),
                               rtol=0, atol=0)
    m, v = affine_moments(half[2], half[0], half[1], half[3])
    assert m.dtype == v.dtype == dtype
    m32, v32 = affine_moments(ref32[2], ref32[0], ref32[1], ref32[3])
    assert torch.equal(m, m32.to(dtype)) and torch.equal(v, v32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regularizer_works_for_a_half_precision_model(dtype):
    model = _Net()
    x = torch.rand(4, 4)
    ref = expected_prediction(model, x, 0.2)
    model_h = _Net().to(dtype)
    model_h.load_state_dict(model.state_dict())
    out = expected_prediction(model_h, x.to(dtype), 0.2)
    assert out.surrogate.dtype == out.output.dtype == dtype
    # Half-precision weights and activations: a few ulps of the half type per layer.
    tol = 8 * torch.finfo(dtype).eps * (1 + float(ref.surrogate.detach().abs().max()))
    torch.testing.assert_close(out.surrogate.float(), ref.surrogate, rtol=0, atol=tol)
    total, _, _ = moment_regularized_loss(model_h, x.to(dtype), torch.tensor([0, 1, 2, 0]),
                                          0.2, 1.0)
    total.backward()
    assert model_h.fc1.weight.grad.dtype == dtype
    assert bool(torch.isfinite(model_h.fc1.weight.grad).all())


def test_upsilon_variance_checks_its_input():
    from momentkit.split import Upsilon

    upsilon = Upsilon(nn.Linear(3, 2))
    with pytest.raises(MomentInputError, match="^Upsilon.variance: input_var must be non-neg"):
        upsilon.variance(-torch.ones(1, 3))
    with pytest.raises(MomentInputError, match="^Upsilon.variance: input_var contains inf"):
        upsilon.variance(torch.full((1, 3), float("inf")))
    w = upsilon.affine.weight.detach()
    torch.testing.assert_close(upsilon.variance(torch.ones(1, 3)), (w * w).sum(1)[None])
