"""The Monte Carlo reference for Theorem 1: ``g(x) = B ReLU(A x + c1) + c2`` in Numba.

Streaming (:mod:`~momentkit.references.montecarlo.driver`) over counter-based random
streams (:mod:`~momentkit.references.montecarlo.rng`), so estimates are bit-for-bit
reproducible for a given seed and ``n_streams`` on any number of threads.
"""

from __future__ import annotations

import numpy as np
import torch

from momentkit._validate import (
    as_float64_array,
    check_count,
    check_covariance_matrix,
    check_seed,
)
from momentkit.errors import MomentInputError
from momentkit.references.montecarlo.driver import affine_relu_affine_sums
from momentkit.references.montecarlo.kernels import DEFAULT_THREADS, numba_threads
from momentkit.references.montecarlo.stats import MonteCarloResult, finalize


def _dtype_of(value: object) -> torch.dtype:
    """The floating dtype ``value`` came in (its eps sets the PSD tolerance)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.dtype
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        return torch.float32
    return torch.float64


def _covariance_factor(cov: np.ndarray) -> np.ndarray:
    """``L^T`` with ``L L^T = cov`` for each ``(n, n)`` matrix (symmetric square root).

    An eigendecomposition rather than Cholesky, so that singular covariances (rank
    deficient, correlation +-1) are legal. ``cov`` has passed
    :func:`momentkit._validate.check_covariance_matrix` (symmetric and positive
    semi-definite to rounding); its asymmetry is averaged away and its rounding-level
    negative eigenvalues are set to zero.
    """
    w, v = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
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
        MomentInputError: shape mismatch, NaN or infinity in any array, a negative
            variance, a full covariance that is not symmetric or not positive
            semi-definite beyond rounding (the tolerance of
            :func:`momentkit._validate.check_covariance_matrix`, with the eps of
            ``cov_x``'s dtype), bad counts. Messages start with the function's name.
    """
    fn = "monte_carlo_affine_relu_affine"
    mean = as_float64_array(mean_x, "mean_x", fn)
    cov = as_float64_array(cov_x, "cov_x", fn)
    A_ = as_float64_array(A, "A", fn)
    c1_ = as_float64_array(c1, "c1", fn)
    B_ = as_float64_array(B, "B", fn)
    c2_ = as_float64_array(c2, "c2", fn)
    n_samples = check_count(n_samples, "n_samples", fn, 2)
    n_streams = check_count(n_streams, "n_streams", fn)
    block = check_count(block, "block", fn)
    seed = check_seed(seed, fn, bits=64)
    if mean.ndim < 1:
        raise MomentInputError(f"{fn}: mean_x must have shape (..., n), got a scalar")
    n = mean.shape[-1]
    if A_.ndim != 2 or A_.shape[1] != n:
        raise MomentInputError(f"{fn}: A must have shape (p, {n}), got {A_.shape}")
    p = A_.shape[0]
    if c1_.shape != (p,):
        raise MomentInputError(f"{fn}: c1 must have shape ({p},), got {c1_.shape}")
    if B_.ndim != 2 or B_.shape[1] != p:
        raise MomentInputError(f"{fn}: B must have shape (d, {p}), got {B_.shape}")
    d = B_.shape[0]
    if c2_.shape != (d,):
        raise MomentInputError(f"{fn}: c2 must have shape ({d},), got {c2_.shape}")
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
            f"{fn}: cov_x of shape {cov.shape} is neither diagonal (..., {n}) nor full "
            f"(..., {n}, {n}) for mean_x of shape {mean.shape} ({exc})"
        ) from exc
    mean = np.ascontiguousarray(np.broadcast_to(mean, (*batch, n)).reshape(-1, n))
    if full:
        flat = np.ascontiguousarray(cov.reshape(-1, n, n))
        check_covariance_matrix(
            torch.tensor(flat).to(_dtype_of(cov_x)), fn, "cov_x (a covariance)"
        )
        factor = _covariance_factor(flat)
    else:
        if np.any(cov < 0):
            raise MomentInputError(f"{fn}: cov_x (a variance) must be non-negative")
        factor = np.ascontiguousarray(np.sqrt(cov.reshape(-1, 1, n)))
    shift = np.maximum(mean @ A_.T + c1_, 0.0) @ B_.T + c2_
    mode = 2 if compute_cov else 0
    threads = DEFAULT_THREADS if n_threads is None else check_count(n_threads, "n_threads", fn)
    with numba_threads(threads):
        s1, s2d, s11, s21, s22 = affine_relu_affine_sums(
            mean, factor, full, A_, c1_, B_, c2_, shift, n_samples, seed, n_streams, block, mode
        )
    device = mean_x.device if isinstance(mean_x, torch.Tensor) else torch.device("cpu")

    def total(s: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(s).to(device).reshape(*batch, *s.shape[1:])

    shift_t = torch.from_numpy(shift).to(device).reshape(*batch, d)
    if compute_cov:
        return finalize(shift_t, total(s1), total(s11), n_samples, total(s21), total(s22))
    return finalize(shift_t, total(s1), total(s2d), n_samples)
