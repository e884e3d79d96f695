"""Moments of Gaussian input through affine maps (paper Eq. 5).

For ``y = A x + c`` and ``x ~ N(mu, Sigma)``: ``E[y] = A mu + c`` and
``Cov[y] = A Sigma A^T``. With a diagonal ``Sigma = Diag(v)`` the output variances
are ``(A * A) v`` (Eq. 5). For ``nn.Conv2d`` that is the same convolution applied to
``v`` with squared weights and no bias (same stride, padding, dilation, groups):
zero padding is a constant and adds no variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Elementwise input normalization ``(x - mean) / std`` per channel.

    The channel dimension is dimension 1 (``(N, C, H, W)`` images or ``(N, C)``
    feature vectors). Models that normalize their input carry this module first, so
    that noise can be specified in pixel space and its variance propagated exactly:
    a variance ``v`` becomes ``v / std**2``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std_t = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        if mean_t.shape != std_t.shape:
            raise ValueError(
                f"Normalize: mean has {mean_t.numel()} channels but std has {std_t.numel()}"
            )
        if not bool(torch.all(std_t > 0)):
            raise ValueError("Normalize: every std must be positive")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        if x.dim() >= 2:
            shape[1] = t.numel()
        else:
            shape[0] = t.numel()
        return t.to(dtype=x.dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def scale_variance(self, var: torch.Tensor) -> torch.Tensor:
        """Variance after this map, for a diagonal input variance ``var``."""
        return var / self._view(self.std, var) ** 2

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
