"""Part (3) of the ``cost`` suite: the accuracy-against-time frontier.

On a LeNet-shaped network with random weights and MNIST test images (float32): every
analytic method (the surrogate, the linearization around the last ReLU, each
``network_moments`` mode) a point, Monte Carlo a curve, errors against a long Monte
Carlo run; per ``sigma_x``, whether the default mode beats Monte Carlo at equal wall
time (:func:`mc_error_at`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from momentkit import network_moments
from momentkit.errors import MomentInputError
from momentkit.network import network_mode
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments
from momentkit.regularizer import expected_prediction
from validation.measuring import measure
from validation.networks import lenet_shaped, load_mnist_subset
from validation.reporting import SuiteConfig

__all__ = ["FRONTIER_METHODS", "frontier_rows", "mc_error_at"]


FRONTIER_METHODS = ("surrogate", "linearization_last", "nm_diagonal", "nm_factor", "nm_full")


def _errors(mean, var, ref, ref_var) -> tuple[float, float]:
    """Median over images of ``||m - m_ref|| / ||m_ref||`` and median over outputs and
    images of ``|v - v_ref| / v_ref`` (NaN without a variance)."""
    d = (mean.double() - ref.mean).flatten(1).norm(dim=1) / ref.mean.flatten(1).norm(dim=1)
    v = float("nan")
    if var is not None:
        v = float(((var.double() - ref_var).abs() / ref_var.clamp_min(1e-300)).median())
    return float(d.median()), v


def _measured(row: dict, seconds: float, mem: int, errors: tuple[float, float]) -> dict:
    """``row`` with the status, time, peak memory (MiB) and the two errors of a run."""
    m_err, v_err = errors
    out = {**row, "status": "ok", "seconds": seconds, "peak_mib": mem / 2**20}
    return {**out, "mean_err": m_err, "var_err": v_err}


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


def frontier_rows(cfg: SuiteConfig, g: dict, bar) -> tuple[list[dict], list[dict]]:
    """Accuracy against time on a LeNet-shaped network with random weights and MNIST
    test images (float32): every analytic method as a point, Monte Carlo as a curve,
    errors against a long Monte Carlo run. Returns ``(rows, verdicts)``; a verdict per
    ``sigma_x`` says whether the default mode beats Monte Carlo at equal wall time."""
    dev = cfg.torch_device
    torch.manual_seed(cfg.seed)
    model = lenet_shaped(g["frontier_width"]).to(dev).eval()
    data = load_mnist_subset(cfg.data_root, 0, g["frontier_points"], cfg.seed)
    x = data.test_x.to(dev)
    auto = network_mode(model, x)
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
            rows.append(_measured(row, t, mem, _errors(mean, var, ref, ref_var)))
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
            row = {**base, "estimator": "monte_carlo", "samples": n}
            rows.append(_measured(row, t, mem, _errors(res.mean, res.stderr**2 * n, ref, ref_var)))
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
