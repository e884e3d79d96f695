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

from momentkit._validate import check_batch, check_scalar, check_sigma_tensor, compute_dtype
from momentkit.errors import MomentInputError
from momentkit.relu import relu_mean
from momentkit.split import Upsilon, _split

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


def _cached_split(
    model: nn.Module, fn: str = "expected_prediction"
) -> tuple[Upsilon, nn.Module]:
    if not isinstance(model, nn.Module):
        raise MomentInputError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    fingerprint = _fingerprint(model)
    entry = _SPLITS.get(model)
    if entry is not None:
        old, upsilon, omega = entry
        same = len(old) == len(fingerprint) and all(
            a is b for a, b in zip(old, fingerprint, strict=True)
        )
        if same:
            return upsilon, omega
    upsilon, omega = _split(model, fn)
    _SPLITS[model] = (fingerprint, upsilon, omega)
    return upsilon, omega


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
    return _input_variance(sigma, x, "input_variance")


def _input_variance(
    sigma: SigmaLike, x: torch.Tensor, fn: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`input_variance` with errors naming ``fn``, in ``dtype`` (default x's)."""
    check_batch(x, fn)
    sigma_t = check_sigma_tensor(sigma, fn).to(dtype=dtype or x.dtype, device=x.device)
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
        f"{fn}: sigma of shape {tuple(var.shape)} is none of () (scalar), ({x.shape[1]},) (per "
        f"channel), {tuple(x.shape[1:])} (per element) or {tuple(x.shape)} (per element "
        "of every image)"
    )


MOMENTS = ("first_relu", "network")
"""The ``moments`` choices of the surrogate: the paper's first-ReLU split, or every layer."""


def _network_surrogate(model: nn.Module, x: torch.Tensor, sigma: SigmaLike, moments: str,
                       fn: str) -> ExpectedPrediction:
    """``moments="network"``: the output mean of :func:`momentkit.network_moments` in its
    ``"diagonal"`` mode (every layer, independent units)."""
    if moments not in MOMENTS:
        raise MomentInputError(f"{fn}: moments must be one of {MOMENTS}, got {moments!r}")
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

    Precision: both outputs have the model's dtype; for a float16 or bfloat16 model
    the noise variance and ``mu3`` are computed in float32 and ``mu3`` is rounded once
    to the model's dtype before ``Omega``.

    Raises:
        MomentInputError: bad ``sigma`` or ``x`` (:func:`input_variance`); NaN or
            infinity in ``x``; a network that cannot be split
            (:func:`~momentkit.split.split_at_first_relu`); a non-finite pre-activation
            or output, naming the model parameter that holds NaN or infinity (a
            diverged training run) or, when all are finite, saying which quantity
            overflowed. No NaN is ever returned. Messages start with the name of the
            function called (``expected_prediction`` or ``moment_regularized_loss``).
    """
    return _expected_prediction(model, x, sigma, "expected_prediction", moments)


def _nonfinite_error(model: nn.Module, what: str, dtype: torch.dtype, fn: str):
    """The error for a non-finite ``what``: the first non-finite parameter or buffer of
    ``model`` by name, else an overflow of ``dtype``."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            return MomentInputError(
                f"{fn}: {what} is not finite because the model's {name!r} contains {kind} "
                "(a diverged training run?)"
            )
    return MomentInputError(
        f"{fn}: {what} overflows {dtype} although x and the model's parameters are finite"
    )


def _expected_prediction(
    model: nn.Module, x: torch.Tensor, sigma: SigmaLike, fn: str, moments: str = "first_relu"
) -> ExpectedPrediction:
    """:func:`expected_prediction` with errors naming ``fn``."""
    if moments != "first_relu":
        return _network_surrogate(model, x, sigma, moments, fn)
    upsilon, omega = _cached_split(model, fn)
    work = compute_dtype(x.dtype) if isinstance(x, torch.Tensor) else None
    var_in = _input_variance(sigma, x, fn, dtype=work)
    pre = upsilon(x)
    pre_var = upsilon._variance(var_in)
    flags = torch.stack(
        [torch.isfinite(x).all(), torch.isfinite(pre).all(), torch.isfinite(pre_var).all()]
    ).tolist()
    if not flags[0]:
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise MomentInputError(f"{fn}: x contains {kind}")
    if not flags[1]:
        raise _nonfinite_error(upsilon, "the first layer's output Upsilon(x)", pre.dtype, fn)
    if not flags[2]:
        raise _nonfinite_error(upsilon, "the pre-activation variance", pre_var.dtype, fn)
    output = omega(torch.relu(pre))
    mu3 = relu_mean(pre.to(work), pre_var).to(pre.dtype)
    surrogate = omega(mu3)
    if not bool(torch.isfinite(output).all() & torch.isfinite(surrogate).all()):
        raise _nonfinite_error(model, "the network's output", output.dtype, fn)
    return ExpectedPrediction(output, surrogate)


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
            size than ``x``; an empty batch (its mean loss is undefined); and everything
            :func:`expected_prediction` raises, named as coming from this function.
    """
    fn = "moment_regularized_loss"
    alpha = check_scalar(alpha, "alpha", fn)
    check_batch(x, fn)
    if x.shape[0] == 0:
        raise MomentInputError(f"{fn}: x is an empty batch; its mean loss is undefined")
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise MomentInputError(
            f"{fn}: y must hold labels for the {x.shape[0]} inputs of x, got {shape}"
        )
    output, surrogate = _expected_prediction(model, x, sigma, fn, moments)
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
        """Fix ``sigma`` (pixel-space noise std), ``alpha`` (weight of the moment term) and
        ``moments`` (``"first_relu"``, the paper's surrogate, or ``"network"``)."""
        super().__init__()
        if moments not in MOMENTS:
            raise MomentInputError(
                f"MomentRegularizedLoss: moments must be one of {MOMENTS}, got {moments!r}"
            )
        self.moments = moments
        sigma_t = check_sigma_tensor(sigma, "MomentRegularizedLoss")
        self.alpha = check_scalar(alpha, "alpha", "MomentRegularizedLoss")
        if isinstance(sigma, torch.Tensor):
            self.register_buffer("sigma", sigma_t)
        elif sigma_t.dim() == 0:
            self.sigma = float(sigma_t)
        else:
            self.register_buffer("sigma", sigma_t)

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, clean, moment)``: :func:`moment_regularized_loss` of ``model`` on a batch."""
        return moment_regularized_loss(model, x, y, self.sigma, self.alpha, self.moments)

    def extra_repr(self) -> str:
        """``sigma=..., alpha=...`` for ``repr`` (a tensor ``sigma`` by its shape)."""
        sigma = self.sigma if isinstance(self.sigma, float) else tuple(self.sigma.shape)
        return f"sigma={sigma}, alpha={self.alpha}, moments={self.moments!r}"
