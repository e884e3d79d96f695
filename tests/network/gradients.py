"""Shared check of the network tests: moments and their gradients stay finite."""

from __future__ import annotations

import torch
from torch import nn

from momentkit import network_moments


def assert_finite_moments_and_gradients(
    model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, mode: str
) -> None:
    """``network_moments`` of ``model`` at ``x`` and ``sigma`` in ``mode``: finite mean and
    variance, and finite gradients of their sum in ``sigma`` and in every parameter."""
    sigma = sigma.detach().requires_grad_(True)
    res = network_moments(model, x, sigma, covariance=mode)
    assert torch.isfinite(res.mean).all() and torch.isfinite(res.var).all()
    (res.mean.sum() + res.var.sum()).backward()
    assert torch.isfinite(sigma.grad).all()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
