"""Input checks shared by the core's public functions (one place, one wording)."""

from __future__ import annotations

import torch

from momentkit.errors import MomentInputError


def check_covariance_matrix(cov: torch.Tensor, fn: str, name: str = "cov") -> None:
    """Raise :class:`MomentInputError` unless ``cov`` is ``(..., n, n)``, finite,
    symmetric (to 64 eps of each matrix's largest entry, which leaves room for the
    rounding of ``A Sigma A^T``) and has a non-negative diagonal."""
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise MomentInputError(
            f"{fn}: {name} must have shape (..., n, n), got {tuple(cov.shape)} (not square)"
        )
    if bool(torch.isinf(cov).any()):
        raise MomentInputError(f"{fn}: {name} contains inf")
    sym_tol = 64 * torch.finfo(cov.dtype).eps * cov.abs().amax(dim=(-1, -2), keepdim=True)
    if bool(((cov - cov.transpose(-1, -2)).abs() > sym_tol).any()):
        raise MomentInputError(f"{fn}: {name} is not symmetric")
    if bool((torch.diagonal(cov, dim1=-2, dim2=-1) < 0).any()):
        raise MomentInputError(f"{fn}: {name} has a negative variance on its diagonal")
