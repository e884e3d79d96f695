"""Kernels and autograd Functions behind :mod:`momentkit.relu` (see its docstring for
the formulas and the accuracy reached).

Branch points, importable so that the tests bracket each one a hair either side:
:data:`TAIL_SWITCH`, :data:`RECOMPUTE_Z_LOW_PRECISION`, :data:`RECOMPUTE_Z_FLOAT64`,
:data:`CF_TERMS`, :data:`Z_CLAMP`; those of the float32 fast path
(:class:`ReluMomentsFast`): :data:`FAST_TAIL_SWITCH`, :data:`FAST_BLEND_WIDTH`,
:data:`FAST_CF_TERMS`.

Derivatives of every order. Each backward pass is written with differentiable torch
operations on the saved *inputs* (never on values computed in the forward pass under
``no_grad``, which autograd would treat as constants), so a second backward
(``create_graph=True``: Hessians, gradient penalties) differentiates the analytic first
derivatives: ``dT/dmu = Phi(z)``, ``dT/ds = phi(z)`` (and, for the variance,
``2 T Phi(-z)`` and ``2 s Phi(z) - 2 T phi(z)`` with ``T`` from :class:`ReluMean`
itself). When no graph is being built, the backward passes reuse what the forward pass
kept and cost what they did before.
"""

from __future__ import annotations

import math

import torch

from momentkit.special import _normal_cdf as normal_cdf
from momentkit.special import _normal_pdf as normal_pdf

TAIL_SWITCH = 3.0
"""``|z|`` beyond which the tail (continued-fraction) formulas replace the central ones.
At the switch the central formulas cancel at most a factor ``1/(1 - 3 R(3)) ~ 7`` (``R``
the Mills ratio) of their digits, and the continued fraction still converges to double
precision within :data:`CF_TERMS` terms; further out the cancellation grows like ``z^2``."""

RECOMPUTE_Z_LOW_PRECISION = -2.0
"""Below float64, the mean's entries with ``z < -2`` are recomputed in float64. There the
direct formula cancels by ``|z| Phi(z) / h(z)`` (5.4 at ``z = -2``) on top of the float32
rounding of ``z = mu / s`` amplified ``z^2``-fold: together more than the float32
contract (relative 1e-5) allows, while at ``z >= -2`` the measured error is 9.5e-7."""

RECOMPUTE_Z_FLOAT64 = -TAIL_SWITCH
"""In float64 the mean's entries with ``z < -3`` take the continued-fraction tail; above
it the direct formula in float64 loses at most a factor 11 and stays within 1e-12."""

CF_TERMS = 60
"""Terms of the Mills-ratio continued fraction: its truncation error at ``t >= 3`` is below
1e-17 relative (checked against mpmath in the tests); it converges faster for larger t."""

Z_CLAMP = 1e10
"""``|z|`` is clamped here. ``phi(z)`` underflows to 0 in float64 from ``|z| ~ 38.6``, so
the clamp changes no value, but it keeps ``z`` times a tail quantity away from
``inf * 0``."""

FAST_TAIL_SWITCH = 2.0
"""Float32 fast path: ``t = |z|`` from which the continued-fraction tail takes over from the
direct formulas (fully from ``FAST_TAIL_SWITCH + FAST_BLEND_WIDTH`` on, blended linearly
in between, where both are accurate). Below it the direct formulas cancel by at most a
factor ``(t Phi(-t) + phi(t)) / h(-t) = 14`` (mean, at 2.25) and about 8 (variance)."""

FAST_BLEND_WIDTH = 0.25
"""Width of the linear blend between the direct and the tail formulas of the fast path
(a blend instead of a selection: ``torch.where`` costs about 25 multiplications on CPU)."""

FAST_CF_TERMS = 22
"""Terms of the fast path's continued fraction, started from the fixed point
``e = (sqrt(t^2 + 4 (K + 1)) - t) / 2`` of its remaining tail instead of 0: truncation
error below 2e-8 relative at ``t >= 2`` (a third of float32's rounding unit), checked
against mpmath in the tests."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The working dtype for inputs of ``dtype``: float32 at least (half inputs are
    computed in float32, float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def mills_tail(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``t >= 3``: ``g = 1 - t R(t)`` and ``w = R(t) - t g(t)`` by continued fraction."""
    e = torch.zeros_like(t)
    for k in range(CF_TERMS, 1, -1):
        e = k / (t + e)
    c = 1.0 / (t + e)
    g = c / (t + c)
    w = e / ((t + e) * (t + c))
    return g, w


