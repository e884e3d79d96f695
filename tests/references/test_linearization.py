"""Two-stage linearization: exact cases, the relu_index=0 identity, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from momentkit.affine import Normalize
from momentkit.errors import MomentInputError
from momentkit.references import linearization
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments
from momentkit.regularizer import expected_prediction
from momentkit.relu import relu_mean
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _lenet_like(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5, 0.4], [0.25, 0.5]),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
        nn.Linear(8, 3),
    ).double()


def _ara(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _rounding_bound(res, x_flat: torch.Tensor) -> torch.Tensor:
    """Bound on the rounding difference between the Theorem 1 mean of the linearized
    network and ``Omega(mu3)``: the pre-activation is formed once as ``F(x)`` and once
    as ``A x + c1`` (errors about ``eps * (|A||x| + |F(x)|)``), which ``T`` (Lipschitz
    1) and ``B`` carry to the output, plus the rounding of ``B mu3 + c2`` itself. The
    factor 16 covers the unrolled sums' length-dependent constants."""
    pre = (res.A @ x_flat.unsqueeze(-1)).squeeze(-1) + res.c1
    scale_pre = (res.A.abs() @ x_flat.abs().unsqueeze(-1)).squeeze(-1) + pre.abs()
    out = (res.B.abs() @ (scale_pre + res.mu3.abs()).unsqueeze(-1)).squeeze(-1) + res.c2.abs()
    return 16 * EPS * out


@pytest.mark.parametrize(
    "sigma", [0.3, torch.tensor([0.1, 2.0], dtype=F64), torch.rand(2, 4, 4, dtype=F64)]
)
def test_first_relu_mean_is_the_regularizer_surrogate(sigma):
    net = _lenet_like()
    x = torch.rand(3, 2, 4, 4, dtype=F64)
    res = two_stage_linearization(net, x, sigma, relu_index=0)
    surrogate = expected_prediction(net, x, sigma).surrogate
    bound = _rounding_bound(res, x.reshape(3, -1))
    assert bool(((res.mean - surrogate).abs() <= bound).all()), (res.mean - surrogate).abs() / bound


def test_first_relu_mean_is_omega_of_mu3_computed_by_hand():
    """The same identity without the regularizer: Upsilon = Normalize + Conv2d, the
    pre-activation variance is the convolution of sigma^2 / std_c^2 with squared
    weights (Eq. 5), mu3 = T(mu2, s2) and Omega = the layers after the first ReLU."""
    net = _lenet_like(seed=3)
    x = torch.rand(2, 2, 4, 4, dtype=F64)
    sigma = torch.tensor([0.2, 0.7], dtype=F64)
    norm, conv = net[0], net[1]
    mu2 = conv(norm(x))
    var_in = (sigma**2 / norm.std**2).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    var2 = F.conv2d(var_in, conv.weight**2, padding=1)
    omega_mu3 = net[3:](relu_mean(mu2, var2))
    res = two_stage_linearization(net, x, sigma, relu_index=0)
    bound = _rounding_bound(res, x.reshape(2, -1))
    assert bool(((res.mean - omega_mu3).abs() <= bound).all())


def test_affine_relu_affine_network_is_theorem_1_exactly():
    net = _ara()
    W1, b1, W2, b2 = (t.detach() for t in net.parameters())
    x = torch.randn(4, 5, dtype=F64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0], dtype=F64)
    res = two_stage_linearization(net, x, sigma)
    # Jacobians of affine maps are their matrices: each entry is one product by 1.
    assert torch.equal(res.A, W1.expand(4, -1, -1)) and torch.equal(res.B, W2.expand(4, -1, -1))
    assert torch.allclose(
        res.c1,
        b1.expand(4, -1),
        rtol=0,
        atol=8 * EPS * float((W1.abs() @ x.abs().T).max() + b1.abs().max()),
    )
    assert torch.allclose(
        res.c2,
        b2.expand(4, -1),
        rtol=0,
        atol=8 * EPS * float((W2.abs() @ res.mu3.abs().T).max() + b2.abs().max()),
    )
    var = (sigma**2).expand_as(x)
    mean = affine_relu_affine_mean(x, var, W1, b1, W2, b2)
    cov = affine_relu_affine_covariance(x, var, W1, b1, W2, b2)
    bound = _rounding_bound(res, x)
    assert bool(((res.mean - mean).abs() <= bound).all())
    assert torch.allclose(res.cov, cov, rtol=64 * EPS, atol=64 * EPS * float(cov.abs().max()))


