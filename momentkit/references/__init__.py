"""Independent references for the analytic moments in :mod:`momentkit`.

- :mod:`momentkit.references.montecarlo` (a package): streaming Monte Carlo estimates of output
  moments, with standard errors (Numba kernels for explicit Affine-ReLU-Affine
  networks; chunked sampling for any torch module).
- :mod:`momentkit.references.linearization`: the explicit-Jacobian two-stage
  linearization of Bibi et al. (CVPR 2018).

Nothing here is used by the analytic code; these modules exist to check it.
"""