def standardize(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z = mu / s``, clamped; at ``s = 0`` the limit ``sign(mu) * inf`` (0 at mu = 0).

    Differentiable: the branch not taken divides by 1, so no NaN or inf reaches a
    gradient, and the limit at ``s = 0`` has zero derivative.
    """
    positive = s > 0
    z = mu / torch.where(positive, s, torch.ones_like(s))
    z_limit = torch.sign(mu) * Z_CLAMP
    return torch.where(positive, z.clamp(-Z_CLAMP, Z_CLAMP), z_limit)


def _lower_tail(mu: torch.Tensor, s: torch.Tensor, with_var: bool):
    """Mean (and variance) for ``z = mu/s < -3``, in float64 and in log space.

    ``T = s phi(t) g(t)`` and ``Var = s^2 phi(t) [w(t) - phi(t) g(t)^2]`` with
    ``t = -z``; ``phi(t)`` is subnormal beyond ``t ~ 37.5`` while the products can still
    be normal numbers, so they are formed as ``exp(log s - t^2/2 - log sqrt(2 pi) + ...)``.
    """
    t = -standardize(mu, s)
    g, w = mills_tail(t)
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


def _central_mean(mu: torch.Tensor, s: torch.Tensor):
    """``mu Phi(z) + s phi(z)`` in ``mu``'s dtype, with ``Phi(z)``, ``exp(-z^2/2)`` (the
    derivatives, up to the constant ``1/sqrt(2 pi)``) and ``z``; about ten passes."""
    if bool((s > 0).all()):
        w = mu * (-1.0 / (math.sqrt(2.0) * s))  # w = -z / sqrt 2
    else:
        w = standardize(mu, s).mul_(-1.0 / math.sqrt(2.0))
    z = w * -math.sqrt(2.0)
    cdf = torch.special.erfc(w).mul_(0.5)
    gauss = w.square_().neg_().exp_()  # exp(-z^2 / 2); w is overwritten
    out = torch.mul(cdf, mu).addcmul_(s * _INV_SQRT_2PI, gauss)
    return out, cdf, gauss, z


def _exact_mean64(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``T(mu, s)`` in float64 for the entries given: direct for ``z >= -3``, the
    continued-fraction tail below."""
    mu, s = mu.double(), s.double()
    z = standardize(mu, s)
    out = mu * normal_cdf(z) + s * normal_pdf(z)
    tail = z < -TAIL_SWITCH
    if bool(tail.any()):
        out[tail] = _lower_tail(mu[tail], s[tail], with_var=False)[0]
    return out


def mean_forward(mu: torch.Tensor, s: torch.Tensor, var: torch.Tensor | None = None):
    """``T(mu, s)``, ``Phi(z)`` and ``exp(-z^2/2)``, all in ``mu``'s dtype (float32 or
    float64), no autograd.

    ``s`` (and ``var``) broadcast against ``mu`` without being expanded (in training
    the variance is one image broadcast over the batch). The direct formula
    ``mu Phi(z) + s phi(z)`` runs in ``mu``'s dtype (the hot path). It cancels for
    negative ``z``, by a factor ``|z| Phi(z) / h(z)`` (5.4 at ``z = -2``, 11 at -3), on
    top of the rounding of ``z = mu / s`` itself, amplified ``z^2``-fold. So the entries
    below :data:`RECOMPUTE_Z_LOW_PRECISION` (float32) or :data:`RECOMPUTE_Z_FLOAT64`
    are recomputed in float64 with the standard deviation taken from ``var`` when given,
    the tail ``z < -3`` by the continued fraction: measured relative error 9.5e-7 in
    float32, 3e-13 in float64.
    """
    out, cdf, gauss, z = _central_mean(mu, s)
    float64 = mu.dtype == torch.float64
    redo = z < (RECOMPUTE_Z_FLOAT64 if float64 else RECOMPUTE_Z_LOW_PRECISION)
    if bool(redo.any()):
        mu_r = mu.expand_as(z)[redo]
        s_r = _std64(s.expand_as(z), None if var is None else var.expand_as(z), redo)
        if float64:
            out[redo] = _lower_tail(mu_r, s_r, with_var=False)[0]
        else:
            out[redo] = _exact_mean64(mu_r, s_r).to(out.dtype)
    return out, cdf, gauss


