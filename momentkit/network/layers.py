"""Per-layer propagation of Gaussian moments, for the three representations.

A :class:`State` is the moment-matched Gaussian of one activation tensor, batched:

* ``"diagonal"``: ``mean`` and ``var`` ``(N, *s)``; units independent.
* ``"factor"``: ``mean``, ``factor`` ``C`` ``(N or 1, K, *s)`` (the covariance of each
  unit with the ``K`` standardized input noise variables ``z``, the input noise being
  ``n = Diag(sigma) z``) and ``var``, the remainder ``(N, *s)``: the part of each
  unit's variance that ``C`` does not explain, taken independent across units. So
  ``Cov = C^T C + Diag(var)`` and each unit's variance is ``sum_k C_k^2 + var``.
* ``"full"``: ``mean``, ``cov`` ``(N, D, D)`` over the flattened units (``D =
  prod(s)``), and ``factor`` as above (only for the cross-covariance of two branches
  that meet in an addition or concatenation).

Affine maps (:class:`Affine`) are exact in every representation: the mean goes
through the layer, the factor's columns and the covariance's rows and columns
through its linear part, diagonal variances through the squared weights. Through
ReLU and LeakyReLU the mean and variance are exact (:func:`relu_stats`: float64
through :func:`momentkit.relu.relu_moments`, float32 through its fast path),
the factor is scaled by ``E[f'(X)]`` (Stein's lemma, exact under the Gaussian
assumption), the remainder is what the factor leaves of the variance (``>= 0`` by
the Cauchy-Schwarz inequality), and the full covariance is exact
(:func:`momentkit.relu.relu_covariance`). Max-pooling is in :mod:`momentkit.network.pooling`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from momentkit._relu_kernels import ReluMomentsFast
from momentkit.network.gaussian_max import stein_weight
from momentkit.relu import relu_covariance, relu_moments

__all__ = [
    "Affine", "State", "add", "concat", "leaky_relu", "relu_stats", "reshape", "total_var",
]


@dataclass
class State:
    """Moments of one activation tensor (module docstring); unused fields are None."""

    mean: torch.Tensor
    var: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    cov: torch.Tensor | None = None


def total_var(state: State) -> torch.Tensor:
    """Each unit's variance, ``(N, *s)``."""
    if state.cov is not None:
        return torch.diagonal(state.cov, dim1=-2, dim2=-1).reshape(state.mean.shape)
    if state.factor is not None:
        return (state.factor * state.factor).sum(1) + state.var
    return state.var


def _symmetric(cov: torch.Tensor) -> torch.Tensor:
    return 0.5 * (cov + cov.transpose(-1, -2))


@dataclass
class Affine:
    """An affine layer ``y = L x + b``: ``forward`` the layer itself, ``lin`` its linear
    part ``L`` and ``lin_sq`` the map ``v -> (L * L) v`` of independent variances; all
    three act on batches ``(B, *s)``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    lin: Callable[[torch.Tensor], torch.Tensor]
    lin_sq: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, state: State) -> State:
        mean = self.forward(state.mean)
        var = None if state.var is None else self.lin_sq(state.var)
        factor = None
        if state.factor is not None:
            b, k = state.factor.shape[:2]
            out = self.lin(state.factor.reshape(b * k, *state.factor.shape[2:]))
            factor = out.reshape(b, k, *out.shape[1:])
        cov = None
        if state.cov is not None:
            n, d = state.cov.shape[:2]
            s = state.mean.shape[1:]
            left = self.lin(state.cov.reshape(n * d, *s)).reshape(n, d, -1)
            d_out = left.shape[-1]
            right = self.lin(left.transpose(1, 2).reshape(n * d_out, *s))
            cov = _symmetric(right.reshape(n, d_out, d_out))
        return State(mean, var, factor, cov)


def relu_stats(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean and variance of ``ReLU(X)`` and the Stein weight ``Phi(m / s)``, ``X ~ N(m, v)``.

    float64 takes the accurate path (:func:`momentkit.relu.relu_moments`, exact to about
    1e-13, and :func:`~momentkit.network.gaussian_max.stein_weight`); float32 (and half
    precision, computed in float32) the fast path
    ``momentkit._relu_kernels.ReluMomentsFast``: float32 elementwise operations only (no
    masks, indexing or float64) with analytic derivatives; error bounds in
    :mod:`momentkit.relu` ("Float32 fast path"). ``v`` may broadcast against ``m``.
    """
    if m.dtype == torch.float64 or v.dtype == torch.float64:
        r_mean, r_var = relu_moments(m, v)
        return r_mean, r_var, stein_weight(m, v)
    dtype = m.dtype
    out = ReluMomentsFast.apply(m.float(), v.float())
    return tuple(o.to(dtype) for o in out)


