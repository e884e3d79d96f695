"""Max-pooling windows: padding, ceil mode and the max-pool/ReLU rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from momentkit import network_moments
from momentkit.network import pooling
from momentkit.network.gaussian_max import clark_max
from momentkit.network.layers import State, leaky_relu
from momentkit.network.pooling import max_pool2d, window_indices

F64 = torch.float64


@pytest.mark.parametrize("mode", ["diagonal", "factor", "full"])
def test_padded_windows_of_two_units_are_clark_exactly(mode):
    # Width 3, kernel 3, stride 2, padding 1: windows [pad, x0, x1] and [x1, x2, pad], so
    # each output is the maximum of two independent inputs: Clark's formula, exact.
    pool = nn.Sequential(nn.MaxPool2d((1, 3), stride=(1, 2), padding=(0, 1)))
    x = torch.tensor([[[[0.3, -0.2, 0.5]]]], dtype=F64)
    sigma = torch.tensor([[[0.1, 0.4, 0.2]]], dtype=F64)
    res = network_moments(pool, x, sigma, covariance=mode)
    v = sigma[0, 0] ** 2
    m = x[0, 0, 0]
    for o, (i, j) in enumerate([(0, 1), (1, 2)]):
        mean, var, *_ = clark_max(m[i], v[i], m[j], v[j], torch.zeros((), dtype=F64))
        torch.testing.assert_close(res.mean[0, 0, 0, o], mean, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(res.var[0, 0, 0, o], var, rtol=1e-13, atol=1e-16)
    if mode != "diagonal":
        # The two outputs share x1: Stein gives Cov = w_1(out 0) w_1(out 1) Var(x1).
        w_a = clark_max(m[0], v[0], m[1], v[1], torch.zeros((), dtype=F64))[3]
        w_b = clark_max(m[1], v[1], m[2], v[2], torch.zeros((), dtype=F64))[2]
        torch.testing.assert_close(res.cov[0, 0, 1], w_a * w_b * v[1], rtol=1e-13, atol=0)


def test_window_indices_match_max_pool():
    torch.manual_seed(0)
    for layer in [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 1, 0, 2, ceil_mode=True),
                  nn.MaxPool2d((2, 3), (3, 1), (1, 1), ceil_mode=True)]:
        x = torch.randn(7, 6, dtype=F64)
        idx, valid, out = window_indices(layer, 7, 6, x.device)
        vals = torch.where(valid, x.flatten()[idx.clamp_min(0)], -torch.inf)
        ref = layer(x[None, None])[0, 0]
        assert tuple(ref.shape) == out
        torch.testing.assert_close(vals.max(1).values.view(out), ref, rtol=0, atol=0)


def test_relu_before_max_pool_and_max_pool_before_relu_agree_with_the_forward_pass():
    # The walk takes the maximum of the pre-activations, with the ReLU as the constant 0
    # merged into the window's chain (ReLU -> MaxPool) or after it (MaxPool -> ReLU): the
    # network function is the same, and at sigma = 0 both give its forward pass.
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    a = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
    b = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU())
    x = torch.rand(2, 1, 6, 6, dtype=F64)
    for mode in ["diagonal", "factor", "full"]:
        for net in (a, b):
            res = network_moments(net, x, 0.0, covariance=mode)
            torch.testing.assert_close(res.mean, net(x), rtol=1e-14, atol=1e-15)
            assert float(res.var.detach().abs().max()) == 0.0


@pytest.mark.parametrize("mode", ["diagonal", "factor"])
def test_relu_of_a_one_unit_window_is_the_exact_relu(mode):
    # A 1x1 window: max(0, X) = ReLU(X), exact for Gaussian X through both chains (and so
    # through their blend): the same as the network without the pool.
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1).double()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    x = torch.rand(2, 1, 5, 5, dtype=F64)
    pooled = network_moments(nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(1)), x, 0.4,
                             covariance=mode)
    plain = network_moments(nn.Sequential(conv, nn.ReLU()), x, 0.4, covariance=mode)
    torch.testing.assert_close(pooled.mean, plain.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pooled.var, plain.var, rtol=1e-12, atol=1e-15)


def _window_state(shift: float):
    """One 2x2 window of four correlated Gaussians (factor ``(1, 6, 1, 2, 2)``)."""
    g = torch.Generator().manual_seed(0)
    fac = torch.randn(1, 6, 1, 2, 2, generator=g, dtype=F64) / 6**0.5
    mean = 0.5 * torch.randn(1, 1, 2, 2, generator=g, dtype=F64) + shift
    return State(mean, torch.zeros_like(mean), fac), g


@pytest.mark.parametrize("shift", [-1.5, 1.0])
def test_relu_of_max_against_monte_carlo(shift):
    # ReLU(max of 4 correlated Gaussians). Mostly negative maximum (shift -1.5, P(> 0) =
    # 0.20): ReLU of the chain's Gaussian misses the maximum's heavier upper tail
    # (variance 39% too small, mean 17%), the chain with 0 merged first is within 1%
    # (variance) and 8% (mean). Mostly positive (shift 1.0, P(> 0) = 0.999): both are
    # the same number (blend weight 0), 9.6% (variance, the chain's own error on the
    # skewed maximum) and 1.5% (mean) from Monte Carlo. Monte Carlo with 1e6 samples:
    # relative standard errors below 0.3%.
    state, g = _window_state(shift)
    new = max_pool2d(nn.MaxPool2d(2), state, relu=True)
    old = leaky_relu(max_pool2d(nn.MaxPool2d(2), state), 0.0)
    z = torch.randn(1_000_000, 6, generator=g, dtype=F64)
    r = (state.mean.flatten() + z @ state.factor.reshape(6, 4)).max(1).values.clamp_min(0)
    mc_mean, mc_var = float(r.mean()), float(r.var())

    def rel(s):
        var = float((s.factor**2).sum() + s.var.sum())
        return float(s.mean) / mc_mean - 1, var / mc_var - 1

    (m_new, v_new), (m_old, v_old) = rel(new), rel(old)
    if shift < 0:
        assert abs(v_new) < 0.03 and abs(m_new) < 0.10
        assert v_old < -0.3 and m_old < -0.12
    else:
        assert abs(v_new) < 0.11 and abs(m_new) < 0.02
        assert (m_new, v_new) == pytest.approx((m_old, v_old), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["diagonal", "factor", "full"])
def test_relu_max_pool_ties_dead_units_and_zero_variance_are_finite(mode, dtype):
    # Equal pre-activations in every window (zero weights), a dead, a kink and a linear
    # channel, and zero input noise on half of the image: finite values and gradients.
    conv = nn.Conv2d(1, 3, 3, padding=1).to(dtype)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-5.0, 0.0, 3.0]))
    net = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 2))
    net = net.to(dtype)
    x = torch.rand(2, 1, 8, 8, dtype=dtype)
    sigma = torch.tensor([0.0, 0.5], dtype=dtype).repeat_interleave(32).reshape(1, 8, 8)
    sigma.requires_grad_(True)
    res = network_moments(net, x, sigma, covariance=mode)
    assert res.mean.dtype == dtype
    assert torch.isfinite(res.mean).all() and torch.isfinite(res.var).all()
    (res.mean.sum() + res.var.sum()).backward()
    assert torch.isfinite(sigma.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_remainder_models_agree_without_remainder():
    # Inputs with zero remainder (a convolution of the input): the remainder model of the
    # window does not enter.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).double()
    x = torch.rand(1, 1, 6, 6, dtype=F64)
    out = {}
    for model in pooling.REMAINDER_MODELS:
        pooling.remainder_model = model
        try:
            out[model] = network_moments(net, x, 0.3, covariance="factor")
        finally:
            pooling.remainder_model = "independent"
    a, b = out.values()
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.var, b.var, rtol=0, atol=0)


def test_factor_correlated_remainders_give_finite_gradients():
    # Two ReLU-pool stages: remainders zero in the first window, positive in the second.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).double()
    x = torch.rand(1, 1, 8, 8, dtype=F64)
    sigma = torch.tensor(0.3, dtype=F64, requires_grad=True)
    pooling.remainder_model = "factor_correlation"
    try:
        res = network_moments(net, x, sigma, covariance="factor")
    finally:
        pooling.remainder_model = "independent"
    assert float(res.var.detach().min()) > 0
    (res.mean.sum() + res.var.sum()).backward()
    assert torch.isfinite(sigma.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True)])
def test_diagonal_relu_pool_equals_the_window_covariance_chain(pool, dtype):
    # The diagonal mode's elementwise chains are _relu_of_max with a diagonal window
    # covariance (every cross-covariance 0): the same operations, the same numbers.
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 3, 9, 9, generator=g, dtype=dtype) - 0.5
    v = torch.rand(2, 3, 9, 9, generator=g, dtype=dtype)
    v[0, 0] = 0.0
    got = max_pool2d(pool, State(m, v), relu=True)
    geom = pooling._geometry(pool, 9, 9)
    _, valid, _ = window_indices(pool, 9, 9, m.device)
    ref_m, ref_v, _ = pooling._relu_of_max(
        pooling._gather(m, geom), valid, torch.diag_embed(pooling._gather(v, geom))
    )
    torch.testing.assert_close(got.mean, ref_m.reshape(got.mean.shape), rtol=0, atol=0)
    torch.testing.assert_close(got.var, ref_v.reshape(got.var.shape), rtol=0, atol=0)
