"""Suite ``shallow``: Theorem 1 and the analytic covariance against Monte Carlo.

For random Affine-ReLU-Affine networks ``g(x) = B ReLU(A x + c1) + c2`` across input
sizes ``n``, widths ``p`` and noise levels ``sigma`` (diagonal and full input
covariances), the analytic mean (:func:`momentkit.shallow.affine_relu_affine_mean`)
and covariance (:func:`momentkit.shallow.affine_relu_affine_covariance`) are compared
with the streaming Numba Monte Carlo of
:func:`momentkit.references.montecarlo.monte_carlo_affine_relu_affine`. The error
is reported in standard errors (z-scores): a correct analytic moment gives z-scores
distributed about N(0, 1), so the largest |z| of ``m`` compared values should stay
below the Bonferroni bound ``Phi^-1(1 - 0.01 / (2 m))`` (family-wise 1%).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from momentkit.references.montecarlo import monte_carlo_affine_relu_affine
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean
from validation.reporting import SuiteConfig, SuiteReport, markdown_table, progress

NAME = "shallow"


def grid(quick: bool) -> dict[str, object]:
    if quick:
        return {
            "n": [4, 32],
            "p": [16, 64],
            "sigma": [0.1, 1.0, 10.0],
            "cov_kind": ["diag", "full"],
            "d": 4,
            "points": 2,
            "n_samples": 20_000,
        }
    return {
        "n": [4, 64, 256],
        "p": [16, 256],
        "sigma": [0.1, 1.0, 10.0],
        "cov_kind": ["diag", "full"],
        "d": 8,
        "points": 3,
        "n_samples": 200_000,
    }


def random_network(n: int, p: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Weights with unit-scale pre-activations: ``A ~ N(0, 1/n)``, ``B ~ N(0, 1/p)``."""
    f64 = torch.float64
    A = torch.randn(p, n, generator=gen, dtype=f64) / math.sqrt(n)
    c1 = torch.randn(p, generator=gen, dtype=f64)
    B = torch.randn(d, p, generator=gen, dtype=f64) / math.sqrt(p)
    c2 = torch.randn(d, generator=gen, dtype=f64)
    return A, c1, B, c2


