"""Affine-ReLU-Affine networks ``g(x) = B ReLU(A x + c1) + c2`` under Gaussian input.

Theorem 1 of the paper (Bibi et al. CVPR 2018): for ``x ~ N(mu_x, Sigma_x)``,
``E[g(x)] = B T(mu2, s2) + c2`` with ``mu2 = A mu_x + c1`` and
``s2 = sqrt(diag(A Sigma_x A^T))``; exact. The output covariance is
``B Cov[ReLU(A x + c1)] B^T`` with the exact ReLU covariance of
:func:`momentkit.relu.relu_covariance` (exact up to the bivariate normal cdf's
accuracy, about 1e-15 relative to ``s_i s_j``).

Shapes: ``A`` ``(h, n)``, ``c1`` ``(h,)``, ``B`` ``(d, h)``, ``c2`` ``(d,)``;
``mean_x`` ``(..., n)``; ``cov_x`` diagonal ``(..., n)`` or full ``(..., n, n)``.
"""

from __future__ import annotations

import torch

from momentkit.affine import affine_moments
from momentkit.errors import MomentInputError
from momentkit.relu import relu_covariance, relu_mean


def _check_weights(A, c1, B, c2, n: int, fn: str) -> None:
    if A.dim() != 2 or A.shape[1] != n:
        raise MomentInputError(f"{fn}: A must have shape (h, {n}), got {tuple(A.shape)}")
    h = A.shape[0]
    if c1 is not None and c1.shape != (h,):
        raise MomentInputError(f"{fn}: c1 must have shape ({h},), got {tuple(c1.shape)}")
    if B.dim() != 2 or B.shape[1] != h:
        raise MomentInputError(f"{fn}: B must have shape (d, {h}), got {tuple(B.shape)}")
    if c2 is not None and c2.shape != (B.shape[0],):
        raise MomentInputError(
            f"{fn}: c2 must have shape ({B.shape[0]},), got {tuple(c2.shape)}"
        )


def _hidden_moments(mean_x, cov_x, A, c1, fn: str, full: bool):
    """Moments of the pre-activation ``A x + c1``: its variance (``full=False``) or its
    covariance ``A Sigma_x A^T`` (``full=True``), from diagonal or full ``cov_x``."""
    if not isinstance(mean_x, torch.Tensor) or mean_x.dim() < 1:
        raise MomentInputError(f"{fn}: mean_x must be a tensor of shape (..., n)")
    if not isinstance(cov_x, torch.Tensor):
        raise MomentInputError(f"{fn}: cov_x must be a tensor")
    diagonal_in = cov_x.shape == mean_x.shape
    if full and diagonal_in:
        cov_x = torch.diag_embed(cov_x)
    mu2, spread = affine_moments(A, mean_x, cov_x, c1)
    if not full and not diagonal_in:
        spread = torch.diagonal(spread, dim1=-2, dim2=-1)
    return mu2, spread


def affine_relu_affine_mean(
    mean_x: torch.Tensor,
    cov_x: torch.Tensor,
    A: torch.Tensor,
    c1: torch.Tensor | None,
    B: torch.Tensor,
    c2: torch.Tensor | None,
) -> torch.Tensor:
    """Theorem 1: ``E[B ReLU(A x + c1) + c2]`` for ``x ~ N(mean_x, cov_x)``; ``(..., d)``.

    Raises :class:`MomentInputError` for mismatched shapes or invalid ``cov_x``.
    """
    fn = "affine_relu_affine_mean"
    _check_weights(A, c1, B, c2, mean_x.shape[-1], fn)
    mu2, var2 = _hidden_moments(mean_x, cov_x, A, c1, fn, full=False)
    out = relu_mean(mu2, var2.clamp_min(0.0)) @ B.T.to(mu2.dtype)
    return out if c2 is None else out + c2


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
    :func:`affine_relu_affine_mean`.
    """
    fn = "affine_relu_affine_covariance"
    _check_weights(A, c1, B, c2, mean_x.shape[-1], fn)
    mu2, cov2 = _hidden_moments(mean_x, cov_x, A, c1, fn, full=True)
    cov_relu = relu_covariance(mu2, cov2)
    Bm = B.to(cov_relu.dtype)
    out = Bm @ cov_relu @ Bm.T
    return 0.5 * (out + out.transpose(-1, -2))
