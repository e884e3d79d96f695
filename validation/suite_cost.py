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

Time is wall clock (best of a few runs for anything under a second). Peak memory is
the largest resident-set growth during the call, sampled every millisecond by a
background thread, after returning freed heap memory to the system (on CUDA:
``torch.cuda.max_memory_allocated``); values below about 1 MiB are noise. The
``samples_for_target`` and ``seconds_for_target`` columns extrapolate Monte Carlo to
a standard error of ``target`` (``stderr ~ 1/sqrt(N)``).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from momentkit import network_moments
from momentkit.errors import MomentInputError
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_affine_relu_affine, monte_carlo_moments
from momentkit.regularizer import expected_prediction
from momentkit.shallow import affine_relu_affine_covariance, affine_relu_affine_mean
from validation.cost_report import _figure, _frontier_summary
from validation.networks import lenet_shaped, load_mnist_subset
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


def _release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc), so that resident-set growth
    measures new allocations rather than reuse of memory freed earlier. Also fixes
    glibc's mmap threshold at 128 KiB (it otherwise grows up to 32 MiB after large
    frees, and such buffers then stay resident). A no-op on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, int, Any]:
    """``(seconds, peak bytes, result)`` of ``fn()``; seconds is the best of ``repeat``."""
    gc.collect()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = None
    if device.type != "cuda":
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    best = math.inf
    result = None
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) - base
    else:
        used = max(peak[0], _rss()) - base
    return best, int(used), result


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


FRONTIER_METHODS = ("surrogate", "linearization_last", "nm_diagonal", "nm_factor", "nm_full")


def _errors(mean, var, ref, ref_var) -> tuple[float, float]:
    """Median over images of ``||m - m_ref|| / ||m_ref||`` and median over outputs and
    images of ``|v - v_ref| / v_ref`` (NaN without a variance)."""
    d = (mean.double() - ref.mean).flatten(1).norm(dim=1) / ref.mean.flatten(1).norm(dim=1)
    v = float("nan")
    if var is not None:
        v = float(((var.double() - ref_var).abs() / ref_var.clamp_min(1e-300)).median())
    return float(d.median()), v


def mc_error_at(seconds: float, curve: list[tuple[float, float]]) -> tuple[float, bool]:
    """Monte Carlo's error after ``seconds`` of wall time, from its measured
    ``(seconds, error)`` points: linear interpolation in log-log between the points
    that bracket ``seconds``; outside them, the nearest point scaled by
    ``error ~ seconds**-1/2`` (``stderr ~ 1/sqrt(N)``, ``N`` proportional to time).
    Returns ``(error, extrapolated)``."""
    pts = sorted((t, e) for t, e in curve if t > 0 and e > 0 and math.isfinite(e))
    if not pts:
        return float("nan"), True
    if seconds <= pts[0][0]:
        t0, e0 = pts[0]
        return e0 * math.sqrt(t0 / seconds), seconds < pts[0][0]
    if seconds >= pts[-1][0]:
        t0, e0 = pts[-1]
        return e0 * math.sqrt(t0 / seconds), seconds > pts[-1][0]
    for (t0, e0), (t1, e1) in zip(pts, pts[1:], strict=False):
        if t0 <= seconds <= t1:
            w = math.log(seconds / t0) / math.log(t1 / t0) if t1 > t0 else 0.0
            return math.exp(math.log(e0) + w * (math.log(e1) - math.log(e0))), False
    raise AssertionError("unreachable")


