"""momentkit.affine: Eq. 5 against explicit dense Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev

from momentkit.affine import Normalize, affine_moments
from momentkit.errors import MomentInputError

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _dense(layer: nn.Module, in_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer as an explicit matrix A and offset c (from its Jacobian)."""
    x0 = torch.zeros(in_shape, dtype=F64)

    def f(x):
        return layer(x.reshape(1, *in_shape)).reshape(-1)

    a = jacrev(f)(x0.reshape(-1))
    return a, f(x0.reshape(-1)).detach()


CONVS = [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=2, dilation=2, padding=2, groups=2),
    dict(in_channels=2, out_channels=2, kernel_size=(3, 1), stride=(1, 2), padding=(1, 0),
         bias=False),
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_diagonal_and_full_against_dense_jacobian(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    in_shape = (kwargs["in_channels"], 5, 6)
    a, c = _dense(conv, in_shape)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, *in_shape, generator=g, dtype=F64)
    var = torch.rand(2, *in_shape, generator=g, dtype=F64)
    out_mean, out_var = affine_moments(conv, mean, var)
    flat_mean, flat_var = mean.reshape(2, -1), var.reshape(2, -1)
    tol = dict(rtol=64 * EPS, atol=64 * EPS)
    torch.testing.assert_close(out_mean.reshape(2, -1), flat_mean @ a.T + c, **tol)
    torch.testing.assert_close(out_var.reshape(2, -1), flat_var @ (a * a).T, **tol)
    # full covariance: A Sigma A^T
    b = torch.randn(2, flat_mean.shape[1], flat_mean.shape[1], generator=g, dtype=F64)
    cov = b @ b.transpose(1, 2)
    out_mean_f, out_cov = affine_moments(conv, mean, cov)
    torch.testing.assert_close(out_mean_f, out_mean)
    torch.testing.assert_close(out_cov, a @ cov @ a.T, rtol=1e-12, atol=1e-12)
    # a diagonal covariance gives the diagonal result
    _, cov_diag = affine_moments(conv, mean, torch.diag_embed(flat_var))
    torch.testing.assert_close(torch.diagonal(cov_diag, dim1=1, dim2=2),
                               out_var.reshape(2, -1), **tol)


def test_linear_matrix_and_normalize():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    mean = torch.randn(5, 4, dtype=F64)
    var = torch.rand(5, 4, dtype=F64)
    m, v = affine_moments(lin, mean, var)
    torch.testing.assert_close(m, lin(mean))
    torch.testing.assert_close(v, var @ (lin.weight**2).T)
    m2, v2 = affine_moments(lin.weight, mean, var, bias=lin.bias)
    assert torch.equal(m, m2) and torch.equal(v, v2)
    cov = torch.diag_embed(var)
    _, c = affine_moments(lin, mean, cov)
    torch.testing.assert_close(torch.diagonal(c, dim1=-2, dim2=-1), v)
    norm = Normalize([0.1, 0.2], [0.5, 2.0]).double()
    img_mean = torch.randn(3, 2, 4, 4, dtype=F64)
    img_var = torch.rand(3, 2, 4, 4, dtype=F64)
    nm, nv = affine_moments(norm, img_mean, img_var)
    torch.testing.assert_close(nm, norm(img_mean))
    scale = torch.tensor([0.5, 2.0], dtype=F64).view(1, 2, 1, 1) ** 2
    torch.testing.assert_close(nv, img_var / scale)
    a, _ = _dense(norm, (2, 4, 4))
    full = torch.diag_embed(img_var.reshape(3, -1))
    _, nc = affine_moments(norm, img_mean, full)
    torch.testing.assert_close(nc, a @ full @ a.T)


def test_gradcheck_conv_variance():
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    mean = torch.randn(1, 1, 4, 4, dtype=F64, requires_grad=True)
    var = torch.rand(1, 1, 4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, v: affine_moments(conv, m, v), (mean, var))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: affine_moments(nn.Linear(3, 2), torch.zeros(3), -torch.ones(3)), "negative"),
        (lambda: affine_moments(nn.Linear(3, 2), torch.zeros(3), torch.ones(4)), "neither"),
        (lambda: affine_moments(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"),
                                torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)), "padding_mode"),
        (lambda: affine_moments(nn.Tanh(), torch.zeros(3), torch.ones(3)), "unsupported"),
        (lambda: affine_moments(torch.ones(2, 4), torch.zeros(3), torch.ones(3)), "matrix"),
        (lambda: affine_moments(nn.Linear(2, 2), torch.zeros(2),
                                torch.tensor([[1.0, 0.3], [0.0, 1.0]])), "symmetric"),
        (lambda: affine_moments(nn.Linear(2, 2), torch.tensor([float("nan"), 0.0]),
                                torch.ones(2)), "mean"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(MomentInputError, match=match):
        call()
