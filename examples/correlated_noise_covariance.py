"""Output covariance of a one-hidden-layer network under correlated Gaussian input noise.

What you learn: for ``g(x) = B ReLU(A x + c1) + c2`` and ``x ~ N(mu, Sigma)`` with a
full (correlated) ``Sigma``, how close three closed forms of ``Cov[g(x)]`` are to a
Monte Carlo estimate, in units of its standard error:

* ``exact``: :func:`momentkit.affine_relu_affine_covariance` with the full ``Sigma``
  (exact for any means; its differences from Monte Carlo are sampling noise);
* ``zero-mean``: the same with the ReLU covariance of Bibi et al.
  (:func:`momentkit.relu_covariance_zero_mean`), which assumes every pre-activation
  has mean zero; its error grows with ``|A mu + c1|`` relative to the spread;
* ``independent``: the exact formula fed only the diagonal of ``Sigma``, i.e. what you
  get if you ignore the correlation of the noise.

The Monte Carlo reference is
:func:`momentkit.references.montecarlo.monte_carlo_affine_relu_affine`. Input noise is
``Sigma_ij = sigma^2 rho^|i-j|`` (neighbouring inputs correlated like neighbouring
pixels); ``--rho 0`` makes it independent, and then ``independent`` equals ``exact``.

Run (a few seconds on a CPU)::

    python examples/correlated_noise_covariance.py
    python examples/correlated_noise_covariance.py --rho 0.95 --sigma 1.0

Columns: ``max|err|`` is the largest absolute difference from the Monte Carlo covariance
over all entries and points; ``rel`` that divided by the largest Monte Carlo variance;
``max|z|`` the largest difference in units of the entry's standard error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import momentkit as mk
from momentkit.references.montecarlo import monte_carlo_affine_relu_affine


def correlated_cov(n: int, sigma: float, rho: float, dtype=torch.float64) -> torch.Tensor:
    """``sigma^2 rho^|i-j|``, ``(n, n)``: positive definite for ``|rho| < 1``."""
    idx = torch.arange(n, dtype=dtype)
    return sigma**2 * rho ** (idx[:, None] - idx[None, :]).abs()


def zero_mean_covariance(cov_x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``B Cov[ReLU(h)] B^T`` for ``h ~ N(0, A Sigma A^T)``: the pre-activation's mean
    ``A mu + c1`` is ignored, as Bibi et al.'s zero-mean formula assumes."""
    return B @ mk.relu_covariance_zero_mean(A @ cov_x @ A.T) @ B.T


def compare(
    mean_x: torch.Tensor,
    cov_x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    n_samples: int,
    seed: int,
) -> list[dict[str, float | str]]:
    """One row per closed form: its error against Monte Carlo.

    ``mean_x`` ``(P, n)`` points, ``cov_x`` ``(n, n)`` shared by all points, ``weights``
    ``(A, c1, B, c2)``, all float64 on one device. Keys: ``method``, ``max_err``,
    ``rel`` (``max_err`` over the largest Monte Carlo variance), ``max_z``.
    """
    A, c1, B, c2 = weights
    mc = monte_carlo_affine_relu_affine(
        mean_x.cpu(), cov_x.cpu(), A.cpu(), c1.cpu(), B.cpu(), c2.cpu(), n_samples, seed
    )
    scale = float(torch.diagonal(mc.cov, dim1=-2, dim2=-1).max())
    full = cov_x.expand(mean_x.shape[0], -1, -1)
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    candidates = {
        "exact": mk.affine_relu_affine_covariance(mean_x, full, A, c1, B, c2),
        "zero-mean": zero_mean_covariance(cov_x, A, B),  # the same for every point
        "independent": mk.affine_relu_affine_covariance(mean_x, diagonal, A, c1, B, c2),
    }
    rows: list[dict[str, float | str]] = []
    for method, cov in candidates.items():
        err = (cov.cpu() - mc.cov).abs()
        rows.append(
            {
                "method": method,
                "max_err": float(err.max()),
                "rel": float(err.max()) / scale,
                "max_z": float((err / mc.cov_stderr).max()),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, float | str]]:
    """Parse ``argv``, print the table, return its rows (see :func:`compare`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device of the closed forms")
    parser.add_argument("--seed", type=int, default=0, help="weights, points and noise")
    parser.add_argument("--sigma", type=float, default=0.5, help="noise std of each input")
    parser.add_argument("--rho", type=float, default=0.8, help="correlation of neighbours")
    parser.add_argument("--inputs", type=int, default=8, help="input dimension n")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units")
    parser.add_argument("--outputs", type=int, default=3, help="output dimension")
    parser.add_argument("--points", type=int, default=2, help="input means")
    parser.add_argument("--samples", type=int, default=200_000, help="Monte Carlo samples")
    args = parser.parse_args(argv)
    if not -1 < args.rho < 1:
        parser.error(f"--rho must be in (-1, 1), got {args.rho}")

    g = torch.Generator().manual_seed(args.seed)
    n, h, d = args.inputs, args.hidden, args.outputs
    weights = (
        torch.randn(h, n, generator=g, dtype=torch.float64) / n**0.5,
        torch.randn(h, generator=g, dtype=torch.float64),
        torch.randn(d, h, generator=g, dtype=torch.float64) / h**0.5,
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    mean_x = torch.rand(args.points, n, generator=g, dtype=torch.float64)
    cov_x = correlated_cov(n, args.sigma, args.rho)
    device = torch.device(args.device)
    rows = compare(
        mean_x.to(device), cov_x.to(device), [w.to(device) for w in weights],
        args.samples, args.seed,
    )
    print(
        f"Cov[B ReLU(A x + c1) + c2], x ~ N(mu, sigma^2 rho^|i-j|), sigma={args.sigma:g}, "
        f"rho={args.rho:g}; n={n}, hidden={h}, outputs={d}, {args.points} points, "
        f"{args.samples} Monte Carlo samples"
    )
    print(f"{'method':>12} {'max|err|':>10} {'rel':>9} {'max|z|':>8}")
    for r in rows:
        print(f"{r['method']:>12} {r['max_err']:>10.3e} {r['rel']:>9.2e} {r['max_z']:>8.1f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
