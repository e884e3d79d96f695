"""Suite ``cost`` on a tiny configuration, and the peak-memory probe."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from validation import suite_cost
from validation.reporting import SuiteConfig


@pytest.mark.slow
def test_tiny_run_reports_every_estimator(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, progress=False)
    tiny = {
        "n": 20,
        "p": 16,
        "d": 3,
        "mc_samples": [1000, 4000],
        "lenet_width": 0.125,
        "lenet_mc_samples": [200],
        "frontier_width": 0.125,
        "frontier_sigmas": [0.1, 1.0],
        "frontier_mc_samples": [100, 400],
        "frontier_reference_samples": 4000,
    }
    report = suite_cost.run(cfg, tiny)
    names = [r["estimator"] for r in report.rows]
    frontier = [r for r in report.rows if "reference_samples" in r]
    assert names.count("Monte Carlo, Numba kernel") == 2
    assert len(report.rows) - len(frontier) == 3 + 4 + 5
    # the frontier: every analytic method and each Monte Carlo size, per sigma
    for sigma in (0.1, 1.0):
        got = [r["estimator"] for r in frontier if r["sigma"] == sigma]
        assert got == [*suite_cost.FRONTIER_METHODS, "monte_carlo", "monte_carlo"]
    full = [r for r in frontier if r["estimator"] == "nm_full"]
    assert all("FULL_MAX_UNITS" in r["status"] for r in full)  # 3136 units at width 1/8
    ok = [r for r in frontier if r["status"] == "ok"]
    assert all(r["seconds"] > 0 and r["mean_err"] >= 0 for r in ok)
    # Monte Carlo with N samples against the reference: an error of order
    # sqrt(1/N + 1/N_ref) relative standard errors, never zero, never wild
    for r in ok:
        if r["estimator"] == "monte_carlo":
            se = r["reference_mean_rel_stderr"] * math.sqrt(r["reference_samples"] / r["samples"])
            assert 0 < r["mean_err"] < 10 * se
    verdicts = report.config["frontier_verdicts"]
    assert [v["sigma"] for v in verdicts] == [0.1, 1.0]
    assert all(v["mode"] == "factor" for v in verdicts)
    text = "\n".join(report.summary)
    assert "given the same wall time" in text and "nm_full: refused" in text
    analytic = report.rows[0]
    assert analytic["max_abs_err_mean"] == 0.0  # it is the reference itself
    lin = next(r for r in report.rows if r["estimator"].startswith("two-stage"))
    assert lin["max_abs_err_mean"] < 1e-12 and lin["max_abs_err_cov"] < 1e-12
    # the ratio is the largest Numba run's time for the target accuracy over the analytic
    # mean's time; at 1e-3 that is hundreds (ms against s), so 10 leaves room for load
    numba = [r for r in report.rows if r["estimator"] == "Monte Carlo, Numba kernel"]
    ratio = numba[-1]["seconds_for_target"] / analytic["seconds"]
    assert report.config["speed_ratio_at_target"] == ratio and ratio > 10


def test_measure_sees_a_large_allocation():
    size = 64 * 2**20

    def work():
        time.sleep(0.05)
        return torch.ones(size // 8, dtype=torch.float64).sum()

    t0 = time.perf_counter()
    seconds, peak, out = suite_cost.measure(work, torch.device("cpu"))
    assert float(out) == size // 8 and 0.05 <= seconds <= time.perf_counter() - t0
    assert peak > size // 2  # the sampler can miss part of a short-lived buffer, not most of it


def test_mc_error_at_interpolates_in_log_log_and_extrapolates_as_inverse_sqrt():
    curve = [(1.0, 1.0), (100.0, 0.1), (10.0, 0.5)]  # any order
    assert suite_cost.mc_error_at(10.0, curve) == (0.5, False)
    err, extrap = suite_cost.mc_error_at(math.sqrt(10.0), curve)  # halfway in log time
    assert err == pytest.approx(math.sqrt(0.5)) and not extrap
    err, extrap = suite_cost.mc_error_at(0.25, curve)  # 4x less time: 2x the error
    assert err == pytest.approx(2.0) and extrap
    err, extrap = suite_cost.mc_error_at(400.0, curve)
    assert err == pytest.approx(0.05) and extrap
    assert math.isnan(suite_cost.mc_error_at(1.0, [])[0])
