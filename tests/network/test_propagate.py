"""momentkit.network_moments: exact cases, limits, gradients and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import momentkit
from momentkit import MomentInputError, Normalize, network_moments
from tests.network.gradients import assert_finite_moments_and_gradients

MODES = ("diagonal", "factor", "full")
F64 = torch.float64


def linear_net() -> nn.Module:
    """Every affine layer kind, no nonlinearity."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    return nn.Sequential(
        Normalize([0.5, 0.4], [0.2, 0.3]),
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        bn,
        nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nn.Conv2d(3, 4, 2, padding=1, dilation=2, groups=1),
        nn.AdaptiveAvgPool2d((2, 3)),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(24, 5),
        nn.Identity(),
    ).to(F64).eval()


class Residual(nn.Module):
    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 1, groups=2)
        self.relu = relu
        self.fc = nn.Linear(2 * 4 * 4 * 2, 3)

    def forward(self, x):
        h = self.conv1(x)
        if self.relu:
            h = torch.relu(h)
        y = x + self.conv2(h)
        y = torch.cat([y, h], dim=1)
        return self.fc(torch.flatten(y, 1))


def jacobian_cov(model, x, sigma):
    """``J Diag(sigma^2) J^T`` of the flattened output at each input."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: model(t[None]).flatten(), xi)
        jac = jac.reshape(jac.shape[0], -1)
        out.append(jac @ torch.diag(sigma.flatten() ** 2) @ jac.T)
    return torch.stack(out)


@pytest.mark.parametrize("model", [linear_net(), Residual(relu=False).to(F64)])
@pytest.mark.parametrize("mode", ["factor", "full"])
def test_linear_network_is_exact(model, mode):
    x = torch.rand(2, 2, 4, 4, dtype=F64)
    sigma = torch.rand(2, 4, 4, dtype=F64)  # per element
    res = network_moments(model, x, sigma, covariance=mode)
    ref = jacobian_cov(model, x, sigma.expand_as(x[0]))
    assert res.mode == mode
    # Deterministic references in float64: a few hundred eps of the largest entry.
    tol = 1e-13 * float(ref.abs().max())
    torch.testing.assert_close(res.mean, model(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(res.cov, ref, rtol=0, atol=tol)
    torch.testing.assert_close(res.var, torch.diagonal(ref, dim1=1, dim2=2), rtol=0, atol=tol)


def lenet_like(pool: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        Normalize([0.1], [0.3]),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        pool,
        nn.Conv2d(3, 2, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).to(F64).eval()


POOLS = [
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, padding=1),
    nn.MaxPool2d(2, stride=1, dilation=2, ceil_mode=True),
    nn.MaxPool2d((1, 3), stride=(2, 1), padding=(0, 1), ceil_mode=True),
]


@pytest.mark.parametrize("pool", POOLS, ids=repr)
@pytest.mark.parametrize("mode", MODES)
def test_sigma_zero_is_the_forward_pass(pool, mode):
    model = lenet_like(pool)
    x = torch.rand(3, 1, 8, 8, dtype=F64)
    expected = model(x)
    res = network_moments(model, x, 0.0, covariance=mode)
    torch.testing.assert_close(res.mean, expected, rtol=0, atol=1e-14)
    assert torch.equal(res.var, torch.zeros_like(res.var))


def one_hidden_layer():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(F64)


@pytest.mark.parametrize("mode", MODES)
def test_one_hidden_layer_matches_theorem_1(mode):
    net = one_hidden_layer()
    x = torch.randn(5, 4, dtype=F64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=F64)
    res = network_moments(net, x, sigma, covariance=mode)
    a, c1, b, c2 = net[0].weight, net[0].bias, net[2].weight, net[2].bias
    cov_x = torch.diag(sigma**2)
    mean = momentkit.affine_relu_affine_mean(x, cov_x, a, c1, b, c2)
    torch.testing.assert_close(res.mean, mean, rtol=1e-13, atol=1e-13)
    if mode == "full":
        cov = momentkit.affine_relu_affine_covariance(x, cov_x, a, c1, b, c2)
        torch.testing.assert_close(res.cov, cov, rtol=1e-12, atol=1e-13)


def test_auto_picks_full_for_small_and_factor_for_lenet():
    from experiments.models import lenet

    assert network_moments(one_hidden_layer(), torch.randn(1, 4, dtype=F64), 0.1).mode == "full"
    net = lenet("mnist").eval()
    assert network_moments(net, torch.rand(1, 1, 28, 28), 0.0).mode == "factor"


def test_network_mode_is_the_mode_network_moments_uses():
    from experiments.models import lenet
    from momentkit.network import network_mode
    from momentkit.network.propagate import FACTOR_MAX_BYTES

    small, net = one_hidden_layer(), lenet("mnist").eval()
    x_small, x_net = torch.randn(2, 4, dtype=F64), torch.rand(1, 1, 28, 28)
    for model, x in ((small, x_small), (net, x_net)):
        for cov in ("auto", "diagonal", "factor"):
            assert network_mode(model, x, cov) == network_moments(
                model, x, 0.1, covariance=cov
            ).mode
    # A batch whose factor would pass FACTOR_MAX_BYTES: "auto" falls back to diagonal,
    # an explicit "factor" is refused with the same error as network_moments gives.
    big = int(FACTOR_MAX_BYTES // (784 * 32 * 28 * 28 * 4)) + 1
    x_big = torch.rand(big, 1, 28, 28)
    assert network_mode(net, x_big) == "diagonal"
    with pytest.raises(MomentInputError, match="covariance='factor' needs"):
        network_mode(net, x_big, "factor")
    with pytest.raises(MomentInputError, match="network_mode: model must be an nn.Module"):
        network_mode(lambda t: t, x_small)


@pytest.mark.parametrize("mode", MODES)
def test_dead_units_ties_and_zero_variance_give_finite_gradients(mode):
    model = lenet_like(nn.MaxPool2d(2))
    with torch.no_grad():
        model[1].weight.zero_()  # every pre-activation in a pool window ties
        model[1].bias.copy_(torch.tensor([-5.0, 0.0, 3.0]))  # dead, kink, linear
    x = torch.rand(2, 1, 8, 8, dtype=F64)
    sigma = torch.tensor([0.0, 0.5], dtype=F64).repeat_interleave(32).reshape(1, 8, 8)
    assert_finite_moments_and_gradients(model, x, sigma, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_small_network(mode):
    model = lenet_like(nn.MaxPool2d(2))
    x = torch.rand(1, 1, 4, 4, dtype=F64)
    sigma = torch.tensor([0.3], dtype=F64, requires_grad=True)
    w = model[4].weight.detach().clone().requires_grad_()
    del model[4].weight  # a plain tensor attribute, so that gradcheck's copies flow in

    def fn(sigma, w_in):
        model[4].weight = w_in
        return network_moments(model, x, sigma, covariance=mode)[:2]

    assert torch.autograd.gradcheck(fn, (sigma, w))


def test_batched_equals_one_by_one():
    model = lenet_like(nn.MaxPool2d(2))
    x = torch.rand(3, 1, 8, 8, dtype=F64)
    for mode in MODES:
        res = network_moments(model, x, 0.2, covariance=mode)
        for i in range(3):
            one = network_moments(model, x[i : i + 1], 0.2, covariance=mode)
            torch.testing.assert_close(res.mean[i : i + 1], one.mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(res.var[i : i + 1], one.var, rtol=1e-12, atol=1e-14)


def test_residual_with_relu_runs_in_every_mode():
    model = Residual(relu=True).to(F64)
    x = torch.rand(2, 2, 4, 4, dtype=F64)
    outs = [network_moments(model, x, 0.1, covariance=m) for m in MODES]
    for r in outs:
        assert r.mean.shape == (2, 3) and torch.isfinite(r.var).all()
    torch.testing.assert_close(outs[1].mean, outs[2].mean, rtol=1e-3, atol=1e-4)


def test_unsupported_layers_and_ops_are_named():
    with pytest.raises(MomentInputError, match=r"unsupported layer '1' \(Sigmoid\)"):
        network_moments(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()), torch.rand(1, 2), 0.1)

    class Gelu(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    with pytest.raises(MomentInputError, match="tanh"):
        network_moments(Gelu(), torch.rand(1, 2), 0.1)
    with pytest.raises(MomentInputError, match="covariance must be one of"):
        network_moments(one_hidden_layer(), torch.rand(1, 4, dtype=F64), 0.1, covariance="x")
    with pytest.raises(MomentInputError, match="sigma"):
        network_moments(one_hidden_layer(), torch.rand(1, 4, dtype=F64), -1.0)
    wide = nn.Sequential(nn.Linear(2, 5000), nn.ReLU())
    with pytest.raises(MomentInputError, match="FULL_MAX_UNITS"):
        network_moments(wide, torch.rand(1, 2), 0.1, covariance="full")
    with pytest.raises(MomentInputError, match="padding_mode"):
        network_moments(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")),
                        torch.rand(1, 1, 4, 4), 0.1)