def moments64(mu: torch.Tensor, s: torch.Tensor, var: torch.Tensor | None = None):
    """Mean and variance of ReLU(N(mu, s^2)), everything in float64, no autograd."""
    mu, s = mu.double(), _std64(s, var)
    z = standardize(mu, s)
    cdf, pdf = normal_cdf(z), normal_pdf(z)
    h = z * cdf + pdf
    mean = mu * cdf + s * pdf
    var_scaled = cdf - h * (h - z)
    upper = z > TAIL_SWITCH
    if bool(upper.any()):
        # v = Phi(z) - h(z) h(-z) with h(-z) from the continued fraction, h(z) = z + h(-z).
        zu = z[upper]
        g, _ = mills_tail(zu)
        h_small = normal_pdf(zu) * g
        mean[upper] = mu[upper] + s[upper] * h_small
        var_scaled[upper] = cdf[upper] - (zu + h_small) * h_small
    var = (s * s) * var_scaled.clamp_min(0.0)
    lower = z < -TAIL_SWITCH
    if bool(lower.any()):
        mean[lower], var[lower] = _lower_tail(mu[lower], s[lower], with_var=True)
    return mean, var


class ReluMean(torch.autograd.Function):
    """``T(mu, s)`` (forward :func:`mean_forward`) with the analytic derivatives
    ``Phi(z)`` and ``phi(z)``.

    First backward without a graph: two products with the ``Phi(z)`` and ``exp(-z^2/2)``
    the forward pass kept. With ``create_graph``: ``Phi(z)`` and ``phi(z)`` recomputed
    from the saved inputs by differentiable operations, so that second derivatives
    (``phi(z)/s``, ``-z phi(z)/s``, ``z^2 phi(z)/s``) come out exactly.
    """

    @staticmethod
    def forward(ctx, mu, s, var=None):
        out, cdf, gauss = mean_forward(mu, s, var)
        ctx.save_for_backward(mu, s, cdf, gauss)
        return out

    @staticmethod
    def backward(ctx, grad):
        mu, s, cdf, gauss = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph is being built: differentiable derivatives
            z = standardize(mu, s)
            cdf, gauss = normal_cdf(z), normal_pdf(z) * math.sqrt(2.0 * math.pi)
        g_mu = g_s = None
        if ctx.needs_input_grad[0]:
            g_mu = (grad * cdf).sum_to_size(mu.shape)
        if ctx.needs_input_grad[1]:  # phi(z) = exp(-z^2/2) / sqrt(2 pi), scaled after the sum
            g_s = (grad * gauss).sum_to_size(s.shape) * _INV_SQRT_2PI
        return g_mu, g_s, None


class ReluMoments(torch.autograd.Function):
    """Mean and variance (forward :func:`moments64`), backward by Stein's lemma:
    ``dVar/dmu = 2 T Phi(-z)``, ``dVar/ds = 2 s Phi(z) - 2 T phi(z)``. With
    ``create_graph`` the mean ``T`` in these is :class:`ReluMean` of the inputs, so the
    second derivatives are exact too."""

    @staticmethod
    def forward(ctx, mu, s, var_in=None):
        mean, var = moments64(mu, s, var_in)
        ctx.save_for_backward(mu, s, mean)
        return mean.to(mu.dtype), var.to(mu.dtype)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        mu, s, mean = ctx.saved_tensors
        mu64, s64 = mu.double(), s.double()
        if torch.is_grad_enabled():
            mean = ReluMean.apply(mu64, s64)
        z = standardize(mu64, s64)
        cdf, pdf = normal_cdf(z), normal_pdf(z)
        d_var_mu = 2.0 * mean * normal_cdf(-z)
        d_var_s = 2.0 * s64 * cdf - 2.0 * mean * pdf
        g_mu = grad_mean.double() * cdf + grad_var.double() * d_var_mu
        g_s = grad_mean.double() * pdf + grad_var.double() * d_var_s
        return g_mu.to(mu.dtype), g_s.to(s.dtype), None


class SafeSqrt(torch.autograd.Function):
    """``sqrt(v)`` whose derivative at ``v = 0`` is taken as 0 instead of ``+inf``.

    Through ``T`` the derivative ``dT/dvar = phi(z) / (2 s)`` tends to 0 as ``s -> 0``
    for every ``mu != 0``, and so do all higher ones; at ``mu = 0`` they are unbounded,
    and 0 is reported there so that no infinity ever reaches an optimizer. The backward
    pass is differentiable (``-1/(4 v^{3/2})`` for ``v > 0``, 0 at ``v = 0``).
    """

    @staticmethod
    def forward(ctx, v):
        out = torch.sqrt(v)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        positive = out > 0
        safe = torch.where(positive, out, torch.ones_like(out))
        return torch.where(positive, grad / (2.0 * safe), torch.zeros_like(grad))


