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
import torch.nn.functional as F
from torch import nn

from momentkit._validate import (
    as_float_tensor,
    as_spread,
    check_finite,
    check_mean_and_spread,
    check_result,
    compute_dtype,
)
from momentkit.errors import MomentInputError


class Normalize(nn.Module):
    """Elementwise input normalization ``(x - mean) / std`` per channel.

    The channel dimension is dimension 1 (``(N, C, H, W)`` images or ``(N, C)``
    feature vectors). Models that normalize their input carry this module first, so
    that noise can be specified in pixel space and its variance propagated exactly:
    a variance ``v`` becomes ``v / std**2``.

    Raises :class:`MomentInputError` when ``mean`` and ``std`` have different lengths,
    contain NaN or infinity, or a ``std`` is not positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """One ``mean`` and one ``std`` per channel (same length, every ``std`` > 0)."""
        super().__init__()
        fn = "Normalize"
        mean_t = as_float_tensor(
            torch.as_tensor(mean, dtype=torch.get_default_dtype()), "mean", fn, finite=True
        ).flatten()
        std_t = as_spread(
            torch.as_tensor(std, dtype=torch.get_default_dtype()), "std", fn
        ).flatten()
        if mean_t.shape != std_t.shape:
            raise MomentInputError(
                f"{fn}: mean has {mean_t.numel()} channels but std has {std_t.numel()}"
            )
        if not bool(torch.all(std_t > 0)):
            raise MomentInputError(f"{fn}: std must be positive in every channel, found 0")
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
        """``(x - mean) / std`` along dimension 1 (dimension 0 for a 1-d ``x``)."""
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def scale_variance(self, var: torch.Tensor) -> torch.Tensor:
        """Variance after this map, for a diagonal input variance ``var``."""
        return var / self._view(self.std, var) ** 2

    def extra_repr(self) -> str:
        """``mean=[...], std=[...]`` for ``repr``."""
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def _check_weights(layer: nn.Module, fn: str) -> None:
    for pname, p in (*layer.named_parameters(), *layer.named_buffers()):
        if p.is_floating_point():
            check_finite(p, f"layer_or_matrix.{pname}", fn)


def _full_cov_through_linear(matrix: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    out = matrix @ cov @ matrix.transpose(-1, -2)
    return 0.5 * (out + out.transpose(-1, -2))


def _conv_apply(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def affine_moments(
    layer_or_matrix: nn.Module | torch.Tensor,
    mean: torch.Tensor,
    var_or_cov: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (co)variance of ``y = A x + c`` for ``x ~ N(mean, Sigma)`` (Eq. 5).

    ``layer_or_matrix``: an ``nn.Linear``, an ``nn.Conv2d`` (any stride, zero padding,
    dilation, groups), a :class:`Normalize`, or a matrix ``A`` of shape ``(out, in)``
    (with optional ``bias`` of shape ``(out,)``).

    ``var_or_cov`` is diagonal when it has the shape of ``mean`` (then the output
    variance is ``(A * A) v``: for a convolution the same convolution of ``v`` with
    squared weights and no bias) and a full covariance otherwise: ``(..., n, n)`` for
    vectors of length ``n`` and ``(N, D, D)``, ``D = C*H*W``, for images of shape
    ``(N, C, H, W)`` (output ``(N, D', D')`` over the flattened output). Returns
    ``(out_mean, out_var_or_cov)`` in the same form as the input. Exact up to
    rounding.

    Precision: the result has the dtype of ``mean`` and ``var_or_cov`` promoted; float16
    and bfloat16 input is computed in float32 and rounded once to the input dtype.

    Raises :class:`MomentInputError` for an unsupported layer or bad input: NaN or
    infinity in ``mean``, ``var_or_cov`` or the weights (an infinite mean or spread is
    not a Gaussian); a negative variance; a covariance that is not symmetric or not
    positive semi-definite beyond rounding (smallest eigenvalue below
    ``-65 n eps max(diag)`` in float32 and float64, see ``momentkit._validate``); an
    output that overflows the dtype. Empty input (a batch of 0, or 0 features) gives an
    empty result.
    """
    fn = "affine_moments"
    diagonal = check_mean_and_spread(mean, var_or_cov, fn)
    if isinstance(layer_or_matrix, nn.Module):
        _check_weights(layer_or_matrix, fn)
    elif isinstance(layer_or_matrix, torch.Tensor):
        as_float_tensor(layer_or_matrix, "layer_or_matrix", fn, finite=True)
    if bias is not None:
        as_float_tensor(bias, "bias", fn, finite=True)
    out_dtype = torch.promote_types(mean.dtype, var_or_cov.dtype)
    work = compute_dtype(out_dtype)
    out_mean, out_spread = _affine_moments(
        layer_or_matrix, mean.to(work), var_or_cov.to(work), bias, diagonal, fn
    )
    out_mean = check_result(out_mean.to(out_dtype), "the output mean", fn)
    what = "the output variance" if diagonal else "the output covariance"
    return out_mean, check_result(out_spread.to(out_dtype), what, fn)