def random_input(
    points: int, n: int, sigma: float, cov_kind: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``N(0, 1)``; variances ``sigma^2 * U(0.5, 1.5)``; a full covariance has
    those variances and the correlations of a random Wishart matrix."""
    f64 = torch.float64
    mean = torch.randn(points, n, generator=gen, dtype=f64)
    var = sigma**2 * (0.5 + torch.rand(points, n, generator=gen, dtype=f64))
    if cov_kind == "diag":
        return mean, var
    M = torch.randn(points, n, n, generator=gen, dtype=f64)
    W = M @ M.transpose(-1, -2) / n + 1e-3 * torch.eye(n, dtype=f64)
    d = W.diagonal(dim1=-2, dim2=-1).rsqrt()
    corr = W * d.unsqueeze(-1) * d.unsqueeze(-2)
    s = var.sqrt()
    cov = corr * s.unsqueeze(-1) * s.unsqueeze(-2)
    return mean, 0.5 * (cov + cov.transpose(-1, -2))


def run(cfg: SuiteConfig, overrides: dict[str, Any] | None = None) -> SuiteReport:
    """Run the suite; ``overrides`` replaces entries of :func:`grid` (for tests)."""
    start = time.perf_counter()
    g = {**grid(cfg.quick), **(overrides or {})}
    report = SuiteReport(NAME, {f"grid_{k}": v for k, v in g.items()})
    gen = torch.Generator().manual_seed(cfg.seed)
    configs = list(itertools.product(g["n"], g["p"], g["sigma"], g["cov_kind"]))
    z_mean_all: list[np.ndarray] = []
    z_cov_all: list[np.ndarray] = []
    for i, (n, p, sigma, kind) in enumerate(progress(configs, cfg, NAME)):
        A, c1, B, c2 = random_network(n, p, g["d"], gen)
        mean_x, cov_x = random_input(g["points"], n, sigma, kind, gen)
        mean = affine_relu_affine_mean(mean_x, cov_x, A, c1, B, c2)
        cov = affine_relu_affine_covariance(mean_x, cov_x, A, c1, B, c2)
        mc = monte_carlo_affine_relu_affine(
            mean_x, cov_x, A, c1, B, c2, g["n_samples"], seed=cfg.seed * 1000 + i
        )
        z_mean = ((mc.mean - mean) / mc.stderr).numpy()
        iu = torch.triu_indices(g["d"], g["d"])
        z_cov = ((mc.cov - cov) / mc.cov_stderr)[:, iu[0], iu[1]].numpy()
        z_mean_all.append(z_mean.ravel())
        z_cov_all.append(z_cov.ravel())
        rel = ((mc.mean - mean).abs() / mean.abs().clamp_min(1e-12)).max()
        report.rows.append(
            {
                "n": n,
                "p": p,
                "d": g["d"],
                "sigma": sigma,
                "cov_kind": kind,
                "points": g["points"],
                "n_samples": g["n_samples"],
                "max_abs_z_mean": float(np.abs(z_mean).max()),
                "rms_z_mean": float(np.sqrt(np.mean(z_mean**2))),
                "max_abs_z_cov": float(np.abs(z_cov).max()),
                "rms_z_cov": float(np.sqrt(np.mean(z_cov**2))),
                "max_abs_err_mean": float((mc.mean - mean).abs().max()),
                "max_rel_err_mean": float(rel),
                "max_stderr_mean": float(mc.stderr.max()),
                "max_abs_err_cov": float((mc.cov - cov).abs().max()),
            }
        )
    zm = np.concatenate(z_mean_all)
    zc = np.concatenate(z_cov_all)
    m = zm.size + zc.size
    bound = float(norm.ppf(1 - 0.01 / (2 * m)))
    worst = float(max(np.abs(zm).max(), np.abs(zc).max()))
    verdict = "PASS" if worst < bound else "FAIL"
    report.config["bonferroni_bound"] = round(bound, 3)
    report.summary = [
        f"**{verdict}**: {len(configs)} networks, {zm.size} mean and {zc.size} covariance "
        f"values compared. Largest |z| = {worst:.2f} against the family-wise 1% bound "
        f"{bound:.2f}.",
        "",
        f"- mean: RMS z = {np.sqrt(np.mean(zm**2)):.3f} (1 expected), "
        f"{100 * np.mean(np.abs(zm) > 3):.2f}% beyond 3 (0.27% expected)",
        f"- covariance: RMS z = {np.sqrt(np.mean(zc**2)):.3f}, "
        f"{100 * np.mean(np.abs(zc) > 3):.2f}% beyond 3",
        "",
        "Worst configurations:",
        "",
        *markdown_table(
            sorted(report.rows, key=lambda r: -max(r["max_abs_z_mean"], r["max_abs_z_cov"]))[:5],
            ["n", "p", "sigma", "cov_kind", "max_abs_z_mean", "max_abs_z_cov", "max_rel_err_mean"],
        ),
    ]
    report.figure = _figure(zm, zc, report.rows, bound)
    report.seconds = time.perf_counter() - start
    return report


def _figure(zm: np.ndarray, zc: np.ndarray, rows: list[dict], bound: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-5, 5, 41)
    ax1.hist(np.clip(zm, -5, 5), bins=bins, density=True, alpha=0.6, label="mean (Theorem 1)")
    ax1.hist(np.clip(zc, -5, 5), bins=bins, density=True, alpha=0.6, label="covariance")
    t = np.linspace(-5, 5, 201)
    ax1.plot(t, norm.pdf(t), "k-", label="N(0, 1)")
    ax1.set_xlabel("(Monte Carlo - analytic) / standard error")
    ax1.set_ylabel("density")
    ax1.legend()
    ax1.set_title("z-scores of all compared values")
    for kind, marker in (("diag", "o"), ("full", "s")):
        sel = [r for r in rows if r["cov_kind"] == kind]
        ax2.scatter(
            [r["sigma"] for r in sel],
            [r["max_abs_z_mean"] for r in sel],
            marker=marker,
            label=f"mean, {kind} cov",
            alpha=0.7,
        )
        ax2.scatter(
            [r["sigma"] for r in sel],
            [r["max_abs_z_cov"] for r in sel],
            marker=marker,
            facecolors="none",
            edgecolors="C3",
            label=f"cov, {kind} cov",
            alpha=0.7,
        )
    ax2.axhline(bound, color="k", ls="--", label="family-wise 1% bound")
    ax2.set_xscale("log")
    ax2.set_xlabel("input noise sigma")
    ax2.set_ylabel("max |z| per network")
    ax2.legend(fontsize=7)
    ax2.set_title("largest z-score per configuration")
    fig.tight_layout()
    return fig