def leaky_relu(state: State, slope: float = 0.0) -> State:
    """``f(x) = max(x, slope x)`` (ReLU at ``slope = 0``), ``0 <= slope``.

    ``f(X) = slope X + (1 - slope) ReLU(X)``; with ``g = Phi(m / s)`` (Stein):
    ``Var f = slope^2 v + (1 - slope)^2 Var ReLU + 2 slope (1 - slope) g v`` and
    ``E[f'] = slope + (1 - slope) g``; in ``"full"``,
    ``Cov(f_i, f_j) = slope^2 S_ij + slope (1 - slope)(g_i + g_j) S_ij
    + (1 - slope)^2 Cov(ReLU_i, ReLU_j)``. Elementwise moments from :func:`relu_stats`.
    """
    m = state.mean
    v = total_var(state)
    r_mean, r_var, g = relu_stats(m, v)
    if slope == 0.0:
        mean, var, gain = r_mean, r_var, g
    else:
        b = 1.0 - slope
        mean = slope * m + b * r_mean
        var = slope * slope * v + b * b * r_var + 2.0 * slope * b * g * v
        gain = slope + b * g
    if state.cov is not None:
        flat_m = m.reshape(m.shape[0], -1)
        rc = relu_covariance(flat_m, state.cov)
        cov = (1.0 - slope) ** 2 * rc
        if slope != 0.0:
            gf = g.reshape(flat_m.shape)
            cov = cov + slope * slope * state.cov + slope * (1.0 - slope) * (
                gf.unsqueeze(-1) + gf.unsqueeze(-2)
            ) * state.cov
        return State(mean, None, gain.unsqueeze(1) * state.factor, _symmetric(cov))
    if state.factor is None:
        return State(mean, var if slope == 0.0 else var.clamp_min(0.0))
    factor = gain.unsqueeze(1) * state.factor
    rem = (var - (factor * factor).sum(1)).clamp_min(0.0)
    return State(mean, rem, factor)


def reshape(state: State, shape: tuple[int, ...]) -> State:
    """View the units as ``shape`` (without the batch dimension); flattened order kept."""
    n = state.mean.shape[0]
    return replace(
        state,
        mean=state.mean.reshape(n, *shape),
        var=None if state.var is None else state.var.reshape(n, *shape),
        factor=None
        if state.factor is None
        else state.factor.reshape(*state.factor.shape[:2], *shape),
    )


def _cross(a: State, b: State) -> torch.Tensor:
    """``Cov(a, b)`` between two states through their factors, ``(N, Da, Db)``."""
    fa = a.factor.flatten(2)
    fb = b.factor.flatten(2)
    return torch.einsum("nkd,nke->nde", fa, fb).expand(a.mean.shape[0], -1, -1)


def add(a: State, b: State, sign: float = 1.0) -> State:
    """``a + sign * b`` for two activations of one shape.

    ``"diagonal"`` takes them independent; ``"factor"`` and ``"full"`` keep their
    correlation through the factors (remainders independent).
    """
    if a is b:
        scale = 1.0 + sign
        return scale_state(a, scale)
    mean = a.mean + sign * b.mean
    factor = None if a.factor is None else a.factor + sign * b.factor
    var = None if a.var is None else a.var + b.var
    cov = None
    if a.cov is not None:
        x = _cross(a, b)
        cov = a.cov + b.cov + sign * (x + x.transpose(1, 2))
    return State(mean, var, factor, cov)


