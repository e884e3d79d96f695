"""Tests of momentkit.regularizer: the surrogate Omega(mu3) (Eq. 4) and the Eq. 3 loss.

The independent reference builds everything by hand for every image separately: the
stem's explicit Jacobian ``A`` (a dense matrix, normalization included, by autograd),
the full per-image pixel variance ``sigma_x^2``, ``s2^2 = (A * A) sigma_x^2``, the
closed form ``T(mu, s) = mu Phi(mu/s) + s phi(mu/s)`` written out with
``torch.special``, and ``Omega`` taken from the model's own layers. It agrees with
:func:`expected_prediction` to a few eps of float64.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

import momentkit.regularizer as regularizer
from momentkit.affine import Normalize
from momentkit.errors import MomentInputError
from momentkit.regularizer import (
    MomentRegularizedLoss,
    expected_prediction,
    input_variance,
    moment_regularized_loss,
)

EPS64 = torch.finfo(torch.float64).eps


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.25]),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 4),
    ).double()


def linear_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        Normalize([0.5], [0.3]), nn.Flatten(), nn.Linear(2 * 5, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


class TracedNet(nn.Module):
    """Not a Sequential: split through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.norm = Normalize([0.3, 0.7], [0.5, 0.2])
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(self.norm(x))), 1))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))

    def omega(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(h, 1))


def stem_and_omega(model: nn.Module):
    """The two halves written out by hand, without momentkit.split."""
    if isinstance(model, TracedNet):
        return model.stem, model.omega
    relu_at = next(i for i, m in enumerate(model) if isinstance(m, nn.ReLU))
    return model[:relu_at], model[relu_at + 1 :]


def rectified_gaussian_mean(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. 1 written out: ``mu Phi(mu/s) + s phi(mu/s)`` (s > 0)."""
    z = mu / s
    return mu * torch.special.ndtr(z) + s * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def reference_surrogate(model: nn.Module, x: torch.Tensor, pixel_var: torch.Tensor):
    """Omega(mu3) image by image, with the stem's dense Jacobian; pixel_var is (N, ...)."""
    stem, omega = stem_and_omega(model)
    outputs = []
    for xi, vi in zip(x, pixel_var, strict=True):
        mu2 = stem(xi.unsqueeze(0))
        jac = jacobian(lambda t, stem=stem: stem(t.unsqueeze(0)).flatten(), xi, vectorize=True)
        a = jac.reshape(jac.shape[0], -1)
        s2 = torch.sqrt((a * a) @ vi.flatten()).view_as(mu2)
        outputs.append(omega(rectified_gaussian_mean(mu2, s2)))
    return torch.cat(outputs)


MODELS = {"conv": (conv_net, (3, 6, 6)), "linear": (linear_net, (2, 5)),
          "traced": (lambda: TracedNet().double(), (2, 6, 6))}


def sigma_cases(shape: tuple) -> dict:
    gen = torch.Generator().manual_seed(3)
    c = shape[0]
    return {
        "float": 0.3,
        "scalar tensor": torch.tensor(0.2, dtype=torch.float64),
        "per channel": 0.05 + 0.5 * torch.rand(c, generator=gen, dtype=torch.float64),
        "per element": 0.05 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64),
        "per image": 0.05 + 0.5 * torch.rand(4, *shape, generator=gen, dtype=torch.float64),
        "large": 20.0,
    }


