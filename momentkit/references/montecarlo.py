"""Streaming Monte Carlo estimates of output moments under Gaussian input.

Two estimators of ``E[f(x)]`` and ``Cov[f(x)]`` for ``x ~ N(mean, cov)``, both with
standard errors, both for a batch of input points, both with memory that does not
grow with the number of samples:

- :func:`monte_carlo_affine_relu_affine`: Numba kernels for the explicit network
  ``g(x) = B ReLU(A x + c1) + c2`` (the network of Theorem 1), diagonal or full
  input covariance, ``float64`` throughout.
- :func:`monte_carlo_moments`: any callable torch module (CPU or CUDA), diagonal
  input variance, sampled in chunks of ``batch_size`` forward rows.

Accumulation (both estimators). Samples are drawn in blocks; each block is reduced
at once to shifted power sums ``sum z``, ``sum z z^T`` (and, for the standard error
of the covariance, ``sum z_i^2 z_j`` and ``sum z_i^2 z_j^2``) with
``z = f(x) - f(mean)``. Block sums are added into per-stream accumulators and the
streams are added in a fixed order, so the sums form a short tree (pairwise-like:
the rounding error grows with the number of blocks, not samples). The shift
``K = f(mean)`` is within a few output standard deviations of ``E[f(x)]`` for
the networks considered here, so forming central moments from shifted sums loses
no significant digits. Then, with ``a = (sum z) / N``::

    mean      = K + a
    cov       = (sum z z^T - N a a^T) / (N - 1)
    stderr    = sqrt(diag(cov) / N)                      (standard error of mean)
    cov_stderr_ij = sqrt((mu22_ij - cov_ij^2) / N)       (delta method)

where ``mu22_ij = E[(z_i - a_i)^2 (z_j - a_j)^2]`` is expanded in the accumulated
sums. ``cov_stderr`` is first-order accurate (it is itself an estimate) and is
meant for tolerances of the form ``k * stderr``.

Random streams (Numba). Sample block ``s`` ("stream") of input point ``p`` is drawn
from a SplitMix64 sequence (Steele, Lea and Flood 2014) whose start is a hash of
``(seed, p, s)``; normals come from the Box-Muller transform. The work is split
into a fixed number of streams (``n_streams``) regardless of the thread count, so
estimates are bit-for-bit reproducible for a given seed and ``n_streams`` on every
thread count (and therefore for a given seed and thread count); a stream's
normals do not depend on the block size either. Work proceeds in rounds: a Numba
parallel kernel draws the next block of every stream, BLAS computes the two GEMMs
for the whole round, and a second parallel kernel adds each stream's block sums into
that stream's accumulators. BLAS is never called inside a Numba parallel region, so
the two thread pools do not nest.

The torch estimator has one stream, a ``torch.Generator`` seeded with ``seed`` on
the device of ``mean``; its chunk sums play the role of the block sums.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

from momentkit.errors import MomentInputError

__all__ = [
    "DEFAULT_THREADS",
    "MonteCarloResult",
    "monte_carlo_affine_relu_affine",
    "monte_carlo_moments",
]

#: Numba threads used when ``n_threads`` is not given: modest, so that a reference
#: computation does not take over a shared machine.
DEFAULT_THREADS: int = max(1, min(4, numba.config.NUMBA_NUM_THREADS))


def _prefer_workqueue_layer() -> None:
    """Use Numba's own ``workqueue`` thread pool unless the user chose a layer.

    The default ``omp`` layer shares libgomp with torch's OpenMP pool: threads of
    either spin-wait after a parallel region, so alternating torch and Numba work (as
    every suite does) makes each Numba launch wait for cores; on a busy 2-core
    machine that cost 24 ms per launch, six times the work. ``workqueue`` has no
    spinning. It is chosen once per process, before the first parallel launch, and
    only when ``NUMBA_THREADING_LAYER`` is unset and no layer is active yet. Its one
    limit: kernels must not be launched from several Python threads at once.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", True):
        numba.config.THREADING_LAYER = "workqueue"


