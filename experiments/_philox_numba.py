"""Compiled CPU kernel of :func:`experiments.augment.counter_normal` (Philox4x32-10 + Box-Muller).

The torch path of :func:`experiments.augment.counter_normal` runs about 300 small
elementwise operations on int64 tensors per batch; on a CPU each of them is a parallel
region of its own, and on a loaded machine every region waits for its slowest thread,
so the noise of one batch took up to seconds. This kernel does the same arithmetic in
one compiled loop that writes the float32 result in place: no int64 temporaries, no
stacking or padding copies.

It produces the same 32-bit words (Philox4x32-10 on the counter ``(index, copy,
block, 0)`` with the 64-bit seed as its key, Random123's round-key schedule) and the
same float32 uniforms as the torch path, bit for bit. The Box-Muller transform rounds
to float32 at the same places as the torch path (``-2 log u1``, its square root, the
angle ``float32(2 pi) * u2``, the cosine and sine, the product), with ``log``, ``cos``
and ``sin`` evaluated in float64 and rounded once, so they are correctly rounded for
all but rare ties; the torch path's float32 ``log``/``cos``/``sin`` are within about
one unit in the last place (ulp), so the two paths agree to within a few float32 ulps
of the value (tests/experiments/test_augment.py states and checks the bound).

The loop is serial on purpose: one batch is at most a few million values (a few
milliseconds), too little to pay for waking worker threads on a busy machine.
Compiled on first use and cached on disk (``cache=True``); :func:`warm_up` compiles it
ahead of a timed loop.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT8 = np.uint64(8)


@njit(cache=True, inline="always")
def _philox_block(c0, c1, c2, c3, k0, k1, rounds):  # pragma: no cover - compiled
    """Philox4x32 on uint64 words in [0, 2**32): ``rounds`` rounds, returns four words."""
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = c0 * _M0  # both factors < 2**32: the product fits uint64 exactly
        p1 = c2 * _M1
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ k0,
            p1 & _MASK,
            (p0 >> _SHIFT32) ^ c3 ^ k1,
            p0 & _MASK,
        )
    return c0, c1, c2, c3


@njit(cache=True)
def philox4x32_words(counters, k0, k1, rounds):  # pragma: no cover - compiled
    """Philox4x32 of each row of ``counters`` (uint64 ``(N, 4)``): uint64 ``(N, 4)``."""
    out = np.empty_like(counters)
    for i in range(counters.shape[0]):
        w = _philox_block(counters[i, 0], counters[i, 1], counters[i, 2], counters[i, 3],
                          np.uint64(k0), np.uint64(k1), rounds)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = w
    return out


@njit(cache=True)
def _uniform(w):  # pragma: no cover - compiled
    """``float32(w >> 8) + 0.5`` in float32 arithmetic, times ``2**-24``."""
    return (np.float32(w >> _SHIFT8) + np.float32(0.5)) * np.float32(2.0**-24)


@njit(cache=True)
def _radius(u):  # pragma: no cover - compiled
    log_u = np.float32(math.log(np.float64(u)))
    return np.float32(math.sqrt(np.float64(np.float32(-2.0) * log_u)))


@njit(cache=True)
def _store(out, b, j, z, scale, add):  # pragma: no cover - compiled
    if add:
        out[b, j] += scale * z
    else:
        out[b, j] = z


@njit(cache=True)
def counter_normal_kernel(index, copy, k0, k1, rounds, out, scale, add, skip_copy_zero
                          ):  # pragma: no cover - compiled
    """Fill float32 ``out`` ``(B, V)`` with ``z(seed, index[b], copy[b], j)``, ``j < V``.

    ``index``, ``copy``: uint64 ``(B,)`` in [0, 2**32); ``k0``, ``k1``: the key words.
    With ``add`` False it stores ``z`` (``scale`` unused); with ``add`` True it adds
    ``scale * z`` (float32 arithmetic) to ``out`` in place. ``skip_copy_zero`` leaves the
    rows with ``copy == 0`` (the clean copy of augmentation) as they are.
    """
    two_pi = np.float32(2.0 * math.pi)
    num_values = out.shape[1]
    blocks = (num_values + 3) // 4
    key0 = np.uint64(k0)
    key1 = np.uint64(k1)
    for b in range(out.shape[0]):
        if skip_copy_zero and copy[b] == 0:
            continue
        for block in range(blocks):
            w0, w1, w2, w3 = _philox_block(index[b], copy[b], np.uint64(block),
                                           np.uint64(0), key0, key1, rounds)
            j = 4 * block
            for pair in range(2):
                if j >= num_values:
                    break
                if pair == 0:
                    u1, u2 = _uniform(w0), _uniform(w1)
                else:
                    u1, u2 = _uniform(w2), _uniform(w3)
                radius = _radius(u1)
                angle = two_pi * u2
                _store(out, b, j, radius * np.float32(math.cos(np.float64(angle))), scale, add)
                if j + 1 < num_values:
                    _store(out, b, j + 1, radius * np.float32(math.sin(np.float64(angle))),
                           scale, add)
                j += 2


def warm_up() -> None:
    """Compile (or load from the cache) the kernels, so that no timed step pays for it."""
    index = np.zeros(1, dtype=np.uint64)
    counter_normal_kernel(index, index, 0, 0, 10, np.empty((1, 4), dtype=np.float32),
                          np.float32(1.0), False, False)
    counter_normal_kernel(index, index, 0, 0, 10, np.zeros((1, 4), dtype=np.float32),
                          np.float32(1.0), True, True)
    philox4x32_words(np.zeros((1, 4), dtype=np.uint64), 0, 0, 10)
