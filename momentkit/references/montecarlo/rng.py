"""Counter-based random numbers for the Numba estimator: SplitMix64 and Box-Muller.

Sample block ``s`` ("stream") of input point ``p`` is drawn from a SplitMix64
sequence (Steele, Lea and Flood 2014) whose start is a hash of ``(seed, p, s)``;
normals come from the Box-Muller transform, the sine half kept for the next call, so
that a stream's sequence of normals does not depend on how it is blocked. Every
constant is a uint64 so that no operation is promoted to float.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

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
def mix64(z: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    """The SplitMix64 finalizer."""
    z = (z ^ (z >> _SH30)) * _MIX1
    z = (z ^ (z >> _SH27)) * _MIX2
    return z ^ (z >> _SH31)


@njit(cache=True)
def stream_state(seed: np.uint64, point: int, stream: int) -> np.uint64:  # pragma: no cover
    """The start of stream ``stream`` of input point ``point``: a hash of the three."""
    z = mix64(seed + _GOLDEN)
    z = mix64(z ^ (np.uint64(point) * _MIX1 + _GOLDEN))
    return mix64(z ^ (np.uint64(stream) * _MIX2 + _GOLDEN))


@njit(cache=True)
def normal(states: np.ndarray, spare: np.ndarray, s: int) -> float:  # pragma: no cover
    """Next standard normal of stream ``s`` (Box-Muller; the sine half is kept in
    ``spare`` so that a stream's sequence does not depend on how it is blocked)."""
    if not math.isnan(spare[s]):
        v = spare[s]
        spare[s] = math.nan
        return v
    state = states[s] + _GOLDEN
    r1 = mix64(state)
    state += _GOLDEN
    r2 = mix64(state)
    states[s] = state
    u1 = (float(r1 >> _SH11) + 1.0) * _TWO_M53  # (0, 1]: log(u1) is finite
    u2 = float(r2 >> _SH11) * _TWO_M53
    rad = math.sqrt(-2.0 * math.log(u1))
    ang = _TWO_PI * u2
    spare[s] = rad * math.sin(ang)
    return rad * math.cos(ang)


@njit(cache=True)
def init_streams(seed: np.uint64, point: int, n_streams: int):  # pragma: no cover
    """States and (empty) Box-Muller spares of the ``n_streams`` streams of a point."""
    states = np.empty(n_streams, dtype=np.uint64)
    for s in range(n_streams):
        states[s] = stream_state(seed, point, s)
    spare = np.full(n_streams, np.nan)
    return states, spare
