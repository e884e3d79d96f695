"""Max-pooling of Gaussian activations: chained Clark maxima over each window.

A ``k x k`` window is a maximum of up to ``k^2`` correlated Gaussian units. It is
computed as a chain of pairwise maxima (:func:`momentkit.network.gaussian_max.clark_max`), each
intermediate maximum moment-matched to a Gaussian (Clark 1961). The covariance of
the running maximum ``M`` with the next unit ``X_j`` comes from Stein's lemma:
``Cov(max(M, X), X_j) = Phi(a) Cov(M, X_j) + Phi(-a) Cov(X, X_j)``, so the chain only
needs the window's pairwise covariances, carried as weights over the window.

Order: units are merged in decreasing order of their means (per window), so that the
likely winners come first and units that are rarely the largest add only a small
correction at the end. The order matters little on the paper's LeNet (max-pool of
pre-activations, 3 MNIST images, against Monte Carlo): mean / median variance error
0.23% / 6.7% against 0.25% / 7.5% in raster order at ``sigma_x = 0.1`` and 0.74% / 14.4%
against 0.88% / 15.3% at 0.5 with random weights; equal variance errors (15.3%, 38.4%)
with trained weights. Padding positions (``-inf`` in PyTorch) never win
and are skipped.

ReLU after the pool (``network_moments`` takes the maximum of the pre-activations, since
``max_i ReLU(X_i) = ReLU(max_i X_i)``): ``ReLU(max_j X_j) = max(0, X_1, ..., X_k)``
with the constant 0 as one more element of the window (:func:`_relu_of_max`). ReLU of
the chain's Gaussian (0 merged last) misses the maximum's upper tail where the maximum
is mostly negative (the variance 12% to 98% too small when ``P(max > 0) < 0.5``); 0
merged first (ReLU of the likeliest winner, then the others) is within 4% where
``P(max > 0) < 0.25``, and worse where the maximum is mostly positive; the two are
blended by the chain's ``P(max > 0)``. On the trained LeNet (2 images, ``sigma_x =
0.5``) this took the median variance error after the second pool from 41% and 49% to
20% and 22%.

Per representation: ``"diagonal"`` takes the window's units as independent
(correlation 0); ``"factor"`` takes their covariances from the factor
(``C_i . C_j``) plus a model of the remainders' covariance inside the window
(:data:`remainder_model`: ``"independent"``, the default, or
``"factor_correlation"``, the remainders correlated as the factor parts; no measurable
difference on the trained LeNet) and gives the output factor ``sum_j w_j C_j``;
``"full"`` uses the carried covariance, and the covariance of two outputs is ``W Sigma
W^T`` (Stein's lemma once per output) with Clark's variances on the diagonal (a ReLU
after the pool is then applied to the pooled Gaussian, with its exact covariance).
Below float64, the ``"diagonal"`` chains are differentiated in closed form
(:mod:`momentkit.network._chain`: the same values, a cheaper backward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from momentkit.network._chain import diagonal_chain, merge_values
from momentkit.network.gaussian_max import clark_max
from momentkit.network.layers import State, leaky_relu, relu_stats

__all__ = ["CHAIN_ORDERS", "max_pool2d", "window_indices"]

#: Orders of the chain: ``"mean"`` (decreasing mean, the default) or ``"raster"``
#: (window order, row by row); :data:`chain_order` holds the one in use.
CHAIN_ORDERS = ("mean", "raster")
chain_order = "mean"

#: The remainders' covariance inside a window in ``"factor"`` mode: ``"independent"``
#: (the default) or ``"factor_correlation"`` (correlation ``C_i . C_j / |C_i| |C_j|``);
#: :data:`remainder_model` holds the one in use.
REMAINDER_MODELS = ("independent", "factor_correlation")
remainder_model = "independent"


def _geometry(layer: nn.MaxPool2d, h: int, w: int):
    k, s, p, d = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    out = F.max_pool2d(torch.zeros(1, 1, h, w), k, s, p, d, layer.ceil_mode).shape[-2:]
    k, s, p, d = (torch.nn.modules.utils._pair(v) for v in (k, s, p, d))
    extra = [
        max(0, (out[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 - ((h, w)[i] + 2 * p[i]))
        for i in range(2)
    ]
    return k, s, p, d, extra, tuple(out)


def _gather(t: torch.Tensor, geom) -> torch.Tensor:
    """``t`` ``(..., H, W)`` -> windows ``(..., L, kk)`` in raster order (padding: 0),
    through strided views (one copy)."""
    k, s, p, d, extra, out = geom
    t = F.pad(t, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
    span = [d[i] * (k[i] - 1) + 1 for i in range(2)]
    win = t.unfold(-2, span[0], s[0]).unfold(-2, span[1], s[1])[..., :: d[0], :: d[1]]
    win = win[..., : out[0], : out[1], :, :]
    return win.reshape(*win.shape[:-4], out[0] * out[1], k[0] * k[1])


def window_indices(layer: nn.MaxPool2d, h: int, w: int, device) -> tuple[torch.Tensor, ...]:
    """For each output position ``(L,)`` the flat input positions of its window
    ``(L, k*k)`` in raster order (``-1`` for padding), the mask of valid ones, and the
    output size."""
    geom = _geometry(layer, h, w)
    pos = torch.arange(1, h * w + 1, dtype=torch.float64).view(h, w)
    idx = _gather(pos, geom).round().long() - 1
    return idx.to(device), (idx >= 0).to(device), geom[-1]


def _ok(ok_w: torch.Tensor, j: int, pad: bool) -> torch.Tensor | None:
    """The validity of window element ``j``, or None when no window has padding."""
    return ok_w[..., j] if pad else None


def _merge(has, ok, m, v, mj, vj, cross):
    """One link of the chain: ``max(M, X_j)``; where ``X_j`` is padding ``M`` stays, and
    where ``M`` holds no unit yet (padding so far) ``X_j`` is taken. Returns the new
    ``(has, m, v, w1, w2)`` with the Stein weights (0/1 in those two cases)."""
    mc, vc, w1, w2 = clark_max(m, v, mj, vj, cross)
    has, m, v, use, take = merge_values(has, ok, m, v, mj, vj, mc, vc)
    if ok is None:  # no padding in any window: every link is a plain maximum
        return has, m, v, w1, w2
    one, zero = torch.ones_like(w1), torch.zeros_like(w1)
    w1 = torch.where(use, w1, torch.where(take, zero, one))
    w2 = torch.where(use, w2, torch.where(take, one, zero))
    return has, m, v, w1, w2


def _sort_by_mean(mean, valid, *others):
    """Reorder each window by decreasing mean (padding last); unchanged in raster order."""
    if chain_order == "raster":
        return [mean, valid.expand_as(mean), *(t for t, _ in others)]
    key = torch.where(valid, mean, torch.full_like(mean, -torch.inf))
    order = torch.argsort(key.detach(), dim=-1, descending=True)
    out = [mean.gather(-1, order), valid.expand_as(mean).gather(-1, order)]
    for t, lead in others:
        o = order.unsqueeze(lead) if lead is not None else order
        out.append(t.gather(-1, o.expand(*t.shape[:-1], o.shape[-1])))
    return out


def max_pool2d(layer: nn.MaxPool2d, state: State, relu: bool = False) -> State:
    """Moments after ``layer`` (any kernel, stride, padding, dilation, ceil mode); with
    ``relu``, of ``ReLU`` of its output (:func:`_relu_of_max`)."""
    n, c, h, w = state.mean.shape
    idx, valid, out = window_indices(layer, h, w, state.mean.device)
    pad = not bool(valid.all())
    if state.cov is not None:
        pooled = _max_pool_full(state, idx, valid, out)
        return leaky_relu(pooled, 0.0) if relu else pooled
    geom = _geometry(layer, h, w)
    mean_w = _gather(state.mean, geom)  # (N, C, L, kk)
    if state.factor is None:
        var_w = _gather(state.var, geom)
        mean_w, ok_w, var_w = _sort_by_mean(mean_w, valid, (var_w, None))
        oks = ok_w if pad else None
        m, v = diagonal_chain(mean_w, var_w, oks)
        if relu:
            # _relu_of_max for a diagonal covariance, elementwise: the cross-covariances
            # of the chain are all 0.
            r_mean, r_var, g = relu_stats(m, v)
            lam = ((0.75 - g) / 0.5).clamp(0.0, 1.0)
            fm, fv = diagonal_chain(mean_w, var_w, oks, zero_first=True)
            m = lam * fm + (1.0 - lam) * r_mean
            v = lam * fv + (1.0 - lam) * r_var
        return State(m.reshape(n, c, *out), v.reshape(n, c, *out))
    fac_w = _gather(state.factor, geom)  # (B, K, C, L, kk)
    rem_w = _gather(state.var, geom)  # (N, C, L, kk)
    gram = torch.einsum("bkcli,bkclj->bclij", fac_w, fac_w)  # (B, C, L, kk, kk)
    gram = gram.expand(n, *gram.shape[1:])
    cov_w = gram + _remainder_cov(gram, rem_w)
    m, v, wts = (_relu_of_max if relu else _window_chain)(mean_w, valid, cov_w)
    f = (fac_w * wts.unsqueeze(1)).sum(-1)  # (N, K, C, L)
    fsq = torch.einsum("ncli,nclij,nclj->ncl", wts, gram, wts)
    rem = (v - fsq).clamp_min(0.0)
    return State(m.reshape(n, c, *out), rem.reshape(n, c, *out), f.reshape(n, -1, c, *out))


def _relu_of_max(mean_w, valid, cov_w):
    """``ReLU(max_j X_j) = max(0, X_1, ..., X_k)`` per window: mean, variance, Stein
    weights ``(..., kk)``.

    Two chains: ``"last"``, the chain of the ``X_j`` then ReLU of its Gaussian (the
    constant 0 merged last), and ``"first"``, ``ReLU`` of the likeliest winner merged
    with the others (0 merged first). Where the maximum is mostly negative, ReLU of
    the Gaussian misses the maximum's heavier upper tail (variance 12% to 98% too
    small when ``P(max > 0) < 0.5``), ``"first"`` within 4% below 0.25; where it
    is mostly positive, ``"last"`` is the better one. They are blended with weight
    ``lam = clamp((0.75 - p) / 0.5, 0, 1)`` on ``"first"``, ``p = Phi(m / s)`` of the
    chain's Gaussian.
    """
    m, v, wts = _window_chain(mean_w, valid, cov_w)
    r_mean, r_var, g = relu_stats(m, v)
    lam = ((0.75 - g) / 0.5).clamp(0.0, 1.0)
    z_mean = _with_zero(mean_w)
    ok = valid.expand_as(mean_w)
    z_valid = torch.cat([ok, torch.ones_like(ok[..., :1])], -1)
    z_cov = _with_zero(_with_zero(cov_w).transpose(-1, -2))
    fm, fv, fw = _window_chain(z_mean, z_valid, z_cov, zero_first=True)
    mean = lam * fm + (1.0 - lam) * r_mean
    var = lam * fv + (1.0 - lam) * r_var
    w = lam.unsqueeze(-1) * fw[..., :-1] + (1.0 - lam).unsqueeze(-1) * g.unsqueeze(-1) * wts
    return mean, var, w


def _with_zero(t: torch.Tensor) -> torch.Tensor:
    """Append the constant 0 as one more window element (last dimension)."""
    return torch.cat([t, torch.zeros_like(t[..., :1])], -1)


def _remainder_cov(gram: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """The covariance of the remainders within each window ``(..., kk, kk)``."""
    if remainder_model == "independent":
        return torch.diag_embed(rem)
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    tiny = torch.finfo(gram.dtype).tiny
    inv = torch.where(d > tiny, d, torch.ones_like(d)).rsqrt() * (d > tiny)
    corr = gram * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(corr.shape[-1], dtype=torch.bool, device=corr.device)
    corr = torch.where(eye, torch.ones_like(corr), corr.clamp(-1.0, 1.0))
    pos = rem > tiny
    sr = torch.where(pos, rem, torch.ones_like(rem)).sqrt() * pos  # finite gradient at 0
    return corr * sr.unsqueeze(-1) * sr.unsqueeze(-2)


def _window_chain(mean_w, valid, cov_w, zero_first: bool = False):
    """Chained Clark maxima over each window from its covariance matrix ``(..., kk, kk)``.

    Returns the mean, the variance and the Stein weights ``(..., kk)`` of the window's
    elements (raster order) in the maximum's covariance with any jointly Gaussian unit.
    With ``zero_first`` the last element (the constant 0) is merged first.
    """
    kk = mean_w.shape[-1]
    ok = valid.expand_as(mean_w)
    pad = not bool(valid.all())
    lead = 1 if zero_first else 0  # the elements sorted: all, or all but the last
    body_mean, body_ok = mean_w[..., : kk - lead], ok[..., : kk - lead]
    if chain_order == "raster":
        order = torch.arange(kk - lead, device=mean_w.device).expand_as(body_mean)
    else:
        key = torch.where(body_ok, body_mean, torch.full_like(body_mean, -torch.inf))
        order = torch.argsort(key.detach(), dim=-1, descending=True)
    if zero_first:
        order = torch.cat([torch.full_like(order[..., :1], kk - 1), order], -1)
    ms = mean_w.gather(-1, order)
    oks = ok.gather(-1, order)
    rows = cov_w.gather(-2, order.unsqueeze(-1).expand_as(cov_w))
    cs = rows.gather(-1, order.unsqueeze(-2).expand_as(cov_w))  # sorted rows and columns
    vs = torch.diagonal(cs, dim1=-2, dim2=-1)
    has, m, v = oks[..., 0], ms[..., 0], vs[..., 0]
    cov_m = cs[..., 0, :]
    weights = [has.to(m.dtype)]
    for j in range(1, kk):
        has, m, v, w1, w2 = _merge(
            has, _ok(oks, j, pad), m, v, ms[..., j], vs[..., j], cov_m[..., j]
        )
        cov_m = w1.unsqueeze(-1) * cov_m + w2.unsqueeze(-1) * cs[..., j, :]
        weights = [wt * w1 for wt in weights] + [w2]
    wts = torch.zeros_like(mean_w).scatter(-1, order, torch.stack(weights, -1))
    return m, v, wts


def _max_pool_full(state: State, idx, valid, out) -> State:
    n, c, h, w = state.mean.shape
    hw = h * w
    units = (torch.arange(c, device=idx.device).view(c, 1, 1) * hw + idx.clamp_min(0)).reshape(
        c * idx.shape[0], -1
    )  # (Dout, kk) flat unit index of each window element
    ok_all = valid.repeat(c, 1)  # (Dout, kk)
    pad = not bool(valid.all())
    cov = state.cov
    mean_w = state.mean.reshape(n, -1)[:, units]  # (N, Dout, kk)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    var_w = diag[:, units]
    mean_w, ok_w, var_w, units_w = _sort_by_mean(
        mean_w, ok_all, (var_w, None), (units.expand(n, *units.shape), None)
    )
    first = units_w[..., 0]
    cov_m = cov.gather(1, first.unsqueeze(-1).expand(-1, -1, cov.shape[-1]))  # (N, Dout, D)
    has, m, v = ok_w[..., 0], mean_w[..., 0], var_w[..., 0]
    weights = [has.to(m.dtype)]
    for j in range(1, units.shape[1]):
        uj = units_w[..., j]
        cov_j = cov.gather(1, uj.unsqueeze(-1).expand(-1, -1, cov.shape[-1]))
        cross = cov_m.gather(2, uj.unsqueeze(-1)).squeeze(-1)
        has, m, v, w1, w2 = _merge(
            has, _ok(ok_w, j, pad), m, v, mean_w[..., j], var_w[..., j], cross
        )
        cov_m = w1.unsqueeze(-1) * cov_m + w2.unsqueeze(-1) * cov_j
        weights = [wt * w1 for wt in weights] + [w2]
    wts = torch.stack(weights, -1)  # (N, Dout, kk) weights of the sorted elements
    # Cov(M_o, M_p) = sum_j w_pj Cov(M_o, X_{u_pj}).
    picked = cov_m.gather(
        2, units_w.reshape(n, 1, -1).expand(-1, cov_m.shape[1], -1)
    ).reshape(n, cov_m.shape[1], *units_w.shape[1:])
    out_cov = (picked * wts.unsqueeze(1)).sum(-1)
    out_cov = 0.5 * (out_cov + out_cov.transpose(1, 2))
    eye = torch.eye(out_cov.shape[-1], dtype=torch.bool, device=out_cov.device)
    out_cov = torch.where(eye, torch.diag_embed(v), out_cov)
    factor = None
    if state.factor is not None:
        f = state.factor.flatten(2).expand(n, -1, -1)  # (N, K, D)
        fw = f.gather(2, units_w.reshape(n, 1, -1).expand(-1, f.shape[1], -1))
        fw = fw.reshape(n, f.shape[1], *units_w.shape[1:])
        factor = (fw * wts.unsqueeze(1)).sum(-1).reshape(n, -1, c, *out)
    return State(m.reshape(n, c, *out), None, factor, out_cov)
