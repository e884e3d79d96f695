"""The streaming driver of the affine-ReLU-affine estimator: rounds of draw, GEMM, sum.

Work proceeds in rounds: a Numba parallel kernel draws the next block of every stream,
BLAS computes the two GEMMs for the whole round, and a second parallel kernel adds each
stream's block sums into that stream's accumulators. The work is split into a fixed
number of streams regardless of the thread count, and the streams are added in a
fixed order at the end, so the sums are bit-for-bit the same on any thread count.
"""

from __future__ import annotations

import numpy as np

from momentkit.references.montecarlo.kernels import accumulate, bias_relu, draw
from momentkit.references.montecarlo.rng import init_streams


def _zero_sums(lead: int, d: int, dc: int, d4: int) -> tuple[np.ndarray, ...]:
    """Zeroed ``(sum z, sum z^2, sum z z^T, sum z_i^2 z_j, sum z_i^2 z_j^2)``."""
    return (
        np.zeros((lead, d)),
        np.zeros((lead, d)),
        np.zeros((lead, dc, dc)),
        np.zeros((lead, d4, d4)),
        np.zeros((lead, d4, d4)),
    )


def affine_relu_affine_sums(
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
        states, spare = init_streams(np.uint64(seed), pt, n_streams)
        acc = _zero_sums(n_streams, d, dc, d4)
        offset = c2 - shift[pt]
        done = 0
        while done < counts[0]:
            take = np.clip(counts - done, 0, blk)
            offsets = np.concatenate(([0], np.cumsum(take)))
            m = int(offsets[-1])
            if full:
                draw(ebuf[:m], offsets, states, spare, dummy, dummy, False)
                np.matmul(ebuf[:m], factor[pt], out=xbuf[:m])
                xbuf[:m] += mean[pt]
            else:
                draw(xbuf[:m], offsets, states, spare, mean[pt], factor[pt, 0], True)
            np.matmul(xbuf[:m], At, out=hbuf[:m])
            bias_relu(hbuf[:m], c1)
            np.matmul(hbuf[:m], Bt, out=zbuf[:m])
            accumulate(zbuf[:m], offsets, offset, *acc, mode)
            done += blk
        for total, per_stream in zip(out, acc, strict=True):
            total[pt] = per_stream.sum(axis=0)  # fixed order over streams
    return out
