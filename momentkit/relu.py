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
  Minus ``T_i T_j`` this cancels catastrophically for large ``|a|``, ``|b|`` (at
  ``a = b = 1e8`` every digit of ``rho`` is lost), so it is only ever applied to
  non-positive means: a variable with ``z > 0`` is reflected, ``ReLU(X) = X + ReLU(-X)``,
  and the cross terms follow from Stein's lemma ``Cov(X_i, ReLU(-X_j)) = -rho s_i s_j
  Phi(-b)``. For ``a, b > 0``: ``Cov = s_i s_j [rho (1 - Phi(-a) - Phi(-b)) + C(-a, -b;
  rho)]``; for ``a > 0 >= b``: ``s_i s_j [rho Phi(b) + C(-a, b; -rho)]``; for ``a, b <= 0``:
  ``s_i s_j C(a, b; rho)``, with ``C`` the Rosenbaum covariance above at non-positive
  means, a lower-tail quantity bounded by ``|rho|``: no large terms cancel, and the
  result is exact to about ``1e-15 s_i s_j`` for every mean (checked against mpmath for
  ``|mean/std|`` up to 1e300, ``rho`` in [-1, 1], mixed signs).

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

Derivatives. Every function here has exact first and second derivatives (Hessians,
gradient penalties; ``gradgradcheck`` in the tests): the backward passes are the
analytic derivatives written with differentiable operations
(``momentkit/_relu_kernels.py``, which also holds the branch points as named
constants). At ``s = 0`` the second derivatives are their limits (0 for ``mu != 0``) and
never NaN. The covariances' gradient at correlation ``+-1`` is the one-sided limit from
inside (Price's theorem: ``d Cov / d cov_ij = P(X_i > 0, X_j > 0)``); a second
derivative that does not exist there (unbounded) raises ``RuntimeError`` naming the
function rather than returning a number.

Precision. bfloat16 and float16 inputs are computed in float32 (float64 where the
float32 contract needs it, as above) and results and gradients come back in the input's
dtype.

Float32 fast path. :func:`momentkit.network_moments` evaluates the moments of every
float32 activation, about 30 float64 passes per element on the path above; it uses
instead ``momentkit._relu_kernels.ReluMomentsFast``, which returns ``(T, Var,
Phi(z))`` from float32 inputs ``(mu, var)`` in float32, branch free (no masks, no
indexing, no float64), with the analytic derivatives as its backward pass (float64
inputs keep the accurate path). With ``t = |z|``, ``P = Phi(-t)`` (``erfc``),
``phi = phi(t)`` and ``q = h(-t)``: ``T = ReLU(mu) + s q``,
``Var = var (Phi(z) - q (q + t))``; ``q = phi - t P`` for ``t < 2``, and from
``t = 2.25`` on (blended linearly in between) ``q = phi g`` and, for ``z < 0``,
``Var = var phi (w - phi g^2)``, with ``g = 1 - t R(t)`` and ``w = R(t) - t g`` from
22 terms of the continued fraction above started from the fixed point of its tail
(truncation below ``u / 3``, ``u = 2^-24``). Its error against the exact moments at the
same float32 inputs, derived and tested in ``tests/network/test_fast_path.py``:
``|dT| <= 2 u T + 4 u (1 + t^2) s (t P + phi)`` where the direct formula runs
(``t < 2.25`` or ``z > 0``) and ``10 u (1 + t^2) T`` in the lower tail; the variance
likewise (``10 u (1 + t^2) Var`` in the tail); plus an absolute ``16 * 2^-149 (s + 1)``
where ``phi(t)`` is subnormal in float32 (``t > 13.2``). The factor ``1 + t^2`` is the
problem's own condition number in the tail (``d log T / d log mu ~ t^2``): the error is
that of a few ulps of change in ``mu``. Measured: at most ``7.5 u (1 + t^2)`` relative on
the mean and ``27 u (1 + t^2)`` on the variance (at ``z`` near -2), ``1.7 u (1 + t^2)``
in the tail. ``var = 0`` gives exactly ``ReLU(mu)``, 0 and the step, with the one-sided
limits as derivatives; a derivative that exceeds float32's range (``dPhi(z)/dvar`` at a
subnormal ``var``) is an infinity of the right sign, never NaN.
"""

from __future__ import annotations

import math

import torch

from momentkit._relu_kernels import (
    ReluMean,
    ReluMoments,
    SafeSqrt,
    ZeroMeanKernel,
    standardize,
)
from momentkit._relu_kernels import (
    compute_dtype as _compute_dtype,
)
from momentkit._validate import (
    as_float_tensor,
    as_spread,
    broadcast_shape,
    check_covariance_matrix,
)
from momentkit.errors import MomentInputError
from momentkit.special import _normal_cdf as normal_cdf
from momentkit.special import (
    bivariate_normal_cdf,
    bivariate_normal_cdf_partials,
)


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

    Broadcasts ``mean`` and ``std``; returns their broadcast shape in their promoted
    dtype (half precision is computed in float32). ``std = 0`` gives exactly
    ``ReLU(mean)``. Gradients are the analytic ``dT/dmean = Phi(z)``,
    ``dT/dstd = phi(z)``, and differentiable again (exact second derivatives).
    Raises :class:`MomentInputError` for NaN or infinity in either argument (a Gaussian
    with an infinite mean or spread is not a distribution), negative ``std``, or
    shapes that do not broadcast.
    """
    mu, s = _check_pair(mean, std, "mean", "std", "relu_mean_std", expand=False)
    return ReluMean.apply(mu, s).to(_result_dtype(mean, std))


