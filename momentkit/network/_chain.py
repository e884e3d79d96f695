"""The diagonal max-pooling chain below float64 with an analytic backward pass.

In ``"diagonal"`` mode the units of a pooling window are independent, and the chain of
Clark maxima (:mod:`momentkit.network.pooling`) is elementwise over windows. Left to
autograd, its backward pass replays every one of the thirty-odd elementwise operations
of each merge (:func:`momentkit.network.gaussian_max.clark_max_fast_parts`) and the
masks between them; :class:`DiagonalChain` computes the same forward values (the same
operations, bit for bit) and differentiates each merge in closed form instead. With
``D = X1 - X2``, ``mu = m1 - m2``, ``theta^2 = v1 + v2``, ``s = sign(mu)``, ``T =
T(-|mu|, theta)``, ``w1 = Phi(mu / theta)``, ``w2 = 1 - w1``, ``phi = phi(mu / theta)``
and ``Phi(-t) = min(w1, w2)``:

* mean ``M = max(m1, m2) + T``: ``dM/dm1 = w1``, ``dM/dm2 = w2``,
  ``dM/dv1 = dM/dv2 = phi / (2 theta)`` (``dT/dtheta = phi``,
  ``dT/d|mu| = -Phi(-t)``);
* variance ``V = v1 w1 + v2 w2 - T (|mu| + T)``:
  ``dV/dm1 = -dV/dm2 = (v1 - v2) phi / theta + s (Phi(-t) (|mu| + 2 T) - T)`` and
  ``dV/dv_i = w_i - phi ((v1 - v2) mu / theta^2 + |mu| + 2 T) / (2 theta)``.

Where ``theta^2`` is at or below the floor the merge is a selection (``T = 0``): the mean
follows the larger input, the variance the weights, as autograd through the forward
operations has it; where ``V`` was clamped at 0 its gradient is 0. Second derivatives
(a backward pass that builds a graph) are taken by autograd through the forward
operations instead, so they are those of the operations themselves.
"""

from __future__ import annotations

import torch

from momentkit.network.gaussian_max import clark_max, clark_max_fast_parts

__all__ = ["DiagonalChain", "diagonal_chain", "diagonal_chain_reference", "merge_values"]


def merge_values(has, ok, m, v, mj, vj, mc, vc):
    """The chain's state after element ``j`` from the merged ``(mc, vc)``: merged where
    both hold a unit, ``X_j`` taken where the state holds none yet (padding so far), kept
    where ``X_j`` is padding; with ``ok`` None (no padding) the merge everywhere. Returns
    ``(has, m, v, use, take)``, the masks None without padding."""
    if ok is None:
        return has, mc, vc, None, None
    use = ok & has
    take = ok & ~has
    m = torch.where(use, mc, torch.where(take, mj, m))
    v = torch.where(use, vc, torch.where(take, vj, v))
    return has | ok, m, v, use, take


def _start(ms, vs, oks, zero_first):
    if zero_first:
        shape = ms.shape[:-1]
        has = torch.ones(shape, dtype=torch.bool, device=ms.device)
        return has, ms.new_zeros(shape), vs.new_zeros(shape), 0
    has = oks[..., 0] if oks is not None else None
    return has, ms[..., 0], vs[..., 0], 1


def diagonal_chain_reference(ms, vs, oks, zero_first: bool):
    """The chain through :func:`~momentkit.network.gaussian_max.clark_max` with autograd
    (the operations that :class:`DiagonalChain` reproduces; any dtype)."""
    has, m, v, start = _start(ms, vs, oks, zero_first)
    for j in range(start, ms.shape[-1]):
        ok = oks[..., j] if oks is not None else None
        mc, vc, _, _ = clark_max(m, v, ms[..., j], vs[..., j], 0.0)
        has, m, v, _, _ = merge_values(has, ok, m, v, ms[..., j], vs[..., j], mc, vc)
    return m, v


