"""The regularizer with ``moments="network"``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentkit import (
    MomentInputError,
    MomentRegularizedLoss,
    expected_prediction,
    moment_regularized_loss,
    network_moments,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 4),
    ).double()


def test_one_hidden_layer_agrees_with_first_relu():
    # With an affine Omega the two surrogates are the same formula, Omega(T(mu2, s2)).
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    a = expected_prediction(net, x, 0.3)
    b = expected_prediction(net, x, 0.3, moments="network")
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.surrogate, b.surrogate, rtol=1e-13, atol=1e-14)


def test_network_surrogate_is_the_diagonal_mean_and_sigma_zero_the_output():
    net = small_net()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    res = expected_prediction(net, x, 0.2, moments="network")
    diagonal = network_moments(net, x, 0.2, covariance="diagonal")
    torch.testing.assert_close(res.surrogate, diagonal.mean)
    zero = expected_prediction(net, x, 0.0, moments="network")
    torch.testing.assert_close(zero.surrogate, zero.output, rtol=0, atol=1e-14)


def test_loss_and_module_with_network_moments():
    net = small_net()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    total, clean, term = moment_regularized_loss(net, x, y, 0.2, 0.5, moments="network")
    out, sur = expected_prediction(net, x, 0.2, moments="network")
    torch.testing.assert_close(clean, F.cross_entropy(out, y))
    torch.testing.assert_close(term, F.cross_entropy(sur, y))
    torch.testing.assert_close(total, clean + 0.5 * term)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    loss_fn = MomentRegularizedLoss(0.2, 0.5, moments="network")
    torch.testing.assert_close(loss_fn(net, x, y)[0], total)
    assert "network" in repr(loss_fn)


def test_unknown_moments_raise():
    net = small_net()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(MomentInputError, match="moments"):
        expected_prediction(net, x, 0.1, moments="all")
    with pytest.raises(MomentInputError, match="moments"):
        MomentRegularizedLoss(0.1, 1.0, moments="exact")