def relu_mean(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[ReLU(X)]`` for ``X ~ N(mean, var)``; see :func:`relu_mean_std`.

    ``var = 0`` is legal. The derivative with respect to ``var`` at ``var = 0`` is
    0 (its limit for ``mean != 0``; at ``mean = 0`` it is unbounded and 0 is reported).
    """
    mu, v = _check_pair(mean, var, "mean", "var", "relu_mean", expand=False)
    return ReluMean.apply(mu, SafeSqrt.apply(v), v.detach()).to(_result_dtype(mean, var))


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``ReLU(X)`` for ``X ~ N(mean, var)``, elementwise.

    Returns ``(mean, var)`` of the broadcast shape; the variance is never negative and
    is exactly 0 where ``var = 0``. Computed in float64 internally (see the module
    docstring for the accuracy reached). Raises :class:`MomentInputError` on bad input
    (as :func:`relu_mean_std`: NaN or inf in either argument, a negative ``var``).
    """
    mu, v = _check_pair(mean, var, "mean", "var", "relu_moments")
    v = v.contiguous()
    out = ReluMoments.apply(mu.contiguous(), SafeSqrt.apply(v), v.detach())
    dtype = _result_dtype(mean, var)
    return out[0].to(dtype), out[1].to(dtype)


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
    """Standard deviations, off-diagonal correlations (clamped to [-1, 1]; 0 on the
    diagonal, whose entries the callers form from the variances, so that no derivative of
    a function of rho at rho = 1, unbounded from the second order on, multiplies the
    zero derivative of cov_ii / (s_i s_i) and makes a NaN) and a mask of pairs where both
    variables are non-degenerate, and the diagonal mask."""
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    std = SafeSqrt.apply(diag.contiguous())
    si, sj = std.unsqueeze(-1), std.unsqueeze(-2)
    eye = torch.eye(cov.shape[-1], dtype=torch.bool, device=cov.device)
    both = (si > 0) & (sj > 0)
    off = both & ~eye
    denom = torch.where(off, si * sj, torch.ones_like(si * sj))
    rho = torch.where(off, cov / denom, torch.zeros_like(cov))
    # Rounding can push |rho| a hair past 1: clamp the value but pass the gradient, so
    # that at rho = +-1 it is the one-sided derivative from inside (Price's theorem:
    # d Cov / d cov_ij = P(X_i > 0, X_j > 0)), where torch's clamp would report 0.
    rho = rho + (rho.clamp(-1.0, 1.0) - rho).detach()
    return std, rho, both, eye


def _result_dtype(*args) -> torch.dtype:
    """The dtype results are returned in: the promoted dtype of the arguments as the
    checks read them (a non-tensor takes the dtype of the tensor before it, or the
    default), so half inputs get half results although the work is done in float32."""
    dtype = None
    for a in args:
        if isinstance(a, torch.Tensor):
            dtype = a.dtype if dtype is None else torch.promote_types(dtype, a.dtype)
        elif dtype is None:
            dtype = torch.get_default_dtype()
    return dtype


def _standardized_covariance(z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``Cov(ReLU(U_i), ReLU(U_j))`` for unit-variance ``U`` with means ``z`` ``(..., n)``
    and correlations ``rho`` ``(..., n, n)``, free of cancellation (module docstring).

    Each variable with ``z > 0`` is reflected, ``ReLU(U) = U + ReLU(-U)``, so that only
    lower-tail variables ``A = e U`` (``e = -1`` if ``z > 0`` else ``1``, mean
    ``-|z| <= 0``) enter a truncated moment. With ``q = 1`` where ``z > 0``, Stein's lemma
    ``Cov(U_i, ReLU(A_j)) = e_j rho Phi(-|z_j|)`` gives
    ``rho (q_i q_j + q_i e_j Phi(-|z_j|) + q_j e_i Phi(-|z_i|)) + C(-|z_i|, -|z_j|; e_i e_j rho)``
    where ``C(al, be; r) = E[ReLU(A_i) ReLU(A_j)] - h(al) h(be)`` (Rosenbaum's moment,
    ``h(x) = x Phi(x) + phi(x)``) has both means ``<= 0``: every term is bounded by a
    constant times ``|rho|`` or by lower-tail quantities, so nothing large cancels.
    """
    pos = z > 0
    e = torch.where(pos, -torch.ones_like(z), torch.ones_like(z))
    q = pos.to(z.dtype)
    low = e * z  # -|z|, differentiable (e is a constant sign)
    tail = normal_cdf(low)  # Phi(-|z|)
    ei, ej = e.unsqueeze(-1), e.unsqueeze(-2)
    qi, qj = q.unsqueeze(-1), q.unsqueeze(-2)
    linear = rho * (qi * qj + qi * ej * tail.unsqueeze(-2) + qj * ei * tail.unsqueeze(-1))
    r = ei * ej * rho
    a, b, r = torch.broadcast_tensors(low.unsqueeze(-1), low.unsqueeze(-2), r)
    d_a, d_b, d_r = bivariate_normal_cdf_partials(a, b, r)
    r2 = ((1.0 - r) * (1.0 + r)).clamp_min(0.0)
    cross = (a * b + r) * bivariate_normal_cdf(a, b, r) + b * d_a + a * d_b + r2 * d_r
    h = ReluMean.apply(low, torch.ones_like(low))
    return linear + cross - h.unsqueeze(-1) * h.unsqueeze(-2)


def relu_covariance(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Covariance matrix of ``ReLU(X)`` for ``X ~ N(mean, cov)``, exact for any means.

    ``mean``: ``(..., n)``; ``cov``: ``(..., n, n)`` symmetric with a non-negative
    diagonal. Returns ``(..., n, n)``. Off-diagonal entries use the truncated
    bivariate normal moments at non-positive standardized means, after reflecting each
    variable with a positive one (module docstring: no cancellation, however large
    ``|mean/std|``), with the bivariate cdf of
    :func:`momentkit.special.bivariate_normal_cdf` (absolute error < 1e-15), so they
    are exact to about ``1e-15 * s_i s_j``; diagonal entries are the variances of
    :func:`relu_moments`. A variable with zero variance is constant and has zero
    covariance with everything. ``rho = +-1`` is legal. Evaluated in float64, returned
    in the inputs' promoted dtype. Second derivatives are exact, except at
    ``rho = +-1`` with ``mean_i / s_i = rho mean_j / s_j``, where none exists and a
    second backward pass raises ``RuntimeError``.
    Raises :class:`MomentInputError` for NaN or inf in ``mean`` or ``cov``, and for a
    ``cov`` that is not symmetric or not positive semi-definite beyond rounding (smallest
    eigenvalue below ``-65 n eps max(diag)`` in float32 and float64:
    ``momentkit._validate``). Empty input (``n = 0``) gives an empty result.
    """
    mean, cov = _check_cov(mean, cov, "relu_covariance")
    mu = mean.double()
    c = cov.double()
    std, rho, both, eye = _std_and_corr(c)
    _, var = ReluMoments.apply(mu.contiguous(), std.expand_as(mu).contiguous())
    out = std.unsqueeze(-1) * std.unsqueeze(-2) * _standardized_covariance(
        standardize(mu, std.expand_as(mu)), rho
    )
    out = torch.where(both, out, torch.zeros_like(out))
    out = torch.where(eye, torch.diag_embed(var), out)
    return out.to(torch.promote_types(mean.dtype, cov.dtype))


def relu_covariance_zero_mean(cov: torch.Tensor) -> torch.Tensor:
    """Covariance of ``ReLU(X)`` for ``X ~ N(0, cov)`` (Bibi et al. CVPR 2018):
    ``s_i s_j / (2 pi) (rho acos(-rho) + sqrt(1 - rho^2) - 1)``.

    Exact only for zero means; :func:`relu_covariance` handles any mean (for means
    (-2, -2), unit variances and rho = 0.8 the true value is about 0.0029 where this
    formula gives 0.254). ``cov``: ``(..., n, n)``; returns the same shape and dtype.
    Second derivatives are exact for ``|rho| < 1``; at ``rho = +-1`` between two
    variables the second derivative ``1/sqrt(1 - rho^2)`` is unbounded, and a second
    backward pass that needs it raises ``RuntimeError``. Raises
    :class:`MomentInputError` for ``cov`` as :func:`relu_covariance` does.
    """
    _, cov = _check_cov(None, cov, "relu_covariance_zero_mean")
    c = cov.to(_compute_dtype(cov.dtype))
    std, rho, both, eye = _std_and_corr(c)
    out = std.unsqueeze(-1) * std.unsqueeze(-2) / (2.0 * math.pi) * ZeroMeanKernel.apply(rho)
    out = torch.where(both, out, torch.zeros_like(out))
    # The diagonal is the variance s^2 (1/2 - 1/(2 pi)), the kernel's value at rho = 1.
    var = torch.diagonal(c, dim1=-2, dim2=-1) * ((math.pi - 1.0) / (2.0 * math.pi))
    return torch.where(eye, torch.diag_embed(var), out).to(cov.dtype)