def test_affine_relu_affine_network_agrees_with_monte_carlo():
    """Exact for this network, so Monte Carlo must agree within 5 standard errors
    (see tests/references/test_montecarlo.py for the choice of 5)."""
    net = _ara(seed=2)
    x = torch.randn(2, 5, dtype=F64)
    res = two_stage_linearization(net, x, 0.8)
    mc = monte_carlo_moments(net, x, 0.64, 50_000, seed=4, compute_cov=True)
    assert bool(((res.mean - mc.mean).abs() <= 5 * mc.stderr).all())
    assert bool(((res.cov - mc.cov).abs() <= 5 * mc.cov_stderr).all())


@pytest.mark.parametrize("relu_index", [0, 1, 2])
def test_zero_noise_gives_the_network_output(relu_index):
    """sigma = 0: mu3 = ReLU(F(x)), the network output, and no covariance."""
    net = _lenet_like(seed=1)
    x = torch.rand(2, 2, 4, 4, dtype=F64)
    res = two_stage_linearization(net, x, 0.0, relu_index=relu_index)
    out = net(x).detach()
    assert torch.allclose(res.mean, out, rtol=0, atol=64 * EPS * float(out.abs().max() + 1))
    assert float(res.cov.abs().max()) == 0.0


def test_deeper_relu_uses_the_jacobian_of_the_whole_prefix():
    """At relu_index=1 the pre-activation map is piecewise linear; A x + c1 = F(x) and a
    tiny step along a direction moves F by A times that step (central difference,
    error O(eps / h) = 1e-10 for h = 1e-6 away from kinks)."""
    net = _lenet_like(seed=4)
    x = torch.rand(1, 2, 4, 4, dtype=F64)
    res = two_stage_linearization(net, x, 0.1, relu_index=1, compute_cov=False)
    prefix = net[:5]
    v = torch.randn_like(x)
    h = 1e-6
    diff = (prefix(x + h * v) - prefix(x - h * v)).reshape(1, -1) / (2 * h)
    assert torch.allclose(diff, (res.A @ v.reshape(1, -1, 1)).squeeze(-1), rtol=0, atol=1e-8)
    assert torch.allclose(
        (res.A @ x.reshape(1, -1, 1)).squeeze(-1) + res.c1,
        prefix(x).reshape(1, -1),
        rtol=0,
        atol=1e-13,
    )


@pytest.mark.parametrize(
    "layer", [nn.Tanh(), nn.BatchNorm1d(5), nn.Sequential(nn.Linear(5, 5), nn.GELU())]
)
def test_unsupported_layer_is_named(layer):
    net = nn.Sequential(layer, nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with pytest.raises(
        MomentInputError,
        match=type(layer).__name__ if not isinstance(layer, nn.Sequential) else "GELU",
    ):
        two_stage_linearization(net, torch.zeros(2, 5, dtype=F64), 0.1)


def test_custom_module_and_bad_arguments():
    class Custom(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    x = torch.zeros(2, 5, dtype=F64)
    with pytest.raises(MomentInputError, match="Custom"):
        two_stage_linearization(Custom(), x, 0.1)
    net = _ara()
    with pytest.raises(MomentInputError, match="relu_index"):
        two_stage_linearization(net, x, 0.1, relu_index=1)
    with pytest.raises(MomentInputError, match="sigma"):
        two_stage_linearization(net, x, -0.1)
    dropout = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    with pytest.raises(MomentInputError, match="Dropout"):
        two_stage_linearization(dropout, x, 0.1)
    dropout.eval()
    assert two_stage_linearization(dropout, x, 0.1).mean.shape == (2, 2)


def test_oversized_covariance_asks_for_mean_only(monkeypatch):
    monkeypatch.setattr(linearization, "MAX_COV_ELEMENTS", 10)
    net = _ara()
    x = torch.zeros(1, 5, dtype=F64)
    with pytest.raises(MomentInputError, match="compute_cov"):
        two_stage_linearization(net, x, 0.1)
    assert two_stage_linearization(net, x, 0.1, compute_cov=False).cov is None
