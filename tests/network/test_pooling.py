"""Max-pooling windows: padding, ceil mode and the max-pool/ReLU rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from momentkit import network_moments
from momentkit.network.gaussian_max import clark_max
from momentkit.network.pooling import window_indices

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


def test_relu_before_max_pool_equals_max_pool_before_relu():
    # The walk applies the max before the ReLU; the network function is the same, so at
    # sigma = 0 both orders of the layers give the forward pass of either.
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    a = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
    b = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU())
    x = torch.rand(2, 1, 6, 6, dtype=F64)
    ra = network_moments(a, x, 0.3, covariance="factor")
    rb = network_moments(b, x, 0.3, covariance="factor")
    torch.testing.assert_close(ra.mean, rb.mean, rtol=0, atol=0)
    torch.testing.assert_close(ra.var, rb.var, rtol=0, atol=0)
