"""Affine-ReLU-Affine networks ``g(x) = B ReLU(A x + c1) + c2`` under Gaussian input.

Theorem 1 of the paper (Bibi et al. CVPR 2018): for ``x ~ N(mu_x, Sigma_x)``,
``E[g(x)] = B T(mu2, s2) + c2`` with ``mu2 = A mu_x + c1`` and
``s2 = sqrt(diag(A Sigma_x A^T))``; exact. The output covariance is
``B Cov[ReLU(A x + c1)] B^T`` with the exact ReLU covariance of
:func:`momentkit.relu.relu_covariance` (exact up to the bivariate normal cdf's
accuracy, about 1e-15 relative to ``s_i s_j``).

Shapes: ``A`` ``(h, n)``, ``c1`` ``(h,)``, ``B`` ``(d, h)``, ``c2`` ``(d,)``;
``mean_x`` ``(..., n)``; ``cov_x`` diagonal ``(..., n)`` or full ``(..., n, n)``.

Precision: results have the dtype of ``mean_x`` and ``cov_x`` promoted; the weights
are cast to it; float16 and bfloat16 are computed in float32 and rounded once to the
input dtype.

Errors (both functions) are :class:`~momentkit.errors.MomentInputError` naming the
function and the argument: mismatched shapes; NaN or infinity in ``mean_x``, ``cov_x``
or the weights (an infinite mean or spread is not a Gaussian); a negative variance; a
full ``cov_x`` that is not symmetric or not positive semi-definite beyond rounding
(smallest eigenvalue below ``-65 n eps max(diag)`` in float32 and float64, see
``momentkit._validate``); a pre-activation or output that overflows the dtype although
the input is finite. No hidden units (``h = 0``) give the exact answer (``c2``, a zero
covariance); an empty batch gives an empty result.
"""

from __future__ import annotations

import torch

from momentkit._validate import (
    as_float_tensor,
    check_covariance_matrix,
    check_mean_and_spread,
    check_result,
    compute_dtype,
)
from momentkit.affine import _full_cov_through_linear
from momentkit.errors import MomentInputError
from momentkit.relu import relu_covariance, relu_mean


def _check_weights(mean_x, cov_x, A, c1, B, c2, fn: str):
    """Check everything; return ``(diagonal, out_dtype, work_dtype, A, c1, B, c2)`` with
    the weights in the working dtype."""
    diagonal = check_mean_and_spread(mean_x, cov_x, fn, ("mean_x", "cov_x"))
    if mean_x.dim() < 1:
        raise MomentInputError(f"{fn}: mean_x must have shape (..., n), got a scalar")
    n = mean_x.shape[-1]
    out_dtype = torch.promote_types(mean_x.dtype, cov_x.dtype)
    work = compute_dtype(out_dtype)
    A = as_float_tensor(A, "A", fn, like=mean_x, finite=True)
    B = as_float_tensor(B, "B", fn, like=mean_x, finite=True)
    if A.dim() != 2 or A.shape[1] != n:
        raise MomentInputError(f"{fn}: A must have shape (h, {n}), got {tuple(A.shape)}")
    h = A.shape[0]
    if c1 is not None:
        c1 = as_float_tensor(c1, "c1", fn, like=mean_x, finite=True)
        if c1.shape != (h,):
            raise MomentInputError(f"{fn}: c1 must have shape ({h},), got {tuple(c1.shape)}")
    if B.dim() != 2 or B.shape[1] != h:
        raise MomentInputError(f"{fn}: B must have shape (d, {h}), got {tuple(B.shape)}")
    if c2 is not None:
        c2 = as_float_tensor(c2, "c2", fn, like=mean_x, finite=True)
        if c2.shape != (B.shape[0],):
            raise MomentInputError(
                f"{fn}: c2 must have shape ({B.shape[0]},), got {tuple(c2.shape)}"
            )
    A, B = A.to(work), B.to(work)
    c1 = None if c1 is None else c1.to(work)
    c2 = None if c2 is None else c2.to(work)
    return diagonal, out_dtype, work, A, c1, B, c2