class _AcosNeg(torch.autograd.Function):
    """``acos(-rho)``, whose derivative ``1/sqrt(1 - rho^2)`` is unbounded at ``rho = +-1``:
    a backward pass that would need it there raises instead of returning inf or NaN."""

    @staticmethod
    def forward(ctx, rho):
        ctx.save_for_backward(rho)
        return torch.acos(-rho)

    @staticmethod
    def backward(ctx, grad):
        (rho,) = ctx.saved_tensors
        r2 = (1.0 - rho) * (1.0 + rho)
        interior = r2 > 0
        if bool((~interior & (grad != 0)).any()):
            raise RuntimeError(
                "relu_covariance_zero_mean: the second derivative is unbounded where two "
                "variables have correlation +-1 (it grows like 1/sqrt(1 - rho^2)); no "
                "second derivative exists there"
            )
        safe = torch.where(interior, r2, torch.ones_like(r2))
        return torch.where(interior, grad / torch.sqrt(safe), torch.zeros_like(grad))


class ZeroMeanKernel(torch.autograd.Function):
    """``f(rho) = rho acos(-rho) + sqrt(1 - rho^2) - 1`` with ``f'(rho) = acos(-rho)``:
    the derivative is finite at ``rho = +-1`` although each term's is not. The second
    derivative ``1/sqrt(1 - rho^2)`` is exact inside and refused at ``rho = +-1``."""

    @staticmethod
    def forward(ctx, rho):
        ctx.save_for_backward(rho)
        return rho * torch.acos(-rho) + torch.sqrt(((1.0 - rho) * (1.0 + rho)).clamp_min(0)) - 1.0

    @staticmethod
    def backward(ctx, grad):
        (rho,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return grad * _AcosNeg.apply(rho)
        return grad * torch.acos(-rho)


def fast_tail_fraction(
    t: torch.Tensor, terms: int = FAST_CF_TERMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``t >= FAST_TAIL_SWITCH``: ``g = 1 - t R(t)`` and ``w = R(t) - t g(t)`` (as
    :func:`mills_tail`) with ``terms`` terms started from the tail's fixed point, in
    ``t``'s dtype (no subtraction anywhere)."""
    a = 2.0 * (terms + 1)
    e = torch.addcmul(torch.full_like(t, 2.0 * a), t, t).sqrt_().add_(t).reciprocal_().mul_(a)
    for k in range(terms, 1, -1):
        e = e.add_(t).reciprocal_().mul_(float(k))
    te = t + e
    c = te.reciprocal()
    tc = t + c
    return c.div_(tc), e.div_(te.mul_(tc))


def fast_moments(mu: torch.Tensor, var: torch.Tensor):
    """Mean, variance and ``Phi(z)`` of ``ReLU(N(mu, var))`` in float32, branch free, no
    autograd; also ``(z, phi(z), h(z), 1/s, Phi(-z))`` for the backward pass (``1/s = 0``
    at ``s = 0``; ``Phi(-z)`` accurate where it is small, unlike ``1 - Phi(z)``). ``var``
    broadcasts against ``mu``.

    With ``t = |z|``, ``P = Phi(-t)`` (``erfc``, relatively accurate in the tail),
    ``phi = phi(t)`` and ``q = h(-t) = phi - t P`` (the small side of the mean):
    ``T = ReLU(mu) + s q``, ``Phi(z) = P`` or ``1 - P``, ``Var = var (Phi(z) - q (q + t))``.
    For ``t > FAST_TAIL_SWITCH`` (blended over :data:`FAST_BLEND_WIDTH`) ``q = phi g`` and,
    for ``z < 0``, ``Var = var phi (w - phi g^2)``, with ``g``, ``w`` from
    :func:`fast_tail_fraction`: no cancellation there. Error bounds: ``momentkit.relu``
    (module docstring, "Float32 fast path"). ``s = 0`` gives ``z = +-Z_CLAMP`` (0 at
    ``mu = 0``), so the limits ``ReLU(mu)``, 0 and the step come out of the same
    formulas; NaN in either input gives a NaN mean.
    """
    var = var.clamp_min(0.0)
    s = torch.sqrt(var)
    z = torch.nan_to_num(mu / s, nan=0.0, posinf=Z_CLAMP, neginf=-Z_CLAMP).clamp_(-Z_CLAMP, Z_CLAMP)
    t = z.abs()
    phi = torch.square(t).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI)
    lower = torch.special.erfc(t * _INV_SQRT_2).mul_(0.5)  # Phi(-t)
    q = torch.addcmul(phi, t, lower, value=-1.0)  # h(-t), direct
    g_t, w_t = fast_tail_fraction(t.clamp_min(FAST_TAIL_SWITCH))
    sel = (t - FAST_TAIL_SWITCH).mul_(1.0 / FAST_BLEND_WIDTH).clamp_(0.0, 1.0)
    q.addcmul_(sel, torch.mul(phi, g_t).sub_(q))
    pos = torch.sign(z).clamp_(min=0.0)  # 1 where z > 0
    cdf = torch.addcmul(lower, pos, torch.mul(lower, -2.0).add_(1.0))
    v = torch.add(q, t).mul_(q).neg_().add_(cdf)  # Phi(z) - h(-z) h(z)
    v_tail = torch.mul(g_t, g_t).mul_(phi).neg_().add_(w_t).mul_(phi)
    not_pos = pos.neg_().add_(1.0)
    cdf_neg = torch.addcmul(lower, not_pos, torch.mul(lower, -2.0).add_(1.0))  # Phi(-z)
    v.addcmul_(sel.mul_(not_pos), v_tail.sub_(v))
    var_out = v.clamp_min_(0.0).mul_(var)
    mean = torch.relu(mu).addcmul_(s, q)
    h = torch.relu(z).add_(q)
    inv_s = torch.nan_to_num(s.reciprocal(), posinf=0.0)
    return mean, var_out, cdf, (z, phi, h, inv_s, cdf_neg)


class ReluMomentsFast(torch.autograd.Function):
    """Float32 fast path: ``(T, Var, Phi(z))`` of ``ReLU(N(mu, var))``
    (:func:`fast_moments`) with the analytic derivatives

    ``dT/dmu = Phi(z)``, ``dT/dvar = phi(z) / (2 s)``, ``dVar/dmu = 2 T Phi(-z)``,
    ``dVar/dvar = Phi(z) - h(z) phi(z)``, ``dPhi/dmu = phi(z) / s``,
    ``dPhi/dvar = -z phi(z) / (2 s^2)``;

    the terms in ``1/s`` are 0 at ``s = 0`` (their limits for ``mu != 0``; 0 is reported
    at ``mu = 0``, where they are unbounded, as :class:`SafeSqrt` does). Outputs whose
    gradient is not needed cost nothing in the backward pass. With ``create_graph`` the
    derivatives are recomputed from the inputs by differentiable operations
    (:class:`ReluMean` for ``h``), so second derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, mu, var):
        mean, var_out, cdf, (z, phi, h, inv_s, cdf_neg) = fast_moments(mu, var)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(mu, var, mean, cdf, z, phi, h, inv_s, cdf_neg)
        return mean, var_out, cdf

    @staticmethod
    def backward(ctx, g_mean, g_var, g_cdf):
        mu, var, mean, cdf, z, phi, h, inv_s, cdf_neg = ctx.saved_tensors
        if torch.is_grad_enabled():
            s = SafeSqrt.apply(var.clamp_min(0.0))
            z = standardize(mu, s)
            cdf, cdf_neg, phi = normal_cdf(z), normal_cdf(-z), normal_pdf(z)
            h = ReluMean.apply(z, torch.ones_like(z))
            pos = s > 0
            inv_s = torch.where(pos, 1.0 / torch.where(pos, s, torch.ones_like(s)), 0.0)
        g_mu = g_v = None
        if g_mean is not None:
            g_mu = g_mean * cdf
            g_v = g_mean * phi * (0.5 * inv_s)
        if g_var is not None:
            d_mu = mean * (2.0 * cdf_neg) * g_var  # 2 Phi(-z) <= 1 where T is large
            d_v = (cdf - h * phi) * g_var
            g_mu = d_mu if g_mu is None else g_mu + d_mu
            g_v = d_v if g_v is None else g_v + d_v
        if g_cdf is not None:
            base = g_cdf * phi * inv_s
            d_v = base * z * (-0.5 * inv_s)
            g_mu = base if g_mu is None else g_mu + base
            g_v = d_v if g_v is None else g_v + d_v
        if g_mu is not None:
            g_mu = g_mu.sum_to_size(mu.shape) if ctx.needs_input_grad[0] else None
        if g_v is not None:
            g_v = g_v.sum_to_size(var.shape) if ctx.needs_input_grad[1] else None
        return g_mu, g_v
