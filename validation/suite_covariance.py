"""Suite ``covariance``: analytic ReLU covariance against Monte Carlo.

For ``X ~ N(mu, Sigma)`` in two dimensions (unit variances, correlation ``rho``),
``Cov[ReLU(X_1), ReLU(X_2)]`` from the exact formula
(:func:`momentkit.relu.relu_covariance`, any means) and from the zero-mean formula
of Bibi et al. (:func:`momentkit.relu.relu_covariance_zero_mean`, which ignores the
means) is compared with the streaming Monte Carlo estimate over a grid of means
``(mu_1, mu_2)`` and correlations ``rho``. The exact formula must agree within a few
standard errors everywhere; the zero-mean formula agrees only where both means are 0,
and the suite shows how fast it departs as the means move away from 0.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from momentkit.references.montecarlo import monte_carlo_affine_relu_affine
from momentkit.relu import relu_covariance, relu_covariance_zero_mean
from validation.reporting import SuiteConfig, SuiteReport, markdown_table, progress

NAME = "covariance"


def grid(quick: bool) -> dict[str, object]:
    means = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    rhos = [-0.99, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.99]
    if quick:
        return {"means": means, "rhos": rhos, "n_samples": 100_000}
    return {"means": means, "rhos": [-1.0, *rhos, 1.0], "n_samples": 1_000_000}


def run(cfg: SuiteConfig, overrides: dict[str, Any] | None = None) -> SuiteReport:
    """Run the suite; ``overrides`` replaces entries of :func:`grid` (for tests)."""
    start = time.perf_counter()
    g = {**grid(cfg.quick), **(overrides or {})}
    report = SuiteReport(NAME, {f"grid_{k}": v for k, v in g.items()})
    pts = list(itertools.product(g["means"], g["means"], g["rhos"]))
    f64 = torch.float64
    mean = torch.tensor([[a, b] for a, b, _ in pts], dtype=f64)
    rho = torch.tensor([r for *_, r in pts], dtype=f64)
    cov = torch.ones(len(pts), 2, 2, dtype=f64)
    cov[:, 0, 1] = rho
    cov[:, 1, 0] = rho
    exact = relu_covariance(mean, cov)
    zero = relu_covariance_zero_mean(cov)
    eye = torch.eye(2, dtype=f64)
    zeros = torch.zeros(2, dtype=f64)
    # One Monte Carlo call per chunk of the grid (a progress bar over chunks).
    chunks = np.array_split(np.arange(len(pts)), 8)
    mc_cov, mc_se = [], []
    for k, idx in enumerate(progress(chunks, cfg, NAME)):
        res = monte_carlo_affine_relu_affine(
            mean[idx], cov[idx], eye, zeros, eye, zeros, g["n_samples"], seed=cfg.seed * 100 + k
        )
        mc_cov.append(res.cov)
        mc_se.append(res.cov_stderr)
    mc = torch.cat(mc_cov)
    se = torch.cat(mc_se)
    z_exact_off = (mc[:, 0, 1] - exact[:, 0, 1]) / se[:, 0, 1]
    z_exact_var = (mc[:, 0, 0] - exact[:, 0, 0]) / se[:, 0, 0]
    z_zero = (mc[:, 0, 1] - zero[:, 0, 1]) / se[:, 0, 1]
    for i, (m1, m2, r) in enumerate(pts):
        report.rows.append(
            {
                "mu1": m1,
                "mu2": m2,
                "rho": r,
                "n_samples": g["n_samples"],
                "cov_mc": float(mc[i, 0, 1]),
                "stderr_mc": float(se[i, 0, 1]),
                "cov_exact": float(exact[i, 0, 1]),
                "cov_zero_mean": float(zero[i, 0, 1]),
                "z_exact": float(z_exact_off[i]),
                "z_zero_mean": float(z_zero[i]),
                "var1_mc": float(mc[i, 0, 0]),
                "var1_exact": float(exact[i, 0, 0]),
                "z_var1_exact": float(z_exact_var[i]),
                "abs_err_zero_mean": float((zero[i, 0, 1] - exact[i, 0, 1]).abs()),
            }
        )
    m = 2 * len(pts)
    bound = float(norm.ppf(1 - 0.01 / (2 * m)))
    worst = float(torch.cat([z_exact_off, z_exact_var]).abs().max())
    at_zero = [r for r in report.rows if r["mu1"] == 0.0 and r["mu2"] == 0.0]
    fails = [r for r in report.rows if abs(r["z_zero_mean"]) > bound]
    report.config["bonferroni_bound"] = round(bound, 3)
    by_mean = {}
    for r in report.rows:
        if r["mu1"] == r["mu2"]:
            key = r["mu1"]
            by_mean[key] = max(by_mean.get(key, 0.0), r["abs_err_zero_mean"])
    report.summary = [
        f"**{'PASS' if worst < bound else 'FAIL'}** (exact formula): {len(pts)} grid points, "
        f"largest |z| = {worst:.2f} (covariances and variances) against the family-wise 1% "
        f"bound {bound:.2f}.",
        "",
        f"Zero-mean formula: at mu = (0, 0) largest |z| = "
        f"{max(abs(r['z_zero_mean']) for r in at_zero):.2f} (it is exact there); it is "
        f"rejected (|z| > {bound:.2f}) at {len(fails)} of {len(pts)} grid points.",
        "",
        "Largest error of the zero-mean formula on the diagonal mu1 = mu2 (unit variances):",
        "",
        *markdown_table(
            [{"mu1 = mu2": k, "max abs error": v} for k, v in sorted(by_mean.items())],
            ["mu1 = mu2", "max abs error"],
        ),
    ]
    report.figure = _figure(report.rows, g)
    report.seconds = time.perf_counter() - start
    return report


def _figure(rows: list[dict], g: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    means = g["means"]
    rhos = g["rhos"]
    diag = {(r["mu1"], r["rho"]): r for r in rows if r["mu1"] == r["mu2"]}
    heat = np.array([[diag[(m, rho)]["z_zero_mean"] for m in means] for rho in rhos])
    im = axes[0].imshow(
        np.abs(heat),
        origin="lower",
        aspect="auto",
        cmap="magma_r",
        norm=matplotlib.colors.LogNorm(vmin=0.1, vmax=max(10.0, np.abs(heat).max())),
    )
    axes[0].set_xticks(range(len(means)), [f"{m:g}" for m in means])
    axes[0].set_yticks(range(len(rhos)), [f"{r:g}" for r in rhos])
    axes[0].set_xlabel("mu1 = mu2")
    axes[0].set_ylabel("rho")
    axes[0].set_title("zero-mean formula: |z| against Monte Carlo")
    fig.colorbar(im, ax=axes[0])
    for k, m in enumerate([-1.0, 0.0, 1.0]):
        sel = sorted((r for r in rows if r["mu1"] == m and r["mu2"] == m), key=lambda r: r["rho"])
        rr = [r["rho"] for r in sel]
        axes[1].plot(rr, [r["cov_exact"] for r in sel], f"C{k}-", label=f"exact, mu={m:g}")
        axes[1].plot(rr, [r["cov_zero_mean"] for r in sel], f"C{k}--", label=f"zero-mean, mu={m:g}")
        axes[1].errorbar(
            rr,
            [r["cov_mc"] for r in sel],
            yerr=[3 * r["stderr_mc"] for r in sel],
            fmt=f"C{k}o",
            ms=3,
            capsize=2,
        )
    axes[1].set_xlabel("rho")
    axes[1].set_ylabel("Cov[ReLU(X1), ReLU(X2)]")
    axes[1].set_title("covariance vs correlation (points: Monte Carlo +-3 se)")
    axes[1].legend(fontsize=7)
    z = np.array([r["z_exact"] for r in rows] + [r["z_var1_exact"] for r in rows])
    bins = np.linspace(-5, 5, 31)
    axes[2].hist(np.clip(z, -5, 5), bins=bins, density=True, alpha=0.7, label="exact formula")
    t = np.linspace(-5, 5, 201)
    axes[2].plot(t, norm.pdf(t), "k-", label="N(0, 1)")
    axes[2].set_xlabel("z-score")
    axes[2].set_title("exact formula: z-scores over the grid")
    axes[2].legend()
    fig.tight_layout()
    return fig
