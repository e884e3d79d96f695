"""Suite ``cost`` on a tiny configuration, and the peak-memory probe."""

from __future__ import annotations

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
    }
    report = suite_cost.run(cfg, tiny)
    names = [r["estimator"] for r in report.rows]
    assert names.count("Monte Carlo, Numba kernel") == 2 and len(report.rows) == 3 + 4 + 5
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