def _affine_moments(
    layer_or_matrix: nn.Module | torch.Tensor,
    mean: torch.Tensor,
    var_or_cov: torch.Tensor,
    bias: torch.Tensor | None,
    diagonal: bool,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`affine_moments` on checked input of one working dtype."""
    if isinstance(layer_or_matrix, torch.Tensor):
        a = layer_or_matrix.to(mean.dtype)
        if a.dim() != 2 or a.shape[1] != mean.shape[-1]:
            raise MomentInputError(
                f"{fn}: matrix of shape {tuple(a.shape)} does not map vectors of length "
                f"{mean.shape[-1]}"
            )
        out_mean = mean @ a.T
        if bias is not None:
            out_mean = out_mean + bias.to(mean.dtype)
        if diagonal:
            return out_mean, var_or_cov @ (a * a).T
        return out_mean, _full_cov_through_linear(a, var_or_cov)
    if bias is not None:
        raise MomentInputError(f"{fn}: bias is only taken with a matrix, not with a module")
    layer = layer_or_matrix
    if isinstance(layer, nn.Linear):
        return _affine_moments(layer.weight, mean, var_or_cov, layer.bias, diagonal, fn)
    if isinstance(layer, Normalize):
        out_mean = layer(mean)
        if diagonal:
            return out_mean, layer.scale_variance(var_or_cov)
        inv = (1.0 / layer._view(layer.std, mean)).expand_as(mean)
        if mean.dim() == 4:
            inv = inv.reshape(mean.shape[0], -1)
        return out_mean, inv.unsqueeze(-1) * var_or_cov * inv.unsqueeze(-2)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise MomentInputError(
                f"{fn}: Conv2d with padding_mode={layer.padding_mode!r} repeats input values, "
                "so Eq. 5 does not hold; only zero padding is supported"
            )
        if mean.dim() != 4:
            raise MomentInputError(f"{fn}: Conv2d needs mean of shape (N, C, H, W)")
        w = layer.weight.to(mean.dtype)
        out_mean = _conv_apply(layer, mean, w)
        if layer.bias is not None:
            out_mean = out_mean + layer.bias.to(mean.dtype).view(1, -1, 1, 1)
        if diagonal:
            return out_mean, _conv_apply(layer, var_or_cov, w * w)
        n, c, h, wd = mean.shape
        d = c * h * wd
        if var_or_cov.shape != (n, d, d) and var_or_cov.shape != (d, d):
            raise MomentInputError(
                f"{fn}: covariance for images of shape {tuple(mean.shape)} must be "
                f"(N, {d}, {d}), got {tuple(var_or_cov.shape)}"
            )
        cov = var_or_cov.expand(n, d, d)
        d_out = out_mean[0].numel()
        # A Sigma: apply the convolution to every column of Sigma (rows by symmetry).
        left = _conv_apply(layer, cov.reshape(n * d, c, h, wd), w).reshape(n, d, d_out)
        right = _conv_apply(
            layer, left.transpose(1, 2).reshape(n * d_out, c, h, wd), w
        ).reshape(n, d_out, d_out)
        return out_mean, 0.5 * (right + right.transpose(1, 2))
    raise MomentInputError(
        f"{fn}: unsupported layer {type(layer).__name__}; expected nn.Linear, nn.Conv2d, "
        "Normalize or a matrix"
    )