def _frontier_rows(cfg: SuiteConfig, g: dict, bar) -> tuple[list[dict], list[dict]]:
    """Accuracy against time on a LeNet-shaped network with random weights and MNIST
    test images (float32): every analytic method as a point, Monte Carlo as a curve,
    errors against a long Monte Carlo run. Returns ``(rows, verdicts)``; a verdict per
    ``sigma_x`` says whether the default mode beats Monte Carlo at equal wall time."""
    from validation.suite_deep import default_mode

    dev = cfg.torch_device
    torch.manual_seed(cfg.seed)
    model = lenet_shaped(g["frontier_width"]).to(dev).eval()
    data = load_mnist_subset(cfg.data_root, 0, g["frontier_points"], cfg.seed)
    x = data.test_x.to(dev)
    auto = default_mode(model, x)
    name = f"lenet-shaped width {g['frontier_width']:g} (random weights, float32)"
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    rows: list[dict] = []
    verdicts: list[dict] = []

    def nm(mode: str, sigma: float):
        with torch.no_grad():
            r = network_moments(model, x, sigma, covariance=mode)
        return r.mean, r.var

    def surrogate(sigma: float):
        with torch.no_grad():
            return expected_prediction(model, x, sigma).surrogate

    for j, sigma in enumerate(g["frontier_sigmas"]):
        n_ref = g["frontier_reference_samples"]
        t, mem, ref = measure(
            lambda sigma=sigma, j=j, n_ref=n_ref: monte_carlo_moments(
                model, x, sigma**2, n_ref, seed=10_007 + 101 * cfg.seed + j, batch_size=2048
            ),
            dev,
        )
        ref_var = ref.stderr**2 * n_ref
        floor_mean = float(
            (ref.stderr.flatten(1).norm(dim=1) / ref.mean.flatten(1).norm(dim=1)).median()
        )
        floor_var = math.sqrt(2 / (n_ref - 1))
        base = {
            "network": name,
            "sigma": sigma,
            "reference_samples": n_ref,
            "reference_seconds": t,
            "reference_mean_rel_stderr": floor_mean,
            "reference_var_rel_stderr": floor_var,
            "default_mode": auto,
            "points": len(x),
            "data": data.source,
        }
        calls: dict[str, Any] = {
            "surrogate": lambda sigma=sigma: (surrogate(sigma), None),
            "linearization_last": lambda sigma=sigma: (
                two_stage_linearization(model, x, sigma, n_relu - 1, compute_cov=False).mean,
                None,
            ),
        }
        for mode in ("diagonal", "factor", "full"):
            calls[f"nm_{mode}"] = lambda sigma=sigma, mode=mode: nm(mode, sigma)
        for est, fn in calls.items():
            row = {**base, "estimator": est, "samples": 0}
            try:
                t, mem, (mean, var) = measure(fn, dev)
            except MomentInputError as exc:
                rows.append({**row, "status": f"refused: {exc}"})
                next(bar, None)
                continue
            m_err, v_err = _errors(mean, var, ref, ref_var)
            rows.append(
                {
                    **row,
                    "status": "ok",
                    "seconds": t,
                    "peak_mib": mem / 2**20,
                    "mean_err": m_err,
                    "var_err": v_err,
                }
            )
            next(bar, None)
        for i, n in enumerate(g["frontier_mc_samples"]):
            t, mem, res = measure(
                lambda sigma=sigma, n=n, i=i, j=j: monte_carlo_moments(
                    model,
                    x,
                    sigma**2,
                    n,
                    seed=20_011 + 101 * cfg.seed + 13 * j + i,
                    batch_size=2048,
                ),
                dev,
            )
            m_err, v_err = _errors(res.mean, res.stderr**2 * n, ref, ref_var)
            rows.append(
                {
                    **base,
                    "estimator": "monte_carlo",
                    "samples": n,
                    "status": "ok",
                    "seconds": t,
                    "peak_mib": mem / 2**20,
                    "mean_err": m_err,
                    "var_err": v_err,
                }
            )
            next(bar, None)
        point = next(r for r in rows if r["sigma"] == sigma and r["estimator"] == f"nm_{auto}")
        curve = [r for r in rows if r["sigma"] == sigma and r["estimator"] == "monte_carlo"]
        verdict: dict[str, Any] = {"sigma": sigma, "mode": auto, "seconds": point["seconds"]}
        for key, floor in (("mean_err", floor_mean), ("var_err", floor_var)):
            mc_err, extrapolated = mc_error_at(
                point["seconds"], [(r["seconds"], r[key]) for r in curve]
            )
            err = point[key]
            verdict[f"{key}_auto"] = err
            verdict[f"{key}_mc_same_time"] = mc_err
            verdict[f"{key}_extrapolated"] = extrapolated
            # Below three reference standard errors neither error is resolved.
            resolved = max(err, mc_err) > 3 * floor
            verdict[f"{key}_auto_better"] = (err < mc_err) if resolved else None
        verdicts.append(verdict)
    return rows, verdicts


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
    frontier, verdicts = _frontier_rows(cfg, g, bar)
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
