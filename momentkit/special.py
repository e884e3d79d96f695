"""Standard normal functions and the bivariate normal cdf, on tensors.

Every function takes and returns tensors of any floating dtype and device;
constants take the dtype and device of the input. bfloat16 and float16 inputs are
computed in float32 (the bivariate cdf in float64) and the results and gradients
returned in the input's dtype.

Derivatives of every order are the analytic ones: the univariate functions are
compositions of torch primitives (``erfc``, ``log_ndtr``, ``erfcx``, ``exp``) that
autograd differentiates any number of times; the bivariate cdf's backward pass is the
closed form :func:`bivariate_normal_cdf_partials`, itself differentiable, so Hessians
and gradient penalties are exact (``gradgradcheck`` in the tests). Where none exists, at
the kink ``rho = +-1``, ``h = rho k``, a second derivative raises ``RuntimeError``.

Branch points (module constants, bracketed one ulp either side in the tests):
:data:`BVN_HIGH_CORRELATION`, :data:`BVN_HK_CUTOFF`; quadrature size :data:`GL_POINTS`.

* ``normal_pdf(x)  = exp(-x**2 / 2) / sqrt(2 pi)``
* ``normal_cdf(x)  = Phi(x) = erfc(-x / sqrt 2) / 2`` (relative accuracy in both tails,
  because ``erfc`` is evaluated directly and never as ``1 - erf``)
* ``log_normal_cdf(x) = log Phi(x)`` (``torch.special.log_ndtr``: finite for x -> -inf)
* ``mills_ratio(x) = (1 - Phi(x)) / phi(x) = sqrt(pi / 2) * erfcx(x / sqrt 2)``
* ``bivariate_normal_cdf(h, k, rho) = P(X < h, Y < k)`` for a standard bivariate normal
  with correlation ``rho`` (Drezner and Wesolowsky 1990 in the form of Genz 2004,
  20-point Gauss-Legendre; absolute error below 1e-15 in float64).

Input checks: NaN anywhere raises :class:`MomentInputError` naming the function and
the argument; infinities give the limits (``Phi(+-inf) = 1, 0``, ``phi(+-inf) = 0``,
``log Phi(-inf) = -inf``, ``R(-inf) = inf``, ``Phi2(+inf, k) = Phi(k)``), as each
function's docstring states.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from momentkit._validate import check_not_nan
from momentkit.errors import MomentInputError

_SQRT2 = math.sqrt(2.0)
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SQRT_PI_OVER_2 = math.sqrt(math.pi / 2.0)

GL_POINTS = 20
"""Gauss-Legendre points of both bivariate-cdf quadratures. Genz (2004) uses 6 points for
``|rho| < 0.3``, 12 for ``|rho| < 0.75`` and 20 above; 20 everywhere costs a little more
at low correlation and removes two branch switches (each region is still tested against
mpmath on its own)."""
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(GL_POINTS)

BVN_HIGH_CORRELATION = 0.925
"""``|rho|`` below this: Gauss-Legendre in ``theta`` over ``[0, asin(rho)]`` (Sheppard's
formula); from it on: Drezner and Wesolowsky's transformation to ``rho = +-1`` plus a
correction integral, which stays accurate as ``rho -> +-1`` where the first integrand
(``1 / (1 - sin^2 theta)``) turns singular. 0.925 is Genz's (2004) switch, where both
forms reach double precision with 20 points."""

BVN_HK_CUTOFF = -160.0
"""High-correlation branch: the term ``exp(-hk/2) Phi(-b/a) ...`` is dropped where
``hk <= -160`` (``hk`` after flipping ``k`` for ``rho < 0``). There ``exp(-hk/2)`` would
overflow towards ``exp(80)``, while ``Phi(-|h - k|/a)`` with ``|h - k| >= 2 sqrt(-hk)``
has already underflowed to 0 (``|h - k| / a >= 25 / sqrt(1 - 0.925^2) > 38.5``), so the
product is exactly 0 in float64 either side of the cutoff."""


BVN_INFINITY = 1e10
"""``h`` and ``k`` are clamped to ``[-1e10, 1e10]``, so that infinite limits are exact and
finite: ``Phi2(+inf, k; rho) = Phi(k)``, ``Phi2(+inf, +inf; rho) = 1`` and 0 when either
is ``-inf``. Beyond ``|x| ~ 38.5`` ``Phi(x)`` is 0 or 1 in float64 and ``phi(x)`` 0, so
the clamp changes no value and no derivative (the clamped argument's derivative,
``phi(h) Phi(...)``, is 0 there as it is at infinity, and the other one's is the limit
``phi(k)``), while it keeps products such as ``h k`` and ``h^2`` finite (no ``inf - inf``
or ``0 * inf`` inside the quadratures)."""


_PDF_CLAMP = 1e10
""":func:`normal_pdf` clamps its argument here: ``phi(1e10) = 0`` in every dtype."""


def _upcast(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``x`` in float32 at least (half precision is computed in float32, since its
    ``exp`` and ``erfc`` would lose the relative accuracy in the tails), and the dtype
    to return."""
    return x.to(torch.promote_types(x.dtype, torch.float32)), x.dtype


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """``phi(x)`` without input checks (the kernels' internal use)."""
    x, dtype = _upcast(x)
    return (torch.exp(-0.5 * x * x) / _SQRT_2PI).to(dtype)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """``Phi(x)`` without input checks (the kernels' internal use)."""
    x, dtype = _upcast(x)
    return (0.5 * torch.special.erfc(-x / _SQRT2)).to(dtype)


