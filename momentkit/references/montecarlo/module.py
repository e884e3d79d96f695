"""The Monte Carlo reference for any torch module: chunked sampling on its device.

One stream, a ``torch.Generator`` seeded with ``seed`` on the device of ``mean``; its
chunk sums play the role of the block sums (:mod:`~momentkit.references.montecarlo.stats`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from momentkit._validate import as_float_tensor, as_spread, check_count, check_seed
from momentkit.errors import MomentInputError
from momentkit.references.montecarlo.stats import MonteCarloResult, finalize


def monte_carlo_moments(
    fn: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor | float,
    n_samples: int,
    seed: int = 0,
    batch_size: int = 4096,
    *,
    compute_cov: bool = False,
    antithetic: bool = False,
) -> MonteCarloResult:
    """Monte Carlo mean (and covariance) of ``fn(x)`` for ``x ~ N(mean, Diag(var))``.

    For any callable torch module: the reference for the surrogate ``Omega(mu3)`` and
    the two-stage linearization on deep networks. ``fn`` is evaluated under
    ``torch.no_grad()`` on chunks of at most ``batch_size`` rows (``batch_size // P``
    samples of each of the ``P`` points per chunk, at least one), so memory depends
    on ``batch_size``, never on ``n_samples``. Sums are accumulated in ``float64``
    on the device of ``mean``.

    Args:
        fn: maps a batch ``(m, *in_shape)`` to ``(m, *out_shape)``.
        mean: ``(P, *in_shape)``: a batch of ``P`` input points (in the units ``fn``
            takes, e.g. pixel space for a model that starts with ``Normalize``).
        var: input variances, a scalar or a tensor broadcastable to ``mean``
            (per channel: shape ``(C, 1, 1)``); non-negative.
        n_samples: samples per point (``>= 2``).
        seed: seeds a ``torch.Generator`` on ``mean.device``; results are
            reproducible for a given seed, ``batch_size``, device and ``P``.
        batch_size: rows per forward pass.
        compute_cov: also estimate the full covariance of the flattened output.
        antithetic: draw noise in pairs ``(eps, -eps)`` and average each pair
            (``n_samples`` must be even; ``n_samples / 2`` pair averages are the
            i.i.d. samples behind ``stderr``). The mean stays unbiased, and for small
            noise the linear term cancels in every pair, so the variance falls from
            ``O(var)`` to ``O(var^2)``. Caveat: for ReLU networks the pair average
            is exactly ``fn(mean)`` until a sample crosses a kink, so the standard
            error cannot account for kinks that no sample reached; treat it as a
            lower bound at small noise. Not with ``compute_cov``.

    Returns:
        :class:`MonteCarloResult`: ``mean``/``stderr`` ``(P, *out_shape)``,
        ``cov``/``cov_stderr`` ``(P, D, D)`` with ``D = prod(out_shape)`` or ``None``.

    Raises:
        MomentInputError: ``mean`` not a floating tensor with a batch dimension or
            holding NaN or infinity, ``var`` negative, not finite or not broadcastable,
            bad counts. Messages start with the function's name.
    """
    name = "monte_carlo_moments"
    if not isinstance(mean, torch.Tensor) or mean.dim() < 1:
        raise MomentInputError(f"{name}: mean must be a floating tensor of shape (P, *in_shape)")
    as_float_tensor(mean, "mean", name, finite=True)
    n_samples = check_count(n_samples, "n_samples", name, 2)
    batch_size = check_count(batch_size, "batch_size", name)
    seed = check_seed(seed, name)
    var_t = as_spread(var, "var", name, like=mean)
    if antithetic and (compute_cov or n_samples % 2 or n_samples < 4):
        raise MomentInputError(
            f"{name}: antithetic needs an even n_samples >= 4 and compute_cov=False (pair "
            "averages have the mean of fn(x) but not its covariance)"
        )
    try:
        std = torch.broadcast_to(var_t.to(mean.dtype).sqrt(), mean.shape)
    except RuntimeError as exc:
        raise MomentInputError(
            f"{name}: var of shape {tuple(var_t.shape)} does not broadcast to mean "
            f"{tuple(mean.shape)}"
        ) from exc
    P = mean.shape[0]
    copies = 2 if antithetic else 1
    n_draws = n_samples // copies
    per_chunk = max(1, batch_size // (P * copies))
    gen = torch.Generator(device=mean.device)
    gen.manual_seed(int(seed))
    acc = torch.float64
    with torch.no_grad():
        out0 = fn(mean)
        out_shape = tuple(out0.shape[1:])
        shift = out0.reshape(P, -1).to(acc)
        D = shift.shape[1]
        s1 = torch.zeros(P, D, dtype=acc, device=mean.device)
        s2 = torch.zeros((P, D, D) if compute_cov else (P, D), dtype=acc, device=mean.device)
        s21 = torch.zeros(P, D, D, dtype=acc, device=mean.device) if compute_cov else None
        s22 = torch.zeros(P, D, D, dtype=acc, device=mean.device) if compute_cov else None
        done = 0
        while done < n_draws:
            m = min(per_chunk, n_draws - done)
            eps = torch.randn((m, *mean.shape), generator=gen, dtype=mean.dtype, device=mean.device)
            if antithetic:
                eps = torch.cat([eps, -eps])
            x = (mean + std * eps).reshape(copies * m * P, *mean.shape[1:])
            z = fn(x).reshape(copies, m, P, D).to(acc).mean(0) - shift  # (m, P, D)
            s1 += z.sum(0)
            if compute_cov:
                zt = z.transpose(0, 1)  # (P, m, D)
                s2 += zt.transpose(1, 2) @ zt
                z2 = zt * zt
                s21 += z2.transpose(1, 2) @ zt
                s22 += z2.transpose(1, 2) @ z2
            else:
                s2 += (z * z).sum(0)
            done += m
    res = finalize(shift, s1, s2, n_draws, s21, s22)
    return MonteCarloResult(
        res.mean.reshape(P, *out_shape),
        res.stderr.reshape(P, *out_shape),
        res.cov,
        res.cov_stderr,
        n_samples,
    )
