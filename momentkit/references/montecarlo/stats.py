"""Monte Carlo statistics: the result type and the moments from shifted power sums.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MonteCarloResult:
    """Monte Carlo moments of a network output.

    Attributes:
        mean: ``(..., d)`` estimate of ``E[f(x)]`` (for
            :func:`momentkit.references.montecarlo.monte_carlo_moments` the output's own
            shape ``(..., *out_shape)``).
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


def finalize(
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
