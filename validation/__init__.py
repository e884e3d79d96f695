"""Validation suites: analytic moments against independent references.

``python -m validation [SUITE ...] [--quick] [--device D] [--seed S] [--out DIR]``
runs the suites below; each writes ``<suite>.csv`` (with a commented header that
records the configuration, package version and seed), ``<suite>.png`` and
``<suite>.md`` (a short summary) into ``DIR``. See ``docs/validation.md``.

- ``shallow``: Theorem 1 mean and the analytic covariance of random
  Affine-ReLU-Affine networks against Monte Carlo, as z-scores.
- ``deep``: the surrogate ``Omega(mu3)``, the two-stage linearization and every mode
  of ``network_moments`` (mean and variance) on MLPs, LeNets, a small ResNet and
  AlexNet against Monte Carlo, as a function of the noise level.
- ``covariance``: exact and zero-mean ReLU covariance against Monte Carlo.
- ``cost``: time and peak memory of each estimator against its accuracy, and the
  accuracy-against-time frontier of the analytic methods and Monte Carlo.
"""
