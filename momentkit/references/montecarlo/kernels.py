"""Numba parallel kernels of the affine-ReLU-affine estimator, and its thread settings.

Each kernel runs the streams of one round in parallel (``prange`` over streams): a
stream's rows are ``offsets[s]:offsets[s + 1]`` of the round's buffers. BLAS is never
called from inside these kernels, so Numba's and BLAS's thread pools do not nest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

from momentkit.references.montecarlo.rng import normal

#: Numba threads used when ``n_threads`` is not given: modest, so that a reference
#: computation does not take over a shared machine.
DEFAULT_THREADS: int = max(1, min(4, numba.config.NUMBA_NUM_THREADS))


def prefer_workqueue_layer() -> None:
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


@contextlib.contextmanager
def numba_threads(n_threads: int) -> Iterator[None]:
    """Run the block with ``n_threads`` Numba threads (at most Numba's maximum), then
    restore the previous count; chooses the ``workqueue`` layer first if it may."""
    prefer_workqueue_layer()
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@njit(parallel=True, cache=True)
def draw(out, offsets, states, spare, mean, std, scaled):  # pragma: no cover
    """Rows ``offsets[s]:offsets[s+1]`` of ``out`` get stream ``s``'s next normals,
    as ``mean + std * eps`` when ``scaled`` (diagonal covariance), else ``eps``."""
    n = out.shape[1]
    for s in prange(offsets.size - 1):
        for r in range(offsets[s], offsets[s + 1]):
            for k in range(n):
                e = normal(states, spare, s)
                out[r, k] = mean[k] + std[k] * e if scaled else e


@njit(parallel=True, cache=True)
def bias_relu(h, c1):  # pragma: no cover
    """``h <- max(h + c1, 0)`` in place, rows in parallel."""
    m, p = h.shape
    for r in prange(m):
        for k in range(p):
            v = h[r, k] + c1[k]
            h[r, k] = v if v > 0.0 else 0.0


@njit(parallel=True, cache=True)
def accumulate(z, offsets, offset, s1, s2d, s11, s21, s22, mode):  # pragma: no cover
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
