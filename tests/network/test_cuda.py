"""``network_moments`` and the network regularizer on a CUDA device agree with the CPU.

Skipped without CUDA; ``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from momentkit import moment_regularized_loss, network_moments

F64 = torch.float64
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3),
    ).to(F64).eval()


@pytest.mark.parametrize("mode", ["diagonal", "factor", "full"])
def test_every_mode_matches_the_cpu(mode: str) -> None:
    net = small_net()
    x = torch.rand(3, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    cpu = network_moments(net, x, 0.3, covariance=mode)
    gpu = network_moments(net.cuda(), x.cuda(), 0.3, covariance=mode)
    assert gpu.mean.device.type == "cuda" and gpu.mode == cpu.mode == mode
    # float64 on both devices; the kernels differ in summation order only
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu.var.cpu(), cpu.var, rtol=1e-9, atol=1e-12)


def test_network_regularizer_gradients_match_the_cpu() -> None:
    net = small_net()
    x = torch.rand(4, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 1])
    grads = []
    for device in ("cpu", "cuda"):
        model = net.to(device)
        model.zero_grad()
        total = moment_regularized_loss(model, x.to(device), y.to(device), 0.5, 1.0,
                                        moments="network")[0]
        total.backward()
        grads.append([p.grad.detach().cpu().clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
