"""Moments of ``ReLU(X)`` for Gaussian ``X`` (paper Eq. 1; Bibi et al. CVPR 2018).

For ``X ~ N(mu, s^2)`` and ``z = mu / s``:

* mean ``T(mu, s) = mu Phi(z) + s phi(z) = s h(z)`` with ``h(z) = z Phi(z) + phi(z)``
  (the paper's ``mu3``); ``dT/dmu = Phi(z)``, ``dT/ds = phi(z)``;
* variance ``s^2 v(z)`` with ``v(z) = Phi(z) - h(z) h(-z)`` (equal to
  ``E[ReLU(X)^2] - T^2`` but free of the cancellation in that difference);
* covariance of ``ReLU(X_i)``, ``ReLU(X_j)`` for a jointly Gaussian pair with non-zero
  means, through the bivariate normal cdf (Rosenbaum 1961): with ``a = mu_i / s_i``,
  ``b = mu_j / s_j`` and correlation ``rho``,
  ``E[ReLU(X_i) ReLU(X_j)] = s_i s_j [(ab + rho) Phi2(a, b; rho) + b phi(a) Phi((b - rho a)/r)
  + a phi(b) Phi((a - rho b)/r) + r^2 phi2(a, b; rho)]``, ``r = sqrt(1 - rho^2)``.

Numerics. For ``z < -3`` both ``h(z)`` and ``v(z)`` are sums of nearly cancelling
terms (the naive mean loses every digit near ``z = -5`` in float32). There they are
evaluated from the continued fraction of the Mills ratio
``R(t) = 1/(t + 1/(t + 2/(t + 3/(t + ...))))`` (``t = -z``), written as
``c = 1/(t + d)``, ``d = 2/(t + 3/(t + ...))`` so that ``h(-t) = phi(t) c/(t + c)`` and
``v(-t) = phi(t) [d / ((t + d)(t + c)) - phi(t) (c/(t + c))^2]``, with no subtraction of
nearly equal numbers. The same tail formulas give ``h(-z)`` for ``z > 3``. At ``|z| <= 3``
the direct formulas lose at most a factor 11 to cancellation. The mean's direct formula
runs in the input dtype (the hot path of training: no branch, about ten passes, the
derivatives ``Phi(z)`` and ``phi(z)`` kept for the backward pass); below float64 the
entries with ``z < -2`` are recomputed in float64, because there the cancellation and
the float32 rounding of ``z = mu / s`` (amplified ``z^2``-fold) would cost more than the
contract allows. The variance is computed in float64 throughout.

Measured against mpmath at 30 digits over ``mu/s`` in [-40, 40] and ``s`` in
[1e-30, 1e8] (``tests/test_relu.py``; ``python -m benchmarks.relu_accuracy``): relative
error at most 3e-13 in float64 and 9.5e-7 in float32 wherever the true value is a normal
number of the dtype (the contract tested is 1e-12 and 1e-5).

``s = 0`` (``var = 0``) is legal: the mean is exactly ``ReLU(mu)``, the variance exactly
0, and the gradients are the limits ``dT/dmu = Phi(+-inf) in {0, 1}`` (``1/2`` at
``mu = 0``) and ``dT/ds = phi(z)``.
"""

from __future__ import annotations

import math

import torch

from momentkit._validate import (
    as_float_tensor,
    as_spread,
    broadcast_shape,
    check_covariance_matrix,
)
from momentkit.errors import MomentInputError
from momentkit.special import (
    bivariate_normal_cdf,
    bivariate_normal_cdf_partials,
    normal_cdf,
    normal_pdf,
)

