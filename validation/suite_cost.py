"""Suite ``cost``: time and peak memory of each estimator against its accuracy.

Three parts. (1) An Affine-ReLU-Affine network (784 inputs, float64) where Theorem 1
and the analytic covariance are exact, so every estimator's error is known: the
analytic mean and covariance, the explicit-Jacobian two-stage linearization (exact
here), and Monte Carlo (Numba kernel and torch module version) at 1e3 to 1e6
samples. (2) A LeNet-shaped network, where the surrogate ``Omega(mu3)`` costs one
more forward pass, the linearization needs Jacobians, and Monte Carlo needs many
forward passes; here the Monte Carlo standard error is the accuracy reported. (3) The
accuracy-against-time frontier on a LeNet-shaped network: each analytic method
(surrogate, linearization, each ``network_moments`` mode) a point, Monte Carlo a
curve, errors against a long Monte Carlo run; per ``sigma_x``, whether the default
mode beats Monte Carlo at equal wall time (:func:`mc_error_at`).

Time and peak memory: :func:`validation.measuring.measure` (best of a few runs for
anything under a second). The frontier is in :mod:`validation.cost_frontier`. The
``samples_for_target`` and ``seconds_for_target`` columns extrapolate Monte Carlo to
a standard error of ``target`` (``stderr ~ 1/sqrt(N)``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_affine_relu_affine, monte_carlo_moments
from momentkit.regularizer import expected_prediction
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean
from validation.cost_frontier import (  # noqa: F401  (part of this suite's interface)
    FRONTIER_METHODS,
    frontier_rows,
    mc_error_at,
)
from validation.cost_report import _figure, _frontier_summary
from validation.measuring import measure
from validation.networks import lenet_shaped
from validation.reporting import SuiteConfig, SuiteReport, markdown_table, progress

NAME = "cost"
TARGET = 1e-3


def grid(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "n": 784,
            "p": 256,
            "d": 10,
            "sigma": 0.5,
            "mc_samples": [1000, 10_000, 30_000],
            "lenet_width": 0.25,
            "lenet_mc_samples": [1000, 4000],
            "target": TARGET,
            "frontier_width": 0.25,
            "frontier_sigmas": [0.1, 1.0],
            "frontier_points": 1,
            "frontier_mc_samples": [100, 1000],
            "frontier_reference_samples": 10_000,
        }
    return {
        "n": 784,
        "p": 1024,
        "d": 10,
        "sigma": 0.5,
        "mc_samples": [1000, 10_000, 100_000],
        "lenet_width": 1.0,
        "lenet_mc_samples": [1000, 10_000],
        "target": TARGET,
        "frontier_width": 0.25,
        "frontier_sigmas": [0.01, 0.1, 1.0],
        "frontier_points": 1,
        "frontier_mc_samples": [100, 1000, 10_000, 100_000],
        "frontier_reference_samples": 200_000,
    }


def _shallow_rows(cfg: SuiteConfig, g: dict, bar) -> list[dict]:
    dev = cfg.torch_device
    f64 = torch.float64
    gen = torch.Generator().manual_seed(cfg.seed)
    n, p, d = g["n"], g["p"], g["d"]
    A = (torch.randn(p, n, generator=gen, dtype=f64) / math.sqrt(n)).to(dev)
    c1 = torch.randn(p, generator=gen, dtype=f64).to(dev)
    B = (torch.randn(d, p, generator=gen, dtype=f64) / math.sqrt(p)).to(dev)
    c2 = torch.randn(d, generator=gen, dtype=f64).to(dev)
    x = torch.rand(1, n, generator=gen, dtype=f64).to(dev)
    var = torch.full_like(x, g["sigma"] ** 2)
    net = nn.Sequential(nn.Linear(n, p), nn.ReLU(), nn.Linear(p, d)).to(dev, f64)
    with torch.no_grad():
        net[0].weight.copy_(A)
        net[0].bias.copy_(c1)
        net[2].weight.copy_(B)
        net[2].bias.copy_(c2)
    exact_mean = affine_relu_affine_mean(x, var, A, c1, B, c2)
    exact_cov = affine_relu_affine_covariance(x, var, A, c1, B, c2)
    rows = []

    def add(est: str, samples, t: float, mem: int, mean, stderr=None, cov=None) -> None:
        row = {
            "network": f"affine-relu-affine {n}-{p}-{d}",
            "estimator": est,
            "samples": samples,
            "seconds": t,
            "peak_mib": mem / 2**20,
            "max_abs_err_mean": float((mean.to(dev) - exact_mean).abs().max()),
        }
        if cov is not None:
            row["max_abs_err_cov"] = float((cov.to(dev) - exact_cov).abs().max())
        if stderr is not None:
            se = float(stderr.max())
            row["max_stderr_mean"] = se
            need = samples * (se / g["target"]) ** 2
            row["samples_for_target"] = need
            row["seconds_for_target"] = t * need / samples
        rows.append(row)
        next(bar, None)

    t, mem, m = measure(lambda: affine_relu_affine_mean(x, var, A, c1, B, c2), dev, repeat=5)
    add("analytic mean (Theorem 1)", 0, t, mem, m)
    t, mem, c = measure(lambda: affine_relu_affine_covariance(x, var, A, c1, B, c2), dev, 3)
    add("analytic covariance", 0, t, mem, exact_mean, cov=c)
    t, mem, lin = measure(lambda: two_stage_linearization(net, x, g["sigma"]), dev, repeat=2)
    add("two-stage linearization (mean + cov)", 0, t, mem, lin.mean, cov=lin.cov)
    for N in g["mc_samples"]:
        t, mem, res = measure(
            lambda N=N: monte_carlo_affine_relu_affine(
                x, var, A, c1, B, c2, N, seed=cfg.seed, compute_cov=False
            ),
            dev,
        )
        add("Monte Carlo, Numba kernel", N, t, mem, res.mean, res.stderr)
        t, mem, res = measure(
            lambda N=N: monte_carlo_moments(net, x, var, N, seed=cfg.seed, batch_size=4096), dev
        )
        add("Monte Carlo, torch module", N, t, mem, res.mean, res.stderr)
    return rows


def _lenet_rows(cfg: SuiteConfig, g: dict, bar) -> list[dict]:
    dev = cfg.torch_device
    torch.manual_seed(cfg.seed)
    model = lenet_shaped(g["lenet_width"]).to(dev).eval()
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    sigma = g["sigma"]
    name = f"lenet-shaped width {g['lenet_width']:g}"
    rows = []

    def add(est: str, samples: int, t: float, mem: int, stderr=None) -> None:
        row = {
            "network": name,
            "estimator": est,
            "samples": samples,
            "seconds": t,
            "peak_mib": mem / 2**20,
        }
        if stderr is not None:
            se = float(stderr.max())
            need = samples * (se / g["target"]) ** 2
            row.update(
                max_stderr_mean=se, samples_for_target=need, seconds_for_target=t * need / samples
            )
        rows.append(row)
        next(bar, None)

    with torch.no_grad():
        t, mem, _ = measure(lambda: model(x), dev, repeat=5)
        add("forward pass (reference)", 0, t, mem)
        t, mem, _ = measure(lambda: expected_prediction(model, x, sigma), dev, repeat=5)
        add("surrogate Omega(mu3) (+ forward)", 0, t, mem)
    t, mem, _ = measure(lambda: two_stage_linearization(model, x, sigma, 0, compute_cov=False), dev)
    add("linearization, first ReLU, mean only", 0, t, mem)
    t, mem, _ = measure(lambda: two_stage_linearization(model, x, sigma, 2, compute_cov=False), dev)
    add("linearization, last ReLU, mean only", 0, t, mem)
    for N in g["lenet_mc_samples"]:
        t, mem, res = measure(
            lambda N=N: monte_carlo_moments(model, x, sigma**2, N, seed=cfg.seed, batch_size=1024),
            dev,
        )
        add("Monte Carlo, torch module", N, t, mem, res.stderr)
    return rows


def run(cfg: SuiteConfig, overrides: dict[str, Any] | None = None) -> SuiteReport:
    """Run the suite; ``overrides`` replaces entries of :func:`grid` (for tests)."""
    start = time.perf_counter()
    g = {**grid(cfg.quick), **(overrides or {})}
    report = SuiteReport(NAME, {f"grid_{k}": v for k, v in g.items()})
    steps = 3 + 2 * len(g["mc_samples"]) + 4 + len(g["lenet_mc_samples"])
    steps += len(g["frontier_sigmas"]) * (len(FRONTIER_METHODS) + len(g["frontier_mc_samples"]))
    bar = progress(range(steps), cfg, NAME)
    # Compile the Numba kernels outside the timings.
    monte_carlo_affine_relu_affine(
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1),
        torch.ones(1, 1),
        torch.zeros(1),
        torch.ones(1, 1),
        torch.zeros(1),
        10,
        seed=0,
        compute_cov=False,
    )
    report.rows = _shallow_rows(cfg, g, bar) + _lenet_rows(cfg, g, bar)
    frontier, verdicts = frontier_rows(cfg, g, bar)
    report.config["frontier_verdicts"] = verdicts
    shallow = [r for r in report.rows if r["network"].startswith("affine")]
    analytic = shallow[0]
    numba_rows = [r for r in shallow if r["estimator"] == "Monte Carlo, Numba kernel"]
    biggest = numba_rows[-1]
    ratio = biggest["seconds_for_target"] / analytic["seconds"]
    report.config["speed_ratio_at_target"] = ratio
    report.summary = [
        f"Theorem 1 takes {analytic['seconds'] * 1e3:.3f} ms; Numba Monte Carlo needs about "
        f"{biggest['samples_for_target']:.3g} samples ({biggest['seconds_for_target']:.3g} s, "
        f"extrapolated from {biggest['samples']:g} samples) for a standard error of "
        f"{g['target']:g} on every output: the analytic mean is {ratio:.3g} times faster at "
        "matched accuracy.",
        "",
        *markdown_table(
            report.rows,
            [
                "network",
                "estimator",
                "samples",
                "seconds",
                "peak_mib",
                "max_abs_err_mean",
                "max_stderr_mean",
            ],
        ),
        "",
        *_frontier_summary(frontier, verdicts),
    ]
    report.rows += frontier
    report.figure = _figure(report.rows, g)
    report.seconds = time.perf_counter() - start
    return report