def _pre_activation_mean(mean_x, A, c1, fn: str) -> torch.Tensor:
    mu2 = mean_x @ A.T
    if c1 is not None:
        mu2 = mu2 + c1
    return check_result(mu2, "the pre-activation mean A mean_x + c1", fn)


def affine_relu_affine_mean(
    mean_x: torch.Tensor,
    cov_x: torch.Tensor,
    A: torch.Tensor,
    c1: torch.Tensor | None,
    B: torch.Tensor,
    c2: torch.Tensor | None,
) -> torch.Tensor:
    """Theorem 1: ``E[B ReLU(A x + c1) + c2]`` for ``x ~ N(mean_x, cov_x)``; ``(..., d)``.

    Precision and errors: see the module docstring.
    """
    fn = "affine_relu_affine_mean"
    diagonal, out_dtype, work, A, c1, B, c2 = _check_weights(mean_x, cov_x, A, c1, B, c2, fn)
    mean_x, cov_x = mean_x.to(work), cov_x.to(work)
    mu2 = _pre_activation_mean(mean_x, A, c1, fn)
    if diagonal:
        var2 = cov_x @ (A * A).T
    else:
        var2 = torch.diagonal(_full_cov_through_linear(A, cov_x), dim1=-2, dim2=-1)
    var2 = check_result(var2, "the pre-activation variance diag(A cov_x A^T)", fn)
    out = relu_mean(mu2, var2.clamp_min(0.0)) @ B.T
    if c2 is not None:
        out = out + c2
    return check_result(out.to(out_dtype), "the output mean", fn)


def affine_relu_affine_covariance(
    mean_x: torch.Tensor,
    cov_x: torch.Tensor,
    A: torch.Tensor,
    c1: torch.Tensor | None,
    B: torch.Tensor,
    c2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Cov[B ReLU(A x + c1) + c2] = B Cov[ReLU(mu2 + noise)] B^T``; ``(..., d, d)``.

    ``c2`` does not change the covariance and is accepted for symmetry with
    :func:`affine_relu_affine_mean`. The pre-activation covariance ``A cov_x A^T`` is
    formed as the Gram matrix ``(A D)(A D)^T``, ``D = Diag(sqrt(cov_x))``, for a
    diagonal ``cov_x`` (positive semi-definite to rounding by construction) and as
    ``A cov_x A^T`` symmetrized otherwise; its rounding-level negative variances are
    set to 0. Precision and errors: see the module docstring.
    """
    fn = "affine_relu_affine_covariance"
    diagonal, out_dtype, work, A, c1, B, _ = _check_weights(mean_x, cov_x, A, c1, B, c2, fn)
    mean_x, cov_x = mean_x.to(work), cov_x.to(work)
    mu2 = _pre_activation_mean(mean_x, A, c1, fn)
    if diagonal:
        scaled = A * cov_x.sqrt().unsqueeze(-2)  # (..., h, n)
        cov2 = scaled @ scaled.transpose(-1, -2)
        cov2 = 0.5 * (cov2 + cov2.transpose(-1, -2))
    else:
        cov2 = _full_cov_through_linear(A, cov_x)
    diag = torch.diagonal(cov2, dim1=-2, dim2=-1)
    cov2 = cov2 - torch.diag_embed(diag.clamp(max=0.0))
    what = "the pre-activation covariance A cov_x A^T"
    check_result(cov2, what, fn)
    check_covariance_matrix(cov2, fn, what)
    cov_relu = relu_covariance(mu2, cov2)
    out = B @ cov_relu @ B.T
    out = 0.5 * (out + out.transpose(-1, -2))
    return check_result(out.to(out_dtype), "the output covariance", fn)