def _checked(x: torch.Tensor, fn: str) -> torch.Tensor:
    """``x`` as a tensor (integer tensors are computed in float32), NaN refused."""
    if not isinstance(x, torch.Tensor):
        raise MomentInputError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    check_not_nan(x, "x", fn)
    return x


def normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal density ``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)``, elementwise.

    ``phi(+-inf) = 0`` with derivative 0 (``x`` is clamped to ``+-1e10``, where ``phi``
    is already 0 in every dtype, so that the derivative ``-x phi(x)`` is never
    ``inf * 0``). Raises :class:`MomentInputError` for NaN in ``x``.
    """
    x, dtype = _upcast(_checked(x, "normal_pdf"))
    return _normal_pdf(x.clamp(-_PDF_CLAMP, _PDF_CLAMP)).to(dtype)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal cdf ``Phi(x)``, relatively accurate in the lower tail.

    ``Phi(-inf) = 0``, ``Phi(+inf) = 1``, both with derivative 0. Raises
    :class:`MomentInputError` for NaN in ``x``.
    """
    return _normal_cdf(_checked(x, "normal_cdf"))


def log_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """``log Phi(x)``, finite down to very negative ``x``.

    ``log Phi(+inf) = 0`` and ``log Phi(-inf) = -inf`` (the exact limit). Raises
    :class:`MomentInputError` for NaN in ``x``.
    """
    x, dtype = _upcast(_checked(x, "log_normal_cdf"))
    return torch.special.log_ndtr(x).to(dtype)


def mills_ratio(x: torch.Tensor) -> torch.Tensor:
    """Mills ratio ``(1 - Phi(x)) / phi(x)``, computed through ``erfcx``.

    ``R(+inf) = 0`` and ``R(-inf) = +inf`` (the exact limit). Raises
    :class:`MomentInputError` for NaN in ``x``.
    """
    x, dtype = _upcast(_checked(x, "mills_ratio"))
    return (_SQRT_PI_OVER_2 * torch.special.erfcx(x / _SQRT2)).to(dtype)