@dataclass(frozen=True)
class MonteCarloResult:
    """Monte Carlo moments of a network output.

    Attributes:
        mean: ``(..., d)`` estimate of ``E[f(x)]`` (for :func:`monte_carlo_moments`
            the output's own shape ``(..., *out_shape)``).
        stderr: standard error of ``mean``, same shape.
        cov: ``(..., d, d)`` unbiased covariance estimate (``d`` = number of output
            values), or ``None`` when it was not asked for.
        cov_stderr: standard error of each entry of ``cov`` (delta method), or
            ``None``.
        n_samples: number of samples per input point.
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    cov: torch.Tensor | None
    cov_stderr: torch.Tensor | None
    n_samples: int


# ----------------------------------------------------------------------------------
# Counter-based random numbers (SplitMix64) and Box-Muller normals, in Numba.
# Every constant is a uint64 so that no operation is promoted to float.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SH30 = np.uint64(30)
_SH27 = np.uint64(27)
_SH31 = np.uint64(31)
_SH11 = np.uint64(11)
_TWO_M53 = 2.0**-53
_TWO_PI = 2.0 * math.pi


@njit(cache=True, inline="always")
def _mix64(z: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    z = (z ^ (z >> _SH30)) * _MIX1
    z = (z ^ (z >> _SH27)) * _MIX2
    return z ^ (z >> _SH31)


@njit(cache=True)
def _stream_state(seed: np.uint64, point: int, stream: int) -> np.uint64:  # pragma: no cover
    z = _mix64(seed + _GOLDEN)
    z = _mix64(z ^ (np.uint64(point) * _MIX1 + _GOLDEN))
    return _mix64(z ^ (np.uint64(stream) * _MIX2 + _GOLDEN))


@njit(cache=True)
def _normal(states: np.ndarray, spare: np.ndarray, s: int) -> float:  # pragma: no cover
    """Next standard normal of stream ``s`` (Box-Muller; the sine half is kept in
    ``spare`` so that a stream's sequence does not depend on how it is blocked)."""
    if not math.isnan(spare[s]):
        v = spare[s]
        spare[s] = math.nan
        return v
    state = states[s] + _GOLDEN
    r1 = _mix64(state)
    state += _GOLDEN
    r2 = _mix64(state)
    states[s] = state
    u1 = (float(r1 >> _SH11) + 1.0) * _TWO_M53  # (0, 1]: log(u1) is finite
    u2 = float(r2 >> _SH11) * _TWO_M53
    rad = math.sqrt(-2.0 * math.log(u1))
    ang = _TWO_PI * u2
    spare[s] = rad * math.sin(ang)
    return rad * math.cos(ang)


@njit(cache=True)
def _init_streams(seed: np.uint64, point: int, n_streams: int):  # pragma: no cover
    states = np.empty(n_streams, dtype=np.uint64)
    for s in range(n_streams):
        states[s] = _stream_state(seed, point, s)
    spare = np.full(n_streams, np.nan)
    return states, spare


@njit(parallel=True, cache=True)
def _draw(out, offsets, states, spare, mean, std, scaled):  # pragma: no cover
    """Rows ``offsets[s]:offsets[s+1]`` of ``out`` get stream ``s``'s next normals,
    as ``mean + std * eps`` when ``scaled`` (diagonal covariance), else ``eps``."""
    n = out.shape[1]
    for s in prange(offsets.size - 1):
        for r in range(offsets[s], offsets[s + 1]):
            for k in range(n):
                e = _normal(states, spare, s)
                out[r, k] = mean[k] + std[k] * e if scaled else e


@njit(parallel=True, cache=True)
def _bias_relu(h, c1):  # pragma: no cover
    """``h <- max(h + c1, 0)`` in place, rows in parallel."""
    m, p = h.shape
    for r in prange(m):
        for k in range(p):
            v = h[r, k] + c1[k]
            h[r, k] = v if v > 0.0 else 0.0


@njit(parallel=True, cache=True)
def _accumulate(z, offsets, offset, s1, s2d, s11, s21, s22, mode):  # pragma: no cover
    """Add the power sums of ``z[r] + offset`` over stream ``s``'s rows to the
    stream's accumulators: each block is summed on its own first, then added."""
    d = z.shape[1]
    for s in prange(offsets.size - 1):
        b1 = np.zeros(d)
        b2 = np.zeros(d)
        b11 = np.zeros((d, d)) if mode >= 1 else np.zeros((0, 0))
        b21 = np.zeros((d, d)) if mode == 2 else np.zeros((0, 0))
        b22 = np.zeros((d, d)) if mode == 2 else np.zeros((0, 0))
        v = np.empty(d)
        for r in range(offsets[s], offsets[s + 1]):
            for j in range(d):
                v[j] = z[r, j] + offset[j]
                b1[j] += v[j]
                b2[j] += v[j] * v[j]
            if mode >= 1:
                for i in range(d):
                    for j in range(d):
                        b11[i, j] += v[i] * v[j]
            if mode == 2:
                for i in range(d):
                    vi2 = v[i] * v[i]
                    for j in range(d):
                        b21[i, j] += vi2 * v[j]
                        b22[i, j] += vi2 * v[j] * v[j]
        s1[s] += b1
        s2d[s] += b2
        if mode >= 1:
            s11[s] += b11
        if mode == 2:
            s21[s] += b21
            s22[s] += b22


def _zero_sums(lead: int, d: int, dc: int, d4: int) -> tuple[np.ndarray, ...]:
    """Zeroed ``(sum z, sum z^2, sum z z^T, sum z_i^2 z_j, sum z_i^2 z_j^2)``."""
    return (
        np.zeros((lead, d)),
        np.zeros((lead, d)),
        np.zeros((lead, dc, dc)),
        np.zeros((lead, d4, d4)),
        np.zeros((lead, d4, d4)),
    )


def _affine_relu_affine_sums(
    mean: np.ndarray,
    factor: np.ndarray,
    full: bool,
    A: np.ndarray,
    c1: np.ndarray,
    B: np.ndarray,
    c2: np.ndarray,
    shift: np.ndarray,
    n_samples: int,
    seed: int,
    n_streams: int,
    block: int,
    mode: int,
) -> tuple[np.ndarray, ...]:
    """Shifted power sums of ``g(x) - shift`` per point, reduced over streams.

    Each round draws the next block of every stream (Numba, streams in parallel),
    pushes all of them through the two GEMMs at once (BLAS, called outside any
    Numba parallel region, so the two thread pools never nest), and adds each
    stream's block sums to that stream's accumulators (Numba, streams in
    parallel). Buffers hold one round, at most ``max(n_streams, 2**21 / width)``
    rows, whatever ``n_samples`` is.
    """
    P, n = mean.shape
    p = A.shape[0]
    d = B.shape[0]
    dc = d if mode >= 1 else 0
    d4 = d if mode == 2 else 0
    width = max(n, p, d)
    blk = max(1, min(block, (2**21 // width) // n_streams))
    rows = n_streams * blk
    At = np.ascontiguousarray(A.T)
    Bt = np.ascontiguousarray(B.T)
    xbuf = np.empty((rows, n))
    ebuf = np.empty((rows, n)) if full else xbuf
    hbuf = np.empty((rows, p))
    zbuf = np.empty((rows, d))
    counts = np.full(n_streams, n_samples // n_streams, dtype=np.int64)
    counts[: n_samples % n_streams] += 1
    out = _zero_sums(P, d, dc, d4)
    dummy = np.zeros(n)
    for pt in range(P):
        states, spare = _init_streams(np.uint64(seed), pt, n_streams)
        acc = _zero_sums(n_streams, d, dc, d4)
        offset = c2 - shift[pt]
        done = 0
        while done < counts[0]:
            take = np.clip(counts - done, 0, blk)
            offsets = np.concatenate(([0], np.cumsum(take)))
            m = int(offsets[-1])
            if full:
                _draw(ebuf[:m], offsets, states, spare, dummy, dummy, False)
                np.matmul(ebuf[:m], factor[pt], out=xbuf[:m])
                xbuf[:m] += mean[pt]
            else:
                _draw(xbuf[:m], offsets, states, spare, mean[pt], factor[pt, 0], True)
            np.matmul(xbuf[:m], At, out=hbuf[:m])
            _bias_relu(hbuf[:m], c1)
            np.matmul(hbuf[:m], Bt, out=zbuf[:m])
            _accumulate(zbuf[:m], offsets, offset, *acc, mode)
            done += blk
        for total, per_stream in zip(out, acc, strict=True):
            total[pt] = per_stream.sum(axis=0)  # fixed order over streams
    return out


# ----------------------------------------------------------------------------------
def _finalize(
    shift: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    n: int,
    s21: torch.Tensor | None = None,
    s22: torch.Tensor | None = None,
) -> MonteCarloResult:
    """Moments and standard errors from shifted power sums (module docstring)."""
    a = s1 / n
    mean = shift + a
    if s2.dim() == s1.dim():  # diagonal second moments only
        var = (s2 - n * a * a) / (n - 1)
        cov = None
    else:
        ai = a.unsqueeze(-1)
        aj = a.unsqueeze(-2)
        cov = (s2 - n * ai * aj) / (n - 1)
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
    stderr = torch.sqrt(torch.clamp(var, min=0.0) / n)
    cov_stderr = None
    if cov is not None and s21 is not None and s22 is not None:
        m11 = s2 / n
        dg = torch.diagonal(m11, dim1=-2, dim2=-1)
        mu22 = (
            s22 / n
            - 2.0 * aj * s21 / n
            - 2.0 * ai * s21.transpose(-1, -2) / n
            + aj * aj * dg.unsqueeze(-1)
            + ai * ai * dg.unsqueeze(-2)
            + 4.0 * ai * aj * m11
            - 3.0 * ai * ai * aj * aj
        )
        cov_biased = cov * ((n - 1) / n)
        cov_stderr = torch.sqrt(torch.clamp(mu22 - cov_biased**2, min=0.0) / n)
    return MonteCarloResult(mean, stderr, cov, cov_stderr, int(n))


def _as_float64(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MomentInputError(f"{name}: cannot convert to a float64 array ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        raise MomentInputError(f"{name}: contains NaN or infinity")
    return arr


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise MomentInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _covariance_factor(cov: np.ndarray) -> np.ndarray:
    """``L^T`` with ``L L^T = cov`` for each ``(n, n)`` matrix (symmetric square root).

    An eigendecomposition rather than Cholesky, so that singular covariances (rank
    deficient, correlation +-1) are legal. Asymmetry up to ``64 n eps max|cov|``
    (a GEMM's rounding) is accepted and averaged away. Eigenvalues down to ``-n * eps * max|w|``
    are rounding and are set to zero; anything more negative is an error.
    """
    n = cov.shape[-1]
    asym = np.abs(cov - np.swapaxes(cov, -1, -2)).max(axis=(-2, -1))
    scale = np.abs(cov).max(axis=(-2, -1))
    if np.any(asym > 64 * n * np.finfo(np.float64).eps * scale):
        raise MomentInputError("cov_x: full covariance is not symmetric")
    w, v = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
    tol = n * np.finfo(np.float64).eps * np.max(np.abs(w), axis=-1, keepdims=True)
    if np.any(w < -tol):
        raise MomentInputError(
            f"cov_x: not positive semi-definite (smallest eigenvalue {float(w.min()):.3e})"
        )
    lower = v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]
    return np.ascontiguousarray(np.swapaxes(lower, -1, -2))


def monte_carlo_affine_relu_affine(
    mean_x: object,
    cov_x: object,
    A: object,
    c1: object,
    B: object,
    c2: object,
    n_samples: int,
    seed: int = 0,
    *,
    compute_cov: bool = True,
    n_streams: int = 64,
    block: int = 256,
    n_threads: int | None = None,
) -> MonteCarloResult:
    """Monte Carlo mean and covariance of ``g(x) = B ReLU(A x + c1) + c2``.

    ``x ~ N(mean_x, cov_x)``: the reference for Theorem 1 (paper Eq. 1) and for the
    analytic output covariance. Streaming: memory is ``O(n_streams * d^2)`` plus one
    ``block x max(n, p, d)`` buffer per thread, independent of ``n_samples``.

    Args:
        mean_x: ``(..., n)`` input means; leading dimensions are a batch of points.
        cov_x: diagonal variances of the same shape as ``mean_x``, or full
            covariances ``(..., n, n)``; broadcast against the batch of ``mean_x``.
            Singular covariances are legal.
        A, c1, B, c2: ``(p, n)``, ``(p,)``, ``(d, p)``, ``(d,)``.
        n_samples: samples per input point (``>= 2``).
        seed: non-negative integer; the same seed and ``n_streams`` give bit-identical
            results on any number of threads.
        compute_cov: also estimate the full ``d x d`` covariance and its standard
            error (costs ``O(d^2)`` per sample instead of ``O(d)``).
        n_streams: independent random streams per point (the unit of parallel
            work); changing it changes the samples.
        block: samples drawn and pushed through the network at once per stream.
        n_threads: Numba threads (default :data:`DEFAULT_THREADS`).

    Returns:
        :class:`MonteCarloResult` with ``float64`` CPU tensors: ``mean``/``stderr``
        ``(..., d)``; ``cov``/``cov_stderr`` ``(..., d, d)`` or ``None``.

    Raises:
        MomentInputError: shape mismatch, non-finite input, negative variance, a full
            covariance that is not symmetric positive semi-definite, bad counts.
    """
    mean = _as_float64("mean_x", mean_x)
    cov = _as_float64("cov_x", cov_x)
    A_ = _as_float64("A", A)
    c1_ = _as_float64("c1", c1)
    B_ = _as_float64("B", B)
    c2_ = _as_float64("c2", c2)
    n_samples = _check_count("n_samples", n_samples, 2)
    n_streams = _check_count("n_streams", n_streams, 1)
    block = _check_count("block", block, 1)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**64:
        raise MomentInputError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    if mean.ndim < 1:
        raise MomentInputError("mean_x: expected shape (..., n)")
    n = mean.shape[-1]
    if A_.ndim != 2 or A_.shape[1] != n:
        raise MomentInputError(f"A: expected shape (p, {n}), got {A_.shape}")
    p = A_.shape[0]
    if c1_.shape != (p,):
        raise MomentInputError(f"c1: expected shape ({p},), got {c1_.shape}")
    if B_.ndim != 2 or B_.shape[1] != p:
        raise MomentInputError(f"B: expected shape (d, {p}), got {B_.shape}")
    d = B_.shape[0]
    if c2_.shape != (d,):
        raise MomentInputError(f"c2: expected shape ({d},), got {c2_.shape}")
    full = cov.ndim >= 2 and cov.shape[-2:] == (n, n) and cov.shape != mean.shape
    try:
        if full:
            batch = np.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
            cov = np.broadcast_to(cov, (*batch, n, n))
        else:
            batch = np.broadcast_shapes(mean.shape[:-1], cov.shape[:-1])
            if cov.shape[-1] != n:
                raise ValueError(f"last dimension {cov.shape[-1]} != {n}")
            cov = np.broadcast_to(cov, (*batch, n))
    except ValueError as exc:
        raise MomentInputError(
            f"cov_x: shape {cov.shape} is neither diagonal (..., {n}) nor full "
            f"(..., {n}, {n}) for mean_x of shape {mean.shape} ({exc})"
        ) from exc
    mean = np.ascontiguousarray(np.broadcast_to(mean, (*batch, n)).reshape(-1, n))
    if full:
        factor = _covariance_factor(np.ascontiguousarray(cov.reshape(-1, n, n)))
    else:
        if np.any(cov < 0):
            raise MomentInputError("cov_x: diagonal variances must be non-negative")
        factor = np.ascontiguousarray(np.sqrt(cov.reshape(-1, 1, n)))
    shift = np.maximum(mean @ A_.T + c1_, 0.0) @ B_.T + c2_
    mode = 2 if compute_cov else 0
    threads = DEFAULT_THREADS if n_threads is None else _check_count("n_threads", n_threads, 1)
    _prefer_workqueue_layer()
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        s1, s2d, s11, s21, s22 = _affine_relu_affine_sums(
            mean, factor, full, A_, c1_, B_, c2_, shift, n_samples, seed, n_streams, block, mode
        )
    finally:
        numba.set_num_threads(previous)
    device = mean_x.device if isinstance(mean_x, torch.Tensor) else torch.device("cpu")

    def total(s: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(s).to(device).reshape(*batch, *s.shape[1:])

    shift_t = torch.from_numpy(shift).to(device).reshape(*batch, d)
    if compute_cov:
        return _finalize(shift_t, total(s1), total(s11), n_samples, total(s21), total(s22))
    return _finalize(shift_t, total(s1), total(s2d), n_samples)


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
        MomentInputError: ``mean`` not a floating tensor with a batch dimension,
            ``var`` negative or not broadcastable, bad counts.
    """
    if not isinstance(mean, torch.Tensor) or not mean.is_floating_point() or mean.dim() < 1:
        raise MomentInputError("mean: expected a floating tensor of shape (P, *in_shape)")
    n_samples = _check_count("n_samples", n_samples, 2)
    batch_size = _check_count("batch_size", batch_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise MomentInputError(f"seed: expected a non-negative integer, got {seed!r}")
    var_t = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    if antithetic and (compute_cov or n_samples % 2 or n_samples < 4):
        raise MomentInputError(
            "antithetic: needs an even n_samples >= 4 and compute_cov=False (pair averages "
            "have the mean of fn(x) but not its covariance)"
        )
    if not bool(torch.all(var_t >= 0)):
        raise MomentInputError("var: variances must be non-negative")
    try:
        std = torch.broadcast_to(var_t.sqrt(), mean.shape)
    except RuntimeError as exc:
        raise MomentInputError(
            f"var: shape {tuple(var_t.shape)} does not broadcast to mean {tuple(mean.shape)}"
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
    res = _finalize(shift, s1, s2, n_draws, s21, s22)
    return MonteCarloResult(
        res.mean.reshape(P, *out_shape),
        res.stderr.reshape(P, *out_shape),
        res.cov,
        res.cov_stderr,
        n_samples,
    )
