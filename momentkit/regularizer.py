"""The analytic moment regularizer: expected prediction ``Omega(mu3)`` and the Eq. 3 loss.

With the network split at its first ReLU, ``Phi(x) = Omega(ReLU(Upsilon(x)))``
(:mod:`momentkit.split`), and independent Gaussian input noise
``n ~ N(0, Diag(sigma_x^2))``, the paper approximates the expected prediction by
(Eq. 4)

    E[Phi(x + n)] ~= Omega(mu3),  mu3 = T(mu2, s2),  mu2 = Upsilon(x),
    s2^2 = (A * A) sigma_x^2                                           (Eq. 5)

where ``T(mu, s) = mu Phi(mu / s) + s phi(mu / s)`` is the mean of a rectified
Gaussian (Eq. 1, :func:`momentkit.relu.relu_mean`). The training loss is (Eq. 3)

    CE(Phi(x), y) + alpha * CE(Omega(mu3), y).

``sigma_x`` is a standard deviation in pixel units; a network that normalizes its
input carries :class:`momentkit.affine.Normalize` first and the variance reaching the
first layer is ``sigma_x^2 / std_c^2``, computed here.

Cost: one pass through ``Upsilon`` (shared), two passes through ``Omega`` (on
``ReLU(mu2)`` and on ``mu3``), elementwise work for ``T``, and, for a scalar or
per-channel ``sigma_x``, the variance ``s2^2`` of a single ``(1, C, H, W)`` variance
image broadcast over the batch (it is the same for every image; a per-image
``sigma_x`` costs one more convolution of the batch).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from momentkit.errors import MomentInputError
from momentkit.relu import relu_mean
from momentkit.split import Upsilon, split_at_first_relu

__all__ = [
    "ExpectedPrediction",
    "MomentRegularizedLoss",
    "expected_prediction",
    "input_variance",
    "moment_regularized_loss",
]

SigmaLike = float | torch.Tensor


class ExpectedPrediction(NamedTuple):
    """``output = Phi(x)`` and ``surrogate = Omega(mu3) ~= E[Phi(x + n)]``, both ``(N, ...)``."""

    output: torch.Tensor
    surrogate: torch.Tensor


# model -> (identity fingerprint, upsilon, omega). Keys are weak so that the cache
# never keeps a model alive; the fingerprint holds the submodules, parameters and
# buffers (never the model itself), so replacing a layer or moving the model to
# another device, which replaces buffers, triggers a new split.
_SPLITS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Upsilon, nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def _fingerprint(model: nn.Module) -> tuple:
    submodules = tuple(m for m in model.modules() if m is not model)
    return submodules + tuple(model.parameters()) + tuple(model.buffers())


def _cached_split(model: nn.Module) -> tuple[Upsilon, nn.Module]:
    if not isinstance(model, nn.Module):
        raise MomentInputError(f"model: expected an nn.Module, got {type(model).__name__}")
    fingerprint = _fingerprint(model)
    entry = _SPLITS.get(model)
    if entry is not None:
        old, upsilon, omega = entry
        same = len(old) == len(fingerprint) and all(
            a is b for a, b in zip(old, fingerprint, strict=True)
        )
        if same:
            return upsilon, omega
    upsilon, omega = split_at_first_relu(model)
    _SPLITS[model] = (fingerprint, upsilon, omega)
    return upsilon, omega


def _check_sigma_values(sigma: SigmaLike, name: str = "sigma") -> torch.Tensor:
    """``sigma`` as a tensor, checked to be real, finite and non-negative."""
    try:
        # Python numbers go through float64 so that float64 work sees them exactly.
        sigma_t = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(
            sigma, dtype=torch.float64
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MomentInputError(f"{name}: expected a number or a tensor, got {sigma!r}") from exc
    if not (sigma_t.is_floating_point() or sigma_t.dtype in (torch.int32, torch.int64)):
        raise MomentInputError(f"{name}: expected real numbers, got dtype {sigma_t.dtype}")
    if sigma_t.numel() and not bool(torch.isfinite(sigma_t).all()):
        raise MomentInputError(f"{name}: must be finite, got NaN or infinity")
    if sigma_t.numel() and bool((sigma_t < 0).any()):
        raise MomentInputError(f"{name}: a standard deviation must be >= 0, got a negative value")
    return sigma_t


def input_variance(sigma: SigmaLike, x: torch.Tensor) -> torch.Tensor:
    """The input noise variance ``sigma_x^2`` as a tensor broadcastable against ``x``.

    ``sigma`` (pixel units) is a scalar (float or 0-d tensor), per channel (shape
    ``(C,)`` with ``C = x.shape[1]``), per input element (``x.shape[1:]``), or per
    element of every image (``x.shape``). The result has shape ``(1, *x.shape[1:])``
    in the first three cases (one variance image shared by the batch) and ``x.shape``
    in the last; dtype and device of ``x``.

    Raises:
        MomentInputError: ``sigma`` is negative, NaN, infinite, not real or of another
            shape; ``x`` has fewer than 2 dimensions or is not floating point.
    """
    _check_batch(x)
    sigma_t = _check_sigma_values(sigma).to(dtype=x.dtype, device=x.device)
    var = sigma_t * sigma_t
    one_image = (1, *x.shape[1:])
    if var.dim() == 0:
        return var.expand(one_image)
    if var.shape == (x.shape[1],):
        return var.view(1, -1, *([1] * (x.dim() - 2))).expand(one_image)
    if var.shape == x.shape[1:]:
        return var.unsqueeze(0)
    if var.shape == x.shape:
        return var
    raise MomentInputError(
        f"sigma: shape {tuple(var.shape)} is none of () (scalar), ({x.shape[1]},) (per "
        f"channel), {tuple(x.shape[1:])} (per element) or {tuple(x.shape)} (per element "
        "of every image)"
    )


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise MomentInputError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise MomentInputError(
            f"x: expected a batch (N, ...) with at least 2 dimensions, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise MomentInputError(f"x: expected a floating point tensor, got dtype {x.dtype}")


MOMENTS = ("first_relu", "network")


def _network_surrogate(model: nn.Module, x: torch.Tensor, sigma: SigmaLike, moments: str):
    """``moments="network"``: the output mean of :func:`momentkit.network_moments` in its
    ``"diagonal"`` mode (every layer, independent units; about two forward passes)."""
    if moments not in MOMENTS:
        raise MomentInputError(f"moments: expected one of {MOMENTS}, got {moments!r}")
    from momentkit.network import network_moments  # the network package imports this one

    return ExpectedPrediction(
        model(x), network_moments(model, x, sigma, covariance="diagonal").mean
    )


def expected_prediction(
    model: nn.Module, x: torch.Tensor, sigma: SigmaLike, moments: str = "first_relu"
) -> ExpectedPrediction:
    """``Phi(x)`` and the expected-prediction surrogate ``Omega(mu3)`` (Eq. 4) in one call.

    ``mu2 = Upsilon(x)`` is computed once and shared: ``Phi(x) = Omega(ReLU(mu2))`` and
    ``Omega(mu3)`` with ``mu3 = relu_mean(mu2, s2^2)``, ``s2^2`` the variance of the
    pre-activation under input noise of standard deviation ``sigma`` (see
    :func:`input_variance` for the accepted shapes; Eq. 5 through
    :meth:`Upsilon.variance`). The split of ``model`` is computed once and cached
    (and recomputed when a submodule, parameter or buffer of ``model`` is replaced).
    ``Omega`` runs twice: a module with batch statistics in training mode (BatchNorm)
    sees the two batches separately and updates its running statistics twice.

    Args:
        model: a network with an affine stem before its first ReLU
            (:func:`momentkit.split.split_at_first_relu`).
        x: input batch ``(N, ...)`` in pixel units.
        sigma: pixel-space noise standard deviation, >= 0.
        moments: ``"first_relu"`` (the paper's ``Omega(mu3)``) or ``"network"`` (the
            mean of every layer's moments, :func:`momentkit.network_moments` with
            ``covariance="diagonal"``; no split needed).

    Returns:
        ``ExpectedPrediction(output, surrogate)``, each of the network's output shape.
        With ``sigma = 0`` the two are equal exactly. Differentiable in the parameters
        (and in ``sigma`` if it is a tensor that requires grad).

    Raises:
        MomentInputError: bad ``sigma`` or ``x`` (:func:`input_variance`), or a
            network that cannot be split (:func:`~momentkit.split.split_at_first_relu`).
    """
    if moments != "first_relu":
        return _network_surrogate(model, x, sigma, moments)
    upsilon, omega = _cached_split(model)
    var_in = input_variance(sigma, x)
    pre = upsilon(x)
    pre_var = upsilon.variance(var_in)
    output = omega(torch.relu(pre))
    surrogate = omega(relu_mean(pre, pre_var))
    return ExpectedPrediction(output, surrogate)


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError) as exc:
        raise MomentInputError(f"alpha: expected a number, got {alpha!r}") from exc
    if not (value >= 0 and value != float("inf")):
        raise MomentInputError(f"alpha: must be finite and >= 0, got {alpha!r}")
    return value


def moment_regularized_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: SigmaLike,
    alpha: float,
    moments: str = "first_relu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The regularized training loss of Eq. 3 with the surrogate of Eq. 4.

    ``total = CE(Phi(x), y) + alpha * CE(Omega(mu3), y)`` with the batch-mean cross
    entropy. ``y`` holds class indices ``(N,)`` (or class probabilities, as
    ``F.cross_entropy`` accepts). ``moments`` chooses the surrogate, as in
    :func:`expected_prediction`.

    Returns:
        ``(total, clean_term, moment_term)``, three scalar tensors; ``total`` is the
        one to back-propagate.

    Raises:
        MomentInputError: ``alpha`` negative, NaN or infinite; ``y`` of another batch
            size than ``x``; and everything :func:`expected_prediction` raises.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise MomentInputError(
            f"y: expected labels for the {x.shape[0]} inputs of x, got {shape}"
        )
    output, surrogate = expected_prediction(model, x, sigma, moments)
    clean_term = F.cross_entropy(output, y)
    moment_term = F.cross_entropy(surrogate, y)
    return clean_term + alpha * moment_term, clean_term, moment_term


class MomentRegularizedLoss(nn.Module):
    """Module form of :func:`moment_regularized_loss` with fixed ``sigma`` and ``alpha``.

    ``loss_fn(model, x, y) -> (total, clean_term, moment_term)``. A tensor ``sigma`` is
    kept as a buffer (it follows ``.to(device)``). Values are checked here (negative,
    NaN, infinite raise :class:`MomentInputError`); the shape of ``sigma`` is checked
    against each batch.
    """

    sigma: SigmaLike

    def __init__(self, sigma: SigmaLike, alpha: float, moments: str = "first_relu") -> None:
        super().__init__()
        if moments not in MOMENTS:
            raise MomentInputError(f"moments: expected one of {MOMENTS}, got {moments!r}")
        self.moments = moments
        sigma_t = _check_sigma_values(sigma)
        self.alpha = _check_alpha(alpha)
        if isinstance(sigma, torch.Tensor):
            self.register_buffer("sigma", sigma_t)
        elif sigma_t.dim() == 0:
            self.sigma = float(sigma_t)
        else:
            self.register_buffer("sigma", sigma_t)

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return moment_regularized_loss(model, x, y, self.sigma, self.alpha, self.moments)

    def extra_repr(self) -> str:
        sigma = self.sigma if isinstance(self.sigma, float) else tuple(self.sigma.shape)
        return f"sigma={sigma}, alpha={self.alpha}, moments={self.moments!r}"