def scale_state(a: State, c: float) -> State:
    """``c * a`` for a number ``c``."""
    return State(
        c * a.mean,
        None if a.var is None else c * c * a.var,
        None if a.factor is None else c * a.factor,
        None if a.cov is None else c * c * a.cov,
    )


def concat(states: list[State], dim: int) -> State:
    """Concatenation along unit dimension ``dim >= 1`` (``"full"``: ``dim = 1`` only,
    checked by the caller); cross blocks in ``"full"`` come from the factors."""
    first = states[0]
    mean = torch.cat([s.mean for s in states], dim)
    var = None if first.var is None else torch.cat([s.var for s in states], dim)
    factor = None
    if first.factor is not None:
        n = max(s.factor.shape[0] for s in states)
        factor = torch.cat([s.factor.expand(n, *s.factor.shape[1:]) for s in states], dim + 1)
    cov = None
    if first.cov is not None:
        rows = []
        for i, si in enumerate(states):
            rows.append(
                torch.cat([si.cov if i == j else _cross(si, sj) for j, sj in enumerate(states)], 2)
            )
        cov = torch.cat(rows, 1)
    return State(mean, var, factor, cov)


def linear(layer: nn.Linear) -> Affine:
    w = layer.weight
    return Affine(
        layer, lambda t: t @ w.T.to(t.dtype), lambda v: v @ (w * w).T.to(v.dtype)
    )


def conv2d(layer: nn.Conv2d) -> Affine:
    def conv(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            t, weight.to(t.dtype), None, layer.stride, layer.padding, layer.dilation, layer.groups
        )

    w = layer.weight
    return Affine(layer, lambda t: conv(t, w), lambda v: conv(v, w * w))


def channel_scale(forward: Callable, scale: torch.Tensor) -> Affine:
    """Per-channel affine map (Normalize, BatchNorm in eval mode): ``scale`` ``(C,)``."""

    def view(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        shape = [1] * t.dim()
        shape[1] = -1
        return s.to(t.dtype).view(shape)

    return Affine(forward, lambda t: t * view(t, scale), lambda v: v * view(v, scale * scale))


def batch_norm(layer: nn.modules.batchnorm._BatchNorm) -> Affine:
    """BatchNorm with its running statistics (the eval-mode network)."""
    inv = torch.rsqrt(layer.running_var + layer.eps)
    scale = inv if layer.weight is None else layer.weight * inv

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0,
            layer.eps,
        )

    return channel_scale(forward, scale)


def avg_pool2d(layer: nn.AvgPool2d, shape: tuple[int, ...], like: torch.Tensor) -> Affine:
    args = (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, *args, layer.count_include_pad, layer.divisor_override)

    ones = torch.ones(1, 1, *shape[-2:], dtype=like.dtype, device=like.device)
    # Each output averages its window with equal weights 1/d_o over count_o valid
    # inputs, so pool(1)_o = count_o / d_o and sum_i L_oi^2 v_i = sum_window(v) / d_o^2.
    count = F.avg_pool2d(ones, *args, True, 1)
    weight = (pool(ones) / count.clamp_min(1.0)) ** 2
    return Affine(pool, pool, lambda v: F.avg_pool2d(v, *args, True, 1) * weight)


def _adaptive_counts(size: int, out: int) -> list[int]:
    """Window lengths of adaptive pooling: ``[floor(i S/O), ceil((i+1) S/O))``."""
    return [-((-(i + 1) * size) // out) - (i * size) // out for i in range(out)]


def adaptive_avg_pool2d(
    layer: nn.AdaptiveAvgPool2d, shape: tuple[int, ...], like: torch.Tensor
) -> Affine:
    h, w = shape[-2:]
    out = F.adaptive_avg_pool2d(torch.zeros(1, 1, h, w), layer.output_size).shape[-2:]
    ch = torch.tensor(_adaptive_counts(h, out[0]), dtype=like.dtype, device=like.device)
    cw = torch.tensor(_adaptive_counts(w, out[1]), dtype=like.dtype, device=like.device)
    inv_count = 1.0 / (ch.view(-1, 1) * cw.view(1, -1))

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(t, layer.output_size)

    return Affine(pool, pool, lambda v: pool(v) * inv_count)
