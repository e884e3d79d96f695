"""Suite ``cost`` on a tiny configuration, and the peak-memory probe."""

from __future__ import annotations

from pathlib import Path

import torch

from validation import suite_cost
from validation.reporting import SuiteConfig


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
    assert report.config["speed_ratio_at_target"] > 0


def test_measure_sees_a_large_allocation():
    size = 64 * 2**20
    seconds, peak, out = suite_cost.measure(
        lambda: torch.ones(size // 8, dtype=torch.float64).sum(), torch.device("cpu")
    )
    assert float(out) == size // 8 and seconds > 0
    assert peak > size // 2  # the sampler can miss part of a short-lived buffer, not most of it
