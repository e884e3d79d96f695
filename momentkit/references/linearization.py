"""Two-stage linearization of a deep network around a ReLU layer (Bibi et al., CVPR 2018).

Write the network as ``Phi = R o ReLU o F`` split at its ``k``-th ReLU: ``F`` maps the
input to that ReLU's pre-activation and ``R`` is the rest of the network. For input
noise ``x + n``, ``n ~ N(0, Sigma_x)`` with ``Sigma_x = Diag(sigma^2)`` (pixel units):

1. linearize ``F`` at ``x``: ``A = dF/dx (x)``, ``c1 = F(x) - A x``, so that
   ``mu2 = A x + c1 = F(x)`` and ``Sigma2 = A Sigma_x A^T``;
2. ``mu3 = T(mu2, s2)`` with ``s2 = sqrt(diag(Sigma2))`` (paper Eq. 1);
3. linearize ``R`` at ``mu3``: ``B = dR/dh (mu3)``, ``c2 = R(mu3) - B mu3``;
4. apply Theorem 1 to ``g(x) = B ReLU(A x + c1) + c2``: the mean ``B mu3 + c2`` and the
   covariance ``B Cov[ReLU(h)] B^T``, ``h ~ N(mu2, Sigma2)``, with the exact ReLU
   covariance of :func:`momentkit.relu.relu_covariance`.

For ``k = 0`` (the first ReLU), ``F`` is affine, so ``A`` and ``c1`` are exact and the
mean equals the regularizer's surrogate ``Omega(mu3)`` up to rounding; for an
Affine-ReLU-Affine network both stages are exact and the result is Theorem 1 itself.

Jacobians are explicit, computed with :func:`torch.func.vmap` over the batch of
:func:`torch.func.jacfwd` (when the map has fewer inputs than outputs) or
:func:`torch.func.jacrev`. That is the memory-expensive reference the paper avoids:
``A`` is ``p x n`` and the covariance needs a ``p x p`` matrix per point.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jacfwd, jacrev, vmap

from momentkit._validate import check_count, check_finite
from momentkit.affine import Normalize
from momentkit.errors import MomentInputError
from momentkit.regularizer import SigmaLike, _input_variance
from momentkit.relu import relu_mean
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean

__all__ = ["SUPPORTED_LAYERS", "LinearizationResult", "two_stage_linearization"]

#: Leaf modules the linearization can differentiate through. ``nn.Dropout`` is only
#: accepted in eval mode (it is then the identity).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    Normalize,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)

#: Largest ``N * p * p`` covariance (in elements) built before asking for
#: ``compute_cov=False`` (2**28 float64 values = 2 GiB).
MAX_COV_ELEMENTS = 2**28


@dataclass(frozen=True)
class LinearizationResult:
    """The linearized network and its output moments, for ``N`` input points.

    Attributes:
        A: ``(N, p, n)`` Jacobian of the chosen ReLU's pre-activation at ``x``
            (``n`` input values, ``p`` pre-activation values).
        c1: ``(N, p)`` so that ``A x + c1`` is the pre-activation at ``x``.
        B: ``(N, d, p)`` Jacobian of the rest of the network at ``mu3``.
        c2: ``(N, d)`` so that ``B mu3 + c2`` is the rest of the network at ``mu3``.
        mu3: ``(N, p)`` ``E[ReLU(h)]`` for ``h ~ N(mu2, Sigma2)`` (Eq. 1).
        mean: ``(N, d)`` Theorem 1 mean of the linearized network.
        cov: ``(N, d, d)`` its output covariance, or ``None`` (``compute_cov=False``).
    """

    A: torch.Tensor
    c1: torch.Tensor
    B: torch.Tensor
    c2: torch.Tensor
    mu3: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor | None


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
        return
    if type(module) not in SUPPORTED_LAYERS:
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise MomentInputError(
            f"two_stage_linearization: model: cannot linearize layer {prefix or '<model>'} of type "
            f"{type(module).__name__}; two_stage_linearization takes an nn.Sequential "
            f"(nesting allowed) of {names}"
        )
    if isinstance(module, nn.Dropout) and module.training:
        raise MomentInputError(
            f"two_stage_linearization: model: layer {prefix} is a Dropout in training mode "
            "(random); call model.eval()"
        )
    yield prefix, module


def _jacobian(fn: nn.Module, points: torch.Tensor, n_out: int) -> torch.Tensor:
    """``(N, n_out, n_in)`` Jacobians of the flattened ``fn`` at each point."""

    def single(v: torch.Tensor) -> torch.Tensor:
        return fn(v.unsqueeze(0)).reshape(-1)

    n_in = points[0].numel()
    jac = jacfwd(single) if n_in < n_out else jacrev(single)
    return vmap(jac)(points).reshape(points.shape[0], n_out, n_in)


def two_stage_linearization(
    model: nn.Module,
    x: torch.Tensor,
    sigma: SigmaLike,
    relu_index: int = 0,
    *,
    compute_cov: bool = True,
) -> LinearizationResult:
    """The two-stage linearization of Bibi et al. (CVPR 2018) at the ``relu_index``-th ReLU.

    See the module docstring for the formulas. Works in the dtype of ``x`` (use
    float64 for reference values); the mean is the Theorem 1 mean of the linearized
    network, exact for that network to a few rounding errors.

    Args:
        model: an ``nn.Sequential`` (nested ones are flattened) of the layers in
            :data:`SUPPORTED_LAYERS`, in eval mode where that matters.
        x: ``(N, *in_shape)`` points in pixel units.
        sigma: input noise standard deviation in pixel units: a scalar, per channel
            ``(C,)``, per element ``in_shape`` or per element of every point
            ``x.shape`` (the regularizer's convention,
            :func:`momentkit.regularizer.input_variance`).
        relu_index: which ReLU (0 = the first) to linearize around.
        compute_cov: also compute the ``(N, d, d)`` output covariance (needs a
            ``p x p`` matrix per point).

    Returns:
        :class:`LinearizationResult`.

    Raises:
        MomentInputError: a layer that is not supported, a model that is not a
            Sequential, ``relu_index`` out of range, bad ``x`` or ``sigma``, or a
            covariance larger than :data:`MAX_COV_ELEMENTS` with ``compute_cov``.
    """
    fn = "two_stage_linearization"
    if not isinstance(model, nn.Module):
        raise MomentInputError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    layers = list(_leaves(model, ""))
    relus = [i for i, (_, m) in enumerate(layers) if isinstance(m, nn.ReLU)]
    relu_index = check_count(relu_index, "relu_index", fn, minimum=0)
    if relu_index >= len(relus):
        raise MomentInputError(
            f"{fn}: relu_index {relu_index} is out of range; the model has {len(relus)} "
            "ReLU layers"
        )
    var_in = _input_variance(sigma, x, fn).expand_as(x).reshape(x.shape[0], -1)
    check_finite(x, "x", fn)
    cut = relus[relu_index]
    pre = nn.Sequential(*(m for _, m in layers[:cut]))
    rest = nn.Sequential(*(m for _, m in layers[cut + 1 :]))
    N = x.shape[0]
    x_flat = x.reshape(N, -1)
    with torch.no_grad():  # torch.func transforms ignore this; it only drops the graph
        return _linearize(pre, rest, x, x_flat, var_in, compute_cov)


def _linearize(
    pre: nn.Module,
    rest: nn.Module,
    x: torch.Tensor,
    x_flat: torch.Tensor,
    var_in: torch.Tensor,
    compute_cov: bool,
) -> LinearizationResult:
    N = x.shape[0]
    mu2_full = pre(x)
    mu2 = mu2_full.reshape(N, -1)
    p = mu2.shape[1]
    A = _jacobian(pre, x, p)
    c1 = mu2 - (A @ x_flat.unsqueeze(-1)).squeeze(-1)
    s2_sq = (A * A) @ var_in.unsqueeze(-1)
    mu3 = relu_mean(mu2, s2_sq.squeeze(-1)).to(x.dtype)
    mu3_full = mu3.reshape(mu2_full.shape)
    out = rest(mu3_full).reshape(N, -1)
    d = out.shape[1]
    B = _jacobian(rest, mu3_full, d)
    c2 = out - (B @ mu3.unsqueeze(-1)).squeeze(-1)

    # Theorem 1 (and the covariance) of the linearized network, one point at a time:
    # every point has its own A, c1, B, c2.
    mean = torch.stack(
        [affine_relu_affine_mean(x_flat[i], var_in[i], A[i], c1[i], B[i], c2[i]) for i in range(N)]
    )
    cov = None
    if compute_cov:
        if N * p * p > MAX_COV_ELEMENTS:
            raise MomentInputError(
                f"two_stage_linearization: compute_cov: the pre-activation covariance would "
                f"hold {N} x {p} x {p} values (limit {MAX_COV_ELEMENTS}); pass "
                "compute_cov=False for the mean only"
            )
        cov = torch.stack(
            [
                affine_relu_affine_covariance(x_flat[i], var_in[i], A[i], c1[i], B[i], c2[i])
                for i in range(N)
            ]
        )
    return LinearizationResult(A=A, c1=c1, B=B, c2=c2, mu3=mu3, mean=mean, cov=cov)