def _gl(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nodes = torch.as_tensor(_GL_NODES, dtype=ref.dtype, device=ref.device)
    weights = torch.as_tensor(_GL_WEIGHTS, dtype=ref.dtype, device=ref.device)
    return nodes, weights


def _bvn_upper(h: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``P(X > h, Y > k)`` for correlation ``r`` in [-1, 1] (Genz's BVNU), no autograd."""
    nodes, weights = _gl(h)
    two_pi = 2.0 * math.pi
    low = r.abs() < BVN_HIGH_CORRELATION

    # Moderate correlation: Phi(-h) Phi(-k) + 1/(2 pi) int_0^asin(r) exp(...) dtheta.
    r_low = torch.where(low, r, torch.zeros_like(r))
    hk = h * k
    hs = 0.5 * (h * h + k * k)
    asr = torch.asin(r_low)
    sn = torch.sin(asr.unsqueeze(-1) * (nodes + 1.0) / 2.0)
    integrand = torch.exp((sn * hk.unsqueeze(-1) - hs.unsqueeze(-1)) / (1.0 - sn * sn))
    bvn_low = asr * (integrand * weights).sum(-1) / (2.0 * two_pi)
    bvn_low = bvn_low + _normal_cdf(-h) * _normal_cdf(-k)

    # High correlation (Drezner-Wesolowsky): reduce to rho = +1 after flipping k.
    r_high = torch.where(low, torch.full_like(r, 0.95), r)
    neg = r_high < 0
    kk = torch.where(neg, -k, k)
    hk2 = h * kk
    one_minus = (1.0 - r_high.abs()) * (1.0 + r_high.abs())
    degenerate = one_minus <= 0
    a_sq = torch.where(degenerate, torch.ones_like(one_minus), one_minus)
    a = torch.sqrt(a_sq)
    bs = (h - kk) ** 2
    c = (4.0 - hk2) / 8.0
    d = (12.0 - hk2) / 16.0
    part = a * torch.exp(-(bs / a_sq + hk2) / 2.0) * (
        1.0 - c * (bs - a_sq) * (1.0 - d * bs / 5.0) / 3.0 + c * d * a_sq * a_sq / 5.0
    )
    b = torch.sqrt(bs)
    # exp(-hk/2) overflows for hk << 0, where Phi(-b/a) has underflowed already.
    tail = torch.exp(-torch.clamp(hk2, min=BVN_HK_CUTOFF) / 2.0) * _SQRT_2PI
    tail = tail * _normal_cdf(-b / a) * b * (1.0 - c * bs * (1.0 - d * bs / 5.0) / 3.0)
    part = part - torch.where(hk2 > BVN_HK_CUTOFF, tail, torch.zeros_like(tail))
    half = a / 2.0
    xs = (half.unsqueeze(-1) * (nodes + 1.0)) ** 2
    rs = torch.sqrt(1.0 - xs)
    bs_e, hk_e, c_e, d_e = bs.unsqueeze(-1), hk2.unsqueeze(-1), c.unsqueeze(-1), d.unsqueeze(-1)
    term = torch.exp(-bs_e / (2.0 * xs) - hk_e / (1.0 + rs)) / rs - torch.exp(
        -(bs_e / xs + hk_e) / 2.0
    ) * (1.0 + c_e * xs * (1.0 + d_e * xs))
    part = part + half * (weights * term).sum(-1)
    part = -part / two_pi
    part = torch.where(degenerate, torch.zeros_like(part), part)
    pos_value = part + _normal_cdf(-torch.maximum(h, kk))
    neg_value = -part + torch.clamp(_normal_cdf(kk) - _normal_cdf(h), min=0.0)
    bvn_high = torch.where(neg, neg_value, pos_value)
    return torch.where(low, bvn_low, bvn_high).clamp(0.0, 1.0)


def bivariate_normal_cdf_partials(
    h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial derivatives of ``Phi2(h, k; rho)``, in closed form:
    ``phi(h) Phi((k - rho h)/r)``, ``phi(k) Phi((h - rho k)/r)`` and
    ``phi2(h, k; rho)`` (``r = sqrt(1 - rho^2)``).

    At ``rho = +-1`` the first two are their limits (``Phi`` of a step in
    ``k - rho h``) and the rho-derivative is its limit 0 (a point mass where
    ``h = rho k``, reported as 0 in first derivatives). Built
    from differentiable operations whose untaken branches stay finite, so it can itself
    be differentiated (the ReLU covariance does).
    """
    r2 = (1.0 - rho) * (1.0 + rho)
    interior = r2 > 0
    safe_r2 = torch.where(interior, r2, torch.ones_like(r2))
    r = torch.sqrt(safe_r2)
    big = torch.finfo(h.dtype).max
    arg_h = torch.where(interior, (k - rho * h) / r, torch.sign(k - rho * h) * big)
    arg_k = torch.where(interior, (h - rho * k) / r, torch.sign(h - rho * k) * big)
    d_h = _normal_pdf(h) * _normal_cdf(arg_h)
    d_k = _normal_pdf(k) * _normal_cdf(arg_k)
    quad = (h * h - 2.0 * rho * h * k + k * k) / safe_r2
    d_rho = torch.where(
        interior, torch.exp(-0.5 * quad) / (2.0 * math.pi * r), torch.zeros_like(r)
    )
    return d_h, d_k, d_rho


class _PointMassGuard(torch.autograd.Function):
    """Identity on the partial derivatives of ``Phi2``, whose own backward pass (a third
    order for ``Phi2``) refuses the points ``rho = +-1``, ``h = rho k``, where
    ``Phi2(h, k; +-1)`` has a kink and its second derivatives are unbounded (Dirac
    masses), rather than report 0 there. Elsewhere at ``rho = +-1`` they are the
    (exponentially small, in rho) limits, which the closed forms give exactly."""

    @staticmethod
    def forward(ctx, h, k, rho, d_h, d_k, d_rho):
        ctx.save_for_backward(h, k, rho)
        return d_h.view_as(d_h), d_k.view_as(d_k), d_rho.view_as(d_rho)

    @staticmethod
    def backward(ctx, g_h, g_k, g_rho):
        h, k, rho = ctx.saved_tensors
        kink = ((1.0 - rho) * (1.0 + rho) <= 0) & (h == rho * k)
        if bool(kink.any()):
            used = sum((g != 0) for g in (g_h, g_k, g_rho) if g is not None)
            if bool((kink & (used != 0)).any()):
                raise RuntimeError(
                    "bivariate_normal_cdf: second derivatives are unbounded at rho = +-1 "
                    "with h = rho * k (also inside relu_covariance: two perfectly "
                    "correlated variables with equal mean / std, or opposite for rho = -1)"
                )
        return None, None, None, g_h, g_k, g_rho


class _BivariateNormalCdf(torch.autograd.Function):
    """Forward by Genz's algorithm, backward by :func:`bivariate_normal_cdf_partials`
    of the saved inputs: differentiable operations, so second derivatives (Hessians) are
    the exact derivatives of the closed-form partials."""

    @staticmethod
    def forward(ctx, h, k, rho):  # noqa: D401
        ctx.save_for_backward(h, k, rho)
        return _bvn_upper(-h, -k, rho)

    @staticmethod
    def backward(ctx, grad):
        h, k, rho = ctx.saved_tensors
        d_h, d_k, d_rho = bivariate_normal_cdf_partials(h, k, rho)
        if torch.is_grad_enabled():  # a graph is being built: guard the kink at rho = +-1
            d_h, d_k, d_rho = _PointMassGuard.apply(
                h.detach(), k.detach(), rho.detach(), d_h, d_k, d_rho
            )
        return grad * d_h, grad * d_k, grad * d_rho


def bivariate_normal_cdf(
    h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """``Phi2(h, k; rho) = P(X < h, Y < k)``, standard bivariate normal, correlation rho.

    Broadcasts its arguments. ``rho`` must lie in [-1, 1]; ``rho = +-1`` gives the
    exact degenerate limits ``Phi(min(h, k))`` and ``max(0, Phi(h) - Phi(-k))``.
    Lower-precision inputs (float32, bfloat16, float16) are evaluated in float64 and
    rounded back. First and second derivatives are exact (module docstring); a second
    derivative at ``rho = +-1``, ``h = rho k`` (a kink) raises ``RuntimeError``.
    Infinite ``h`` or ``k`` give the exact limits (``Phi(k)`` for ``h = +inf``, 1 for
    both ``+inf``, 0 for ``-inf``) and finite gradients, the limits ``0`` and ``phi(k)``
    (:data:`BVN_INFINITY`).
    Raises :class:`MomentInputError` for NaN or ``|rho| > 1``.
    """
    h, k, rho = torch.broadcast_tensors(*map(torch.as_tensor, (h, k, rho)))
    for name, t in (("h", h), ("k", k), ("rho", rho)):
        if not t.is_floating_point():
            raise MomentInputError(f"bivariate_normal_cdf: {name} must be a floating tensor")
        check_not_nan(t, name, "bivariate_normal_cdf")
    if bool((rho.abs() > 1).any()):
        raise MomentInputError("bivariate_normal_cdf: rho must lie in [-1, 1]")
    dtype = h.dtype
    h, k = (t.double().clamp(-BVN_INFINITY, BVN_INFINITY) for t in (h, k))
    out = _BivariateNormalCdf.apply(h, k, rho.double())
    # The limits exactly (the high-correlation quadrature is accurate in absolute terms
    # only, so Phi2(k, +inf) would otherwise carry an error of 1e-17 in the lower tail).
    out = torch.where(h >= BVN_INFINITY, _normal_cdf(k), out)
    out = torch.where(k >= BVN_INFINITY, _normal_cdf(h), out)
    out = torch.where((h <= -BVN_INFINITY) | (k <= -BVN_INFINITY), torch.zeros_like(out), out)
    return out.to(dtype)