class DiagonalChain(torch.autograd.Function):
    """``(m, v) = chain(ms, vs)`` over the last dimension (windows sorted as they are to
    be merged), below float64; ``oks`` marks the valid elements (``None``: all valid);
    ``zero_first`` starts the chain from the constant 0 instead of the first element."""

    @staticmethod
    def forward(ctx, ms, vs, oks, zero_first):
        has, m, v, start = _start(ms, vs, oks, zero_first)
        steps = []
        for j in range(start, ms.shape[-1]):
            mj, vj = ms[..., j], vs[..., j]
            ok = oks[..., j] if oks is not None else None
            theta2 = (v + vj).clamp_min(0.0)  # clark_max's v1 + v2 - 2 c12 at c12 = 0
            mu = m - mj
            first = mu >= 0
            mc, vc, _, _, parts = clark_max_fast_parts(m, v, mj, vj, mu, theta2, first)
            m_prev, v_prev = m, v
            has, m, v, use, take = merge_values(has, ok, m, v, mj, vj, mc, vc)
            steps.append((j, m_prev, v_prev, first, parts, vc > 0, use, take))
        ctx.steps = steps
        ctx.start = start
        ctx.zero_first = zero_first
        ctx.oks = oks
        ctx.save_for_backward(ms, vs)
        return m, v

    @staticmethod
    def backward(ctx, g_m, g_v):
        ms, vs = ctx.saved_tensors  # g_m and g_v are tensors: autograd materializes them
        if torch.is_grad_enabled():  # a graph of the backward pass is wanted
            return _backward_by_autograd(ms, vs, ctx.oks, ctx.zero_first, g_m, g_v)
        kk = ms.shape[-1]
        gm_el: list[torch.Tensor | None] = [None] * kk
        gv_el: list[torch.Tensor | None] = [None] * kk
        for j, m1, v1, first, parts, var_pos, use, take in reversed(ctx.steps):
            gm_el[j], gv_el[j], g_m, g_v = _merge_backward(
                m1, v1, ms[..., j], vs[..., j], first, parts, var_pos, use, take, g_m, g_v
            )
        if ctx.start == 1:
            gm_el[0], gv_el[0] = g_m, g_v
        zero = torch.zeros_like(g_m)
        g_ms = torch.stack([zero if g is None else g for g in gm_el], -1)
        g_vs = torch.stack([zero if g is None else g for g in gv_el], -1)
        return g_ms.to(ms.dtype), g_vs.to(vs.dtype), None, None


def _merge_backward(m1, v1, m2, v2, first, parts, var_pos, use, take, g_m, g_v):
    """Gradients of one link for the element merged (``m2``, ``v2``) and for the state
    before it (``m1``, ``v1``), from those of the state after it; ``var_pos``: where the
    link's variance was not clamped at 0."""
    pos, theta, phi, tail, small = parts
    work = theta.dtype
    m1, v1, m2, v2 = (t.to(work) for t in (m1, v1, m2, v2))
    tail, small, g_m, g_v = (t.to(work) for t in (tail, small, g_m, g_v))
    if use is not None:
        keep = ~(use | take)
        g_m_link = torch.where(use, g_m, 0.0)
        g_v_link = torch.where(use, g_v, 0.0)
        gm2_take = torch.where(take, g_m, 0.0)
        gv2_take = torch.where(take, g_v, 0.0)
        g_m_keep = torch.where(keep, g_m, 0.0)
        g_v_keep = torch.where(keep, g_v, 0.0)
    else:
        g_m_link, g_v_link = g_m, g_v
    g_v_link = torch.where(var_pos, g_v_link, 0.0)
    big = 1.0 - small
    w1 = torch.where(first, big, small)
    w2 = torch.where(first, small, big)
    mu = m1 - m2
    amu = torch.where(first, mu, -mu)
    sign = torch.where(first, 1.0, -1.0).to(work)
    phi_pos = torch.where(pos, phi, 0.0)
    r = phi_pos / theta  # phi / theta, 0 where the merge is a selection
    dv = v1 - v2
    # Mean: w1 and w2 where theta > 0; the selection's 1 and 0 (ties: 1 for X1) below.
    dm1 = torch.where(pos, w1, first.to(work))
    dmv = 0.5 * r
    dvm = dv * r + sign * (small * (amu + 2.0 * tail) - tail)
    dvv = -0.5 * (r * dv * mu / theta + phi_pos * (amu + 2.0 * tail)) / theta
    g_m1 = g_m_link * dm1 + g_v_link * dvm
    g_m2 = g_m_link * (1.0 - dm1) - g_v_link * dvm
    g_common = g_m_link * dmv + g_v_link * dvv
    g_v1 = g_common + g_v_link * w1
    g_v2 = g_common + g_v_link * w2
    if use is not None:
        g_m2, g_v2 = g_m2 + gm2_take, g_v2 + gv2_take
        g_m1, g_v1 = g_m1 + g_m_keep, g_v1 + g_v_keep
    return g_m2, g_v2, g_m1, g_v1


def _backward_by_autograd(ms, vs, oks, zero_first, g_m, g_v):
    inputs = [t for t in (ms, vs) if t.requires_grad]
    with torch.enable_grad():
        m, v = diagonal_chain_reference(ms, vs, oks, zero_first)
        grads = torch.autograd.grad(
            (m, v), inputs, (g_m, g_v), create_graph=True, allow_unused=True
        )
    it = iter(grads)
    out = [next(it) if t.requires_grad else None for t in (ms, vs)]
    out = [torch.zeros_like(t) if g is None else g for g, t in zip(out, (ms, vs), strict=True)]
    return out[0], out[1], None, None


def diagonal_chain(ms, vs, oks, zero_first: bool = False):
    """Mean and variance of the chained maximum of independent Gaussians ``(..., kk)``:
    :class:`DiagonalChain` below float64, the accurate operations in float64."""
    if torch.promote_types(ms.dtype, vs.dtype) == torch.float64:
        return diagonal_chain_reference(ms, vs, oks, zero_first)
    return DiagonalChain.apply(ms, vs, oks, zero_first)
