"""Streaming Monte Carlo estimates of output moments under Gaussian input.

Two estimators of ``E[f(x)]`` and ``Cov[f(x)]`` for ``x ~ N(mean, cov)``, both with
standard errors, both for a batch of input points, both with memory that does not
grow with the number of samples:

- :func:`monte_carlo_affine_relu_affine`: Numba kernels for the explicit network
  ``g(x) = B ReLU(A x + c1) + c2`` (the network of Theorem 1), diagonal or full
  input covariance, ``float64`` throughout.
- :func:`monte_carlo_moments`: any callable torch module (CPU or CUDA), diagonal
  input variance, sampled in chunks of ``batch_size`` forward rows.

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

Layout: :mod:`.rng` (SplitMix64 streams and Box-Muller normals), :mod:`.kernels`
(Numba parallel kernels and thread settings), :mod:`.driver` (the streaming rounds),
:mod:`.stats` (the result and the moments from the power sums, with the accumulation
formulas), :mod:`.network` and :mod:`.module` (the two estimators).
"""

from momentkit.references.montecarlo.kernels import DEFAULT_THREADS
from momentkit.references.montecarlo.module import monte_carlo_moments
from momentkit.references.montecarlo.network import monte_carlo_affine_relu_affine
from momentkit.references.montecarlo.stats import MonteCarloResult

__all__ = [
    "DEFAULT_THREADS",
    "MonteCarloResult",
    "monte_carlo_affine_relu_affine",
    "monte_carlo_moments",
]
