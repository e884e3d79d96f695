"""Tests of momentkit.split: Phi(x) = Omega(ReLU(Upsilon(x))) and the stem's variance.

The split is checked by exact equality of ``omega(relu(upsilon(x)))`` and ``model(x)``
(the same operations in the same order), and by identity of the shared modules.
``Upsilon.variance`` is checked against ``(A * A) v`` with ``A`` the stem's explicit
Jacobian (a dense matrix), in float64, to a few eps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from momentkit.affine import Normalize
from momentkit.errors import MomentInputError
from momentkit.split import Upsilon, split_at_first_relu

EPS64 = torch.finfo(torch.float64).eps


def small_lenet(normalize: bool = True, inplace: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [Normalize([0.4, 0.5], [0.3, 0.2])] if normalize else []
    layers += [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ]
    return nn.Sequential(*layers).double()


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)
    ).double()


class Traced(nn.Module):
    """A custom module: Normalize and conv in a nested Sequential, functional ReLU."""

    def __init__(self, relu: str = "F.relu") -> None:
        super().__init__()
        self.stem = nn.Sequential(Normalize([0.5, 0.4], [0.25, 0.3]), nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1)))
        self.act = nn.ReLU()
        self.head = nn.Linear(3 * 3 * 3, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.relu == "F.relu":
            h = F.relu(h)
        elif self.relu == "torch.relu":
            h = torch.relu(h)
        elif self.relu == "method":
            h = h.relu()
        else:
            h = self.act(h)
        return self.head(torch.flatten(h, 1)) * self.scale


class FlattenStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def check_split(model: nn.Module, x: torch.Tensor) -> tuple[Upsilon, nn.Module]:
    upsilon, omega = split_at_first_relu(model)
    assert isinstance(upsilon, Upsilon) and isinstance(omega, nn.Module)
    with torch.no_grad():
        assert torch.equal(omega(torch.relu(upsilon(x))), model(x))
    # Shared, not copied: every parameter of the halves is a parameter of the model,
    # and together they cover all of them.
    model_params = {id(p) for p in model.parameters()}
    halves = {id(p) for p in (*upsilon.parameters(), *omega.parameters())}
    assert halves == model_params
    return upsilon, omega


# --- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_sequential_conv_stem(normalize: bool) -> None:
    model = small_lenet(normalize=normalize)
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    upsilon, omega = check_split(model, x)
    assert upsilon.affine is model[1 if normalize else 0]
    assert (upsilon.normalize is model[0]) if normalize else upsilon.normalize is None
    assert upsilon.flatten is None
    assert isinstance(omega, nn.Sequential) and len(omega) == 5


def test_sequential_inplace_relu() -> None:
    check_split(small_lenet(inplace=True), torch.rand(3, 2, 6, 6, dtype=torch.float64))


def test_sequential_linear_stem_with_flatten() -> None:
    model = mlp()
    upsilon, _ = check_split(model, torch.rand(5, 3, 4, dtype=torch.float64))
    assert upsilon.flatten is model[0] and upsilon.affine is model[1]


def test_nested_sequential() -> None:
    model = nn.Sequential(
        nn.Sequential(Normalize([0.1], [0.5]), nn.Sequential(nn.Conv2d(1, 2, 3))),
        nn.Sequential(nn.Sequential(nn.ReLU()), nn.Conv2d(2, 2, 3), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    upsilon, _ = check_split(model, torch.rand(3, 1, 6, 6, dtype=torch.float64))
    assert upsilon.affine is model[0][1][0]
    assert upsilon.normalize is model[0][0]


@pytest.mark.parametrize("relu", ["F.relu", "torch.relu", "method", "module"])
def test_traced_module(relu: str) -> None:
    model = Traced(relu).double()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    upsilon, omega = check_split(model, x)
    assert upsilon.normalize is model.stem[0]
    assert upsilon.affine is model.stem[1][0]
    # Omega follows later changes to the parameters (shared, not copied).
    with torch.no_grad():
        model.scale.mul_(-2.0)
        model.head.weight.add_(0.25)
        assert torch.equal(omega(torch.relu(upsilon(x))), model(x))


def test_traced_flatten_then_linear_stem() -> None:
    model = FlattenStem().double()
    upsilon, _ = check_split(model, torch.rand(4, 3, 4, dtype=torch.float64))
    assert upsilon.affine is model.fc1
    assert isinstance(upsilon.flatten, nn.Flatten) and upsilon.flatten.start_dim == 1


def test_sequential_with_custom_stem_module_is_traced() -> None:
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = Normalize([0.3], [0.2])
            self.fc = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(x))

    model = nn.Sequential(Stem(), nn.ReLU(), nn.Linear(4, 2)).double()
    upsilon, _ = check_split(model, torch.rand(6, 5, dtype=torch.float64))
    assert upsilon.affine is model[0].fc and upsilon.normalize is model[0].norm


# --- networks that cannot be split ----------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.ReLU()), "before the first ReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()), "before the first ReLU"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()), "before the first ReLU"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), "before the first ReLU"),
        (nn.Sequential(Normalize([0.0], [1.0]), nn.ReLU()), "before the first ReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "no nn.ReLU"),
        (nn.Sequential(nn.Flatten(0), nn.Linear(4, 4), nn.ReLU()), "batch dimension"),
        (nn.Sequential(nn.Linear(4, 4), Normalize([0.0], [1.0]), nn.ReLU()),
         "before the first ReLU"),
    ],
)
def test_sequential_stem_errors(model: nn.Module, match: str) -> None:
    with pytest.raises(MomentInputError, match=match):
        split_at_first_relu(model)


class InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) + x)


class PreActivationSkip(InputSkip):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.fc1(x)
        return self.fc2(torch.relu(pre) + pre)


class NormalizedSkip(InputSkip):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize([0.0], [2.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        return self.fc2(torch.relu(self.fc1(z)) * z)


class TwoLinears(InputSkip):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.fc1(x))))


class BatchNormFirst(InputSkip):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.bn(x))))


class NoReLU(InputSkip):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ScaledPreActivation(InputSkip):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(2.0 * self.fc1(x)))


class ControlFlow(InputSkip):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc2(F.relu(self.fc1(x)))
        return self.fc2(F.relu(-self.fc1(x)))


class TwoInputs(InputSkip):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) + y


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (InputSkip(), "the input reaches the rest of the network other than through"),
        (PreActivationSkip(), "pre-activation 'fc1'.*other than through the first ReLU"),
        (NormalizedSkip(), "normalized input 'norm'.*other than through the first ReLU"),
        (TwoLinears(), "before the first ReLU"),
        (BatchNormFirst(), "before the first ReLU"),
        (ScaledPreActivation(), "applied to 'mul'"),
        (NoReLU(), "no ReLU"),
        (ControlFlow(), "torch.fx cannot trace"),
        (TwoInputs(), "exactly one input"),
    ],
)
def test_traced_errors(model: nn.Module, match: str) -> None:
    with pytest.raises(MomentInputError, match=match):
        split_at_first_relu(model)


def test_not_a_module() -> None:
    with pytest.raises(MomentInputError, match="model"):
        split_at_first_relu(lambda x: x)  # type: ignore[arg-type]


def test_upsilon_rejects_bad_parts() -> None:
    with pytest.raises(MomentInputError, match="affine"):
        Upsilon(nn.BatchNorm1d(3))  # type: ignore[arg-type]
    with pytest.raises(MomentInputError, match="normalize"):
        Upsilon(nn.Linear(3, 2), normalize=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(MomentInputError, match="flatten"):
        Upsilon(nn.Linear(3, 2), flatten=nn.Flatten(0))


# --- the stem's variance (Eq. 5) -----------------------------------------------------------


def dense_jacobian(upsilon: Upsilon, x0: torch.Tensor) -> torch.Tensor:
    """``A`` with ``upsilon(x).flatten() = A x.flatten() + c`` (one image ``x0``)."""
    jac = jacobian(lambda t: upsilon(t.unsqueeze(0)).flatten(), x0, vectorize=True)
    return jac.reshape(jac.shape[0], -1)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (small_lenet(), (2, 6, 6)),
        (small_lenet(normalize=False), (2, 6, 6)),
        (mlp(), (3, 4)),
        (Traced().double(), (2, 6, 6)),
    ],
)
def test_variance_equals_squared_jacobian(model: nn.Module, shape: tuple) -> None:
    torch.manual_seed(0)
    upsilon, _ = split_at_first_relu(model)
    x0 = torch.rand(shape, dtype=torch.float64)
    a = dense_jacobian(upsilon, x0)
    var = torch.rand(3, *shape, dtype=torch.float64) ** 2  # three images, any variances
    expected = var.flatten(1) @ (a * a).T
    got = upsilon.variance(var)
    assert got.shape[0] == 3
    # Sums of at most ~20 positive terms: a few eps relative.
    torch.testing.assert_close(got.flatten(1), expected, rtol=16 * EPS64, atol=0.0)
    # A single variance image gives the first row, broadcastable over a batch.
    torch.testing.assert_close(
        upsilon.variance(var[:1]).flatten(1), expected[:1], rtol=16 * EPS64, atol=0.0
    )


class _InPlaceReLU(nn.Module):
    """``h = fc1(x)``, then an in-place ReLU on ``h``, then a later use of ``h``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.act = nn.ReLU(inplace=True)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.form == "method":
            h.relu_()
        elif self.form == "functional":
            F.relu(h, inplace=True)
        elif self.form == "torch":
            torch.relu_(h)
        else:
            self.act(h)
        return self.fc2(h) + h.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("form", ["method", "functional", "torch", "module"])
def test_in_place_relu_followed_by_a_use_splits(form: str) -> None:
    """``h.relu_(); fc2(h)``: ``h`` after the ReLU is the ReLU's output, not a skip
    connection of the pre-activation (it used to be refused as one)."""
    model = _InPlaceReLU(form)
    upsilon, omega = split_at_first_relu(model)
    x = torch.randn(6, 4)
    assert upsilon.affine is model.fc1
    assert torch.equal(omega(torch.relu(upsilon(x))), model(x))


def test_use_of_the_pre_activation_before_an_in_place_relu_is_a_skip() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 5)
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            before = h * 2.0
            h.relu_()
            return self.fc2(h + before)

    with pytest.raises(MomentInputError, match="skip connection"):
        split_at_first_relu(Skip())