# Beyond |z| = 3 the tail (continued-fraction) formulas are used; at the switch the
# central formulas cancel at most a factor 1/(1 - 3 R(3)) ~ 7 of their digits.
_TAIL_SWITCH = 3.0
# Terms of the Mills-ratio continued fraction. Its truncation error at t >= 3 with 60
# terms is below 1e-17 (checked against mpmath in tests/test_relu.py).
_CF_TERMS = 60
# |z| is clamped here: phi(z) underflows to 0 in float64 long before, so the clamp
# changes no value, but it keeps z * (tail quantity) away from inf * 0.
_Z_CLAMP = 1e10
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _mills_tail(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``t >= 3``: ``g = 1 - t R(t)`` and ``w = R(t) - t g(t)`` by continued fraction."""
    e = torch.zeros_like(t)
    for k in range(_CF_TERMS, 1, -1):
        e = k / (t + e)
    c = 1.0 / (t + e)
    g = c / (t + c)
    w = e / ((t + e) * (t + c))
    return g, w


def _standardize(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z = mu / s``, clamped; at ``s = 0`` the limit ``sign(mu) * inf`` (0 at mu = 0)."""
    positive = s > 0
    z = mu / torch.where(positive, s, torch.ones_like(s))
    z_limit = torch.sign(mu) * _Z_CLAMP
    return torch.where(positive, z.clamp(-_Z_CLAMP, _Z_CLAMP), z_limit)


def _lower_tail(mu: torch.Tensor, s: torch.Tensor, with_var: bool):
    """Mean (and variance) for ``z = mu/s < -3``, in float64 and in log space.

    ``T = s phi(t) g(t)`` and ``Var = s^2 phi(t) [w(t) - phi(t) g(t)^2]`` with
    ``t = -z``; ``phi(t)`` is subnormal beyond ``t ~ 37.5`` while the products can still
    be normal numbers, so they are formed as ``exp(log s - t^2/2 - log sqrt(2 pi) + ...)``.
    """
    t = -_standardize(mu, s)
    g, w = _mills_tail(t)
    log_p = -0.5 * t * t - _LOG_SQRT_2PI
    log_s = torch.log(s)
    mean = torch.exp(log_s + log_p + torch.log(g))
    if not with_var:
        return mean, None
    bracket = w - torch.exp(log_p) * g * g
    var = torch.exp(2.0 * log_s + log_p + torch.log(bracket.clamp_min(torch.finfo(t.dtype).tiny)))
    return mean, var


def _std64(s: torch.Tensor, var: torch.Tensor | None, mask: torch.Tensor | None = None):
    """``s`` in float64; from ``var`` when given, so that the float32 rounding of
    ``sqrt(var)`` (amplified ``z^2``-fold in the tails) never enters."""
    if var is None:
        return (s if mask is None else s[mask]).double()
    return torch.sqrt((var if mask is None else var[mask]).double())


def _central_mean(
    mu: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mu Phi(z) + s phi(z)`` in ``mu``'s dtype, with ``Phi(z)``, ``exp(-z^2/2)`` (the
    derivatives, up to the constant ``1/sqrt(2 pi)``) and ``z``; about ten passes."""
    if bool((s > 0).all()):
        w = mu * (-1.0 / (math.sqrt(2.0) * s))  # w = -z / sqrt 2
    else:
        w = _standardize(mu, s).mul_(-1.0 / math.sqrt(2.0))
    z = w * -math.sqrt(2.0)
    cdf = torch.special.erfc(w).mul_(0.5)
    gauss = w.square_().neg_().exp_()  # exp(-z^2 / 2); w is overwritten
    out = torch.mul(cdf, mu).addcmul_(s * (1.0 / math.sqrt(2.0 * math.pi)), gauss)
    return out, cdf, gauss, z


def _exact_mean64(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``T(mu, s)`` in float64 for the entries given: direct for ``z >= -3``, the
    continued-fraction tail below."""
    mu, s = mu.double(), s.double()
    z = _standardize(mu, s)
    out = mu * normal_cdf(z) + s * normal_pdf(z)
    tail = z < -_TAIL_SWITCH
    if bool(tail.any()):
        out[tail] = _lower_tail(mu[tail], s[tail], with_var=False)[0]
    return out


def _mean_forward(
    mu: torch.Tensor, s: torch.Tensor, var: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``T(mu, s)``, ``Phi(z)`` and ``exp(-z^2/2)``, all in ``mu``'s dtype.

    ``s`` (and ``var``) broadcast against ``mu`` without being expanded (in training
    the variance is one image broadcast over the batch). The direct formula
    ``mu Phi(z) + s phi(z)`` runs in ``mu``'s dtype (the hot path). It cancels for
    negative ``z``, by a factor ``|z| Phi(z) / h(z)`` (5.4 at ``z = -2``, 11 at -3), on
    top of the rounding of ``z = mu / s`` itself, amplified ``z^2``-fold. So the entries
    with ``z < -2`` (below float64) or ``z < -3`` (float64) are recomputed in float64 with
    the standard deviation taken from ``var`` when given, the tail ``z < -3`` by the
    continued fraction: measured relative error 9.5e-7 in float32, 3e-13 in float64.
    """
    out, cdf, gauss, z = _central_mean(mu, s)
    float64 = mu.dtype == torch.float64
    redo = z < (-_TAIL_SWITCH if float64 else -2.0)
    if bool(redo.any()):
        mu_r = mu.expand_as(z)[redo]
        s_r = _std64(s.expand_as(z), None if var is None else var.expand_as(z), redo)
        if float64:
            out[redo] = _lower_tail(mu_r, s_r, with_var=False)[0]
        else:
            out[redo] = _exact_mean64(mu_r, s_r).to(out.dtype)
    return out, cdf, gauss


def _moments64(
    mu: torch.Tensor, s: torch.Tensor, var: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ReLU(N(mu, s^2)), everything in float64."""
    mu, s = mu.double(), _std64(s, var)
    z = _standardize(mu, s)
    cdf, pdf = normal_cdf(z), normal_pdf(z)
    h = z * cdf + pdf
    mean = mu * cdf + s * pdf
    var_scaled = cdf - h * (h - z)
    upper = z > _TAIL_SWITCH
    if bool(upper.any()):
        # v = Phi(z) - h(z) h(-z) with h(-z) from the continued fraction, h(z) = z + h(-z).
        zu = z[upper]
        g, _ = _mills_tail(zu)
        h_small = normal_pdf(zu) * g
        mean[upper] = mu[upper] + s[upper] * h_small
        var_scaled[upper] = cdf[upper] - (zu + h_small) * h_small
    var = (s * s) * var_scaled.clamp_min(0.0)
    lower = z < -_TAIL_SWITCH
    if bool(lower.any()):
        mean[lower], var[lower] = _lower_tail(mu[lower], s[lower], with_var=True)
    return mean, var


class _ReluMean(torch.autograd.Function):
    """``T(mu, s)`` with the analytic derivatives ``Phi(z)`` and ``phi(z)``, which the
    forward pass computes anyway and keeps (two tensors of ``mu``'s size and dtype), so
    that the backward pass is two products."""

    @staticmethod
    def forward(ctx, mu, s, var=None):
        out, cdf, gauss = _mean_forward(mu, s, var)
        ctx.save_for_backward(cdf, gauss)
        ctx.shapes = (mu.shape, s.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cdf, gauss = ctx.saved_tensors
        mu_shape, s_shape = ctx.shapes
        g_mu = g_s = None
        if ctx.needs_input_grad[0]:
            g_mu = (grad * cdf).sum_to_size(mu_shape)
        if ctx.needs_input_grad[1]:  # phi(z) = exp(-z^2/2) / sqrt(2 pi), scaled after the sum
            g_s = (grad * gauss).sum_to_size(s_shape) * (1.0 / math.sqrt(2.0 * math.pi))
        return g_mu, g_s, None


class _ReluMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, s, var_in=None):
        mean, var = _moments64(mu, s, var_in)
        ctx.save_for_backward(mu, s, mean)
        return mean.to(mu.dtype), var.to(mu.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        mu, s, mean = ctx.saved_tensors
        z = _standardize(mu.double(), s.double())
        cdf, pdf = normal_cdf(z), normal_pdf(z)
        s64 = s.double()
        # dVar/dmu = 2 T Phi(-z); dVar/ds = 2 s Phi(z) - 2 T phi(z)  (Stein's lemma).
        d_var_mu = 2.0 * mean * normal_cdf(-z)
        d_var_s = 2.0 * s64 * cdf - 2.0 * mean * pdf
        g_mu = grad_mean.double() * cdf + grad_var.double() * d_var_mu
        g_s = grad_mean.double() * pdf + grad_var.double() * d_var_s
        return g_mu.to(mu.dtype), g_s.to(s.dtype), None


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(v)`` whose derivative at ``v = 0`` is taken as 0 instead of ``+inf``.

    Through ``T`` the derivative ``dT/dvar = phi(z) / (2 s)`` tends to 0 as ``s -> 0``
    for every ``mu != 0``; at ``mu = 0`` it is unbounded, and 0 is reported there so
    that no infinity ever reaches an optimizer.
    """

    @staticmethod
    def forward(ctx, v):
        out = torch.sqrt(v)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        positive = out > 0
        safe = torch.where(positive, out, torch.ones_like(out))
        return torch.where(positive, grad / (2.0 * safe), torch.zeros_like(grad))


def _check_pair(mean, spread, mean_name: str, spread_name: str, fn: str, expand: bool = True):
    mean = as_float_tensor(mean, mean_name, fn, finite=True)
    spread = as_spread(spread, spread_name, fn, like=mean)
    shape = broadcast_shape(mean, spread, (mean_name, spread_name), fn)
    dtype = _compute_dtype(torch.promote_types(mean.dtype, spread.dtype))
    mean, spread = mean.to(dtype), spread.to(dtype)
    if expand:
        return mean.expand(shape), spread.expand(shape)
    if mean.shape != shape:  # the mean carries the output's shape; the spread may broadcast
        mean = mean.expand(shape).contiguous()
    return mean, spread


def relu_mean_std(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[ReLU(X)]`` for ``X ~ N(mean, std^2)``, elementwise (Eq. 1: ``T(mu, s)``).

    Broadcasts ``mean`` and ``std``; returns their broadcast shape in the promoted
    dtype (float32 at least). ``std = 0`` gives exactly ``ReLU(mean)``. Gradients are
    the analytic ``dT/dmean = Phi(z)``, ``dT/dstd = phi(z)``.
    Raises :class:`MomentInputError` for NaN or infinity in either argument (a Gaussian
    with an infinite mean or spread is not a distribution), negative ``std``, or
    shapes that do not broadcast.
    """
    mu, s = _check_pair(mean, std, "mean", "std", "relu_mean_std", expand=False)
    return _ReluMean.apply(mu, s)


def relu_mean(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[ReLU(X)]`` for ``X ~ N(mean, var)``; see :func:`relu_mean_std`.

    ``var = 0`` is legal. The derivative with respect to ``var`` at ``var = 0`` is
    0 (its limit for ``mean != 0``; at ``mean = 0`` it is unbounded and 0 is reported).
    """
    mu, v = _check_pair(mean, var, "mean", "var", "relu_mean", expand=False)
    return _ReluMean.apply(mu, _SafeSqrt.apply(v), v.detach())


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``ReLU(X)`` for ``X ~ N(mean, var)``, elementwise.

    Returns ``(mean, var)`` of the broadcast shape; the variance is never negative and
    is exactly 0 where ``var = 0``. Computed in float64 internally (see the module
    docstring for the accuracy reached). Raises :class:`MomentInputError` on bad input
    (as :func:`relu_mean_std`: NaN or inf in either argument, a negative ``var``).
    """
    mu, v = _check_pair(mean, var, "mean", "var", "relu_moments")
    v = v.contiguous()
    return _ReluMoments.apply(mu.contiguous(), _SafeSqrt.apply(v), v.detach())


def _check_cov(mean, cov, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    cov = as_float_tensor(cov, "cov", fn)
    check_covariance_matrix(cov, fn)
    if mean is not None:
        mean = as_float_tensor(mean, "mean", fn, like=cov, finite=True)
        if mean.dim() < 1 or mean.shape[-1:] != cov.shape[-1:]:
            raise MomentInputError(
                f"{fn}: mean of shape {tuple(mean.shape)} does not match cov of shape "
                f"{tuple(cov.shape)}"
            )
        try:
            torch.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
        except RuntimeError as exc:
            raise MomentInputError(
                f"{fn}: batch shapes of mean {tuple(mean.shape)} and cov {tuple(cov.shape)} "
                "do not broadcast"
            ) from exc
    return mean, cov


def _std_and_corr(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard deviations, correlation matrix (clamped to [-1, 1]) and a mask of
    pairs where both variables are non-degenerate."""
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    std = _SafeSqrt.apply(diag.contiguous())
    si, sj = std.unsqueeze(-1), std.unsqueeze(-2)
    both = (si > 0) & (sj > 0)
    denom = torch.where(both, si * sj, torch.ones_like(si * sj))
    rho = torch.where(both, cov / denom, torch.zeros_like(cov)).clamp(-1.0, 1.0)
    return std, rho, both


def relu_covariance(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Covariance matrix of ``ReLU(X)`` for ``X ~ N(mean, cov)``, exact for any means.

    ``mean``: ``(..., n)``; ``cov``: ``(..., n, n)`` symmetric with a non-negative
    diagonal. Returns ``(..., n, n)``. Off-diagonal entries use the truncated
    bivariate normal moments (module docstring) with the bivariate cdf of
    :func:`momentkit.special.bivariate_normal_cdf` (absolute error < 1e-15), so they
    are exact to about ``1e-15 * s_i s_j``; diagonal entries are the variances of
    :func:`relu_moments`. A variable with zero variance is constant and has zero
    covariance with everything. ``rho = +-1`` is legal. Evaluated in float64.
    Raises :class:`MomentInputError` for NaN or inf in ``mean`` or ``cov``, and for a
    ``cov`` that is not symmetric or not positive semi-definite beyond rounding (smallest
    eigenvalue below ``-65 n eps max(diag)`` in float32 and float64:
    ``momentkit._validate``). Empty input (``n = 0``) gives an empty result.
    """
    mean, cov = _check_cov(mean, cov, "relu_covariance")
    dtype = _compute_dtype(torch.promote_types(mean.dtype, cov.dtype))
    mu = mean.double()
    c = cov.double()
    std, rho, both = _std_and_corr(c)
    m_mean, var = _ReluMoments.apply(mu.contiguous(), std.expand_as(mu).contiguous())
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    z = torch.where(std > 0, mu / safe_std, torch.zeros_like(mu))
    a, b = z.unsqueeze(-1), z.unsqueeze(-2)
    a, b, rho_b = torch.broadcast_tensors(a, b, rho)
    # The three correction terms are b dPhi2/da + a dPhi2/db + r^2 dPhi2/drho.
    d_a, d_b, d_rho = bivariate_normal_cdf_partials(a, b, rho_b)
    r2 = ((1.0 - rho_b) * (1.0 + rho_b)).clamp_min(0.0)
    cross = (a * b + rho_b) * bivariate_normal_cdf(a, b, rho_b) + b * d_a + a * d_b + r2 * d_rho
    si, sj = std.unsqueeze(-1), std.unsqueeze(-2)
    out = si * sj * cross - m_mean.unsqueeze(-1) * m_mean.unsqueeze(-2)
    out = torch.where(both, out, torch.zeros_like(out))
    eye = torch.eye(out.shape[-1], dtype=torch.bool, device=out.device)
    out = torch.where(eye, torch.diag_embed(var), out)
    return out.to(dtype)


class _ZeroMeanKernel(torch.autograd.Function):
    """``f(rho) = rho acos(-rho) + sqrt(1 - rho^2) - 1`` with ``f'(rho) = acos(-rho)``:
    the derivative is finite at ``rho = +-1`` although each term's is not."""

    @staticmethod
    def forward(ctx, rho):
        ctx.save_for_backward(rho)
        return rho * torch.acos(-rho) + torch.sqrt(((1.0 - rho) * (1.0 + rho)).clamp_min(0)) - 1.0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (rho,) = ctx.saved_tensors
        return grad * torch.acos(-rho)


def relu_covariance_zero_mean(cov: torch.Tensor) -> torch.Tensor:
    """Covariance of ``ReLU(X)`` for ``X ~ N(0, cov)`` (Bibi et al. CVPR 2018):
    ``s_i s_j / (2 pi) (rho acos(-rho) + sqrt(1 - rho^2) - 1)``.

    Exact only for zero means; :func:`relu_covariance` handles any mean (for means
    (-2, -2), unit variances and rho = 0.8 the true value is about 0.0029 where this
    formula gives 0.254). ``cov``: ``(..., n, n)``; returns the same shape. Raises
    :class:`MomentInputError` for ``cov`` as :func:`relu_covariance` does.
    """
    _, cov = _check_cov(None, cov, "relu_covariance_zero_mean")
    dtype = _compute_dtype(cov.dtype)
    c = cov.to(dtype)
    std, rho, both = _std_and_corr(c)
    out = std.unsqueeze(-1) * std.unsqueeze(-2) / (2.0 * math.pi) * _ZeroMeanKernel.apply(rho)
    return torch.where(both, out, torch.zeros_like(out))
