"""Suite ``covariance`` on a tiny grid: the exact formula passes, the zero-mean one
agrees only at zero means."""

from __future__ import annotations

from pathlib import Path

from validation import suite_covariance
from validation.reporting import SuiteConfig


def test_exact_passes_and_zero_mean_fails_away_from_zero(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, progress=False)
    report = suite_covariance.run(
        cfg, {"means": [0.0, 1.5], "rhos": [-0.5, 0.5, 0.99], "n_samples": 40_000}
    )
    bound = report.config["bonferroni_bound"]
    assert len(report.rows) == 12
    assert all(abs(r["z_exact"]) < bound and abs(r["z_var1_exact"]) < bound for r in report.rows)
    # at zero means both formulas are the same function of rho (a few eps apart)
    for r in report.rows:
        if r["mu1"] == 0.0 and r["mu2"] == 0.0:
            assert abs(r["cov_zero_mean"] - r["cov_exact"]) < 1e-14
    # at mu = (1.5, 1.5) the zero-mean formula is off by far more than the Monte Carlo error
    far = [r for r in report.rows if r["mu1"] == 1.5 and r["mu2"] == 1.5]
    assert all(abs(r["z_zero_mean"]) > 10 * bound for r in far)