@pytest.mark.parametrize("case", ["float", "scalar tensor", "per channel", "per element",
                                  "per image", "large"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_surrogate_matches_explicit_computation(name: str, case: str) -> None:
    factory, shape = MODELS[name]
    model = factory()
    x = torch.rand(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sigma = sigma_cases(shape)[case]
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64)
    if case == "per channel":
        sigma_t = sigma_t.view(-1, *([1] * (len(shape) - 1)))
    pixel_var = (sigma_t**2).expand(4, *shape)
    with torch.no_grad():
        output, surrogate = expected_prediction(model, x, sigma)
        expected = reference_surrogate(model, x, pixel_var)
        assert torch.equal(output, model(x))
    # Both sides sum a few hundred products in different orders (conv vs dense matrix,
    # a different but equivalent formula for T): a few eps of the output's scale.
    scale = float(expected.abs().max())
    torch.testing.assert_close(surrogate, expected, rtol=64 * EPS64, atol=64 * EPS64 * scale)
    # The noise matters: the surrogate is not the clean output.
    assert not torch.allclose(surrogate, output, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_sigma_gives_the_clean_output_exactly(name: str) -> None:
    factory, shape = MODELS[name]
    model = factory()
    x = torch.rand(5, *shape, dtype=torch.float64)
    for sigma in (0.0, torch.zeros(shape[0], dtype=torch.float64)):
        output, surrogate = expected_prediction(model, x, sigma)
        assert torch.equal(surrogate, output)
        assert torch.equal(output, model(x))


def test_float32_agrees_with_float64() -> None:
    model = conv_net()
    x = torch.rand(6, 3, 6, 6, dtype=torch.float64)
    _, expected = expected_prediction(model, x, 0.25)
    _, got = expected_prediction(model.float(), x.float(), 0.25)
    assert got.dtype == torch.float32
    # Float32 rounding through three layers of ~50-term sums.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_input_variance_is_one_image_for_shared_sigma() -> None:
    x = torch.rand(7, 3, 5, 4, dtype=torch.float64)
    per_channel = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    cases = [
        (0.5, (1, 3, 5, 4)),
        (per_channel, (1, 3, 5, 4)),
        (torch.rand(3, 5, 4), (1, 3, 5, 4)),
        (torch.rand(7, 3, 5, 4), (7, 3, 5, 4)),
    ]
    for sigma, shape in cases:
        var = input_variance(sigma, x)
        assert var.shape == shape and var.dtype == x.dtype
    var = input_variance(per_channel, x)
    torch.testing.assert_close(var[0, :, 2, 1], per_channel**2, rtol=0, atol=0)
    assert float(input_variance(0.1, x)[0, 0, 0, 0]) == 0.1 * 0.1


# --- the loss -------------------------------------------------------------------------------


def test_loss_terms() -> None:
    model = conv_net()
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    total, clean, moment = moment_regularized_loss(model, x, y, 0.4, 1.5)
    assert torch.equal(clean, F.cross_entropy(model(x), y))
    _, surrogate = expected_prediction(model, x, 0.4)
    assert torch.equal(moment, F.cross_entropy(surrogate, y))
    assert torch.equal(total, clean + 1.5 * moment)
    module_form = MomentRegularizedLoss(0.4, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(module_form(model, x, y),
                                                  (total, clean, moment), strict=True))
    tensor_sigma = MomentRegularizedLoss(torch.full((3,), 0.4, dtype=torch.float64), 1.5)
    assert torch.equal(tensor_sigma(model, x, y)[0], total)
    assert "sigma" in dict(tensor_sigma.named_buffers())


def test_loss_gradcheck_in_float64() -> None:
    torch.manual_seed(5)
    x = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    sigma = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    conv, fc = nn.Conv2d(1, 2, 2).double(), nn.Linear(8, 3).double()
    params = tuple(
        p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias, fc.weight, fc.bias)
    )

    def loss(w1, b1, w2, b2, x_in, s):
        # A network whose weights are the gradcheck inputs (plain tensor attributes).
        for layer, name, value in ((conv, "weight", w1), (conv, "bias", b1),
                                   (fc, "weight", w2), (fc, "bias", b2)):
            layer._parameters.pop(name, None)
            setattr(layer, name, value)
        model = nn.Sequential(Normalize([0.5], [0.5]), conv, nn.ReLU(), nn.Flatten(), fc)
        return moment_regularized_loss(model, x_in, y, s, 0.7)[0]

    # Derivatives in the parameters and in sigma; x is a constant (requires_grad=False).
    assert torch.autograd.gradcheck(loss, (*params, x, sigma))


def test_split_is_cached_and_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = regularizer._split

    def counting(model, fn):
        calls.append(model)
        return real(model, fn)

    monkeypatch.setattr(regularizer, "_split", counting)
    model = conv_net()
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    for _ in range(3):
        expected_prediction(model, x, 0.1)
    assert len(calls) == 1
    # Replacing a layer re-splits, and the new layer is used.
    model[7] = nn.Linear(5 * 3 * 3, 4).double()
    output, _ = expected_prediction(model, x, 0.1)
    assert len(calls) == 2
    assert torch.equal(output, model(x))
    # The cache never keeps a model alive. (Counting cache entries would race with other
    # tests' models being collected at the same time; a weak reference cannot.)
    alive = weakref.ref(model)
    assert alive() in regularizer._SPLITS
    del model, calls[:]
    gc.collect()
    assert alive() is None


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma",
    [-0.1, float("nan"), float("inf"), torch.tensor([0.1, -0.2, 0.3]), torch.rand(2),
     torch.rand(3, 5), torch.tensor(True), "0.1"],
)
def test_bad_sigma_raises_naming_it(sigma) -> None:
    model = conv_net()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(MomentInputError, match="sigma"):
        expected_prediction(model, x, sigma)


def test_bad_alpha_y_and_x_raise_naming_them() -> None:
    model = conv_net()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1])
    for alpha in (-1.0, float("nan"), float("inf"), "a"):
        with pytest.raises(MomentInputError, match="alpha"):
            moment_regularized_loss(model, x, y, 0.1, alpha)
    with pytest.raises(MomentInputError, match="y"):
        moment_regularized_loss(model, x, torch.tensor([0, 1, 2]), 0.1, 1.0)
    with pytest.raises(MomentInputError, match="x"):
        expected_prediction(model, torch.rand(3, dtype=torch.float64), 0.1)
    with pytest.raises(MomentInputError, match="x"):
        expected_prediction(model, torch.ones(2, 3, 6, 6, dtype=torch.long), 0.1)
    with pytest.raises(MomentInputError, match="sigma"):
        MomentRegularizedLoss(-0.5, 1.0)
    with pytest.raises(MomentInputError, match="alpha"):
        MomentRegularizedLoss(0.5, -1.0)
    with pytest.raises(MomentInputError, match="model"):
        expected_prediction(nn.Sequential(nn.Tanh()), x, 0.1)
