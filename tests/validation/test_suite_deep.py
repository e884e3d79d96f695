"""Suite ``deep`` on tiny networks and synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest

from validation import suite_deep
from validation.reporting import SuiteConfig


@pytest.mark.slow
def test_tiny_run_on_synthetic_data(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, seed=1, data_root=None, progress=False)
    tiny = {
        "sigmas": [1e-2, 1.0],
        "mlp_depths": [1, 2],
        "mlp_width": 16,
        "lenet_width": 0.125,
        "points": 2,
        "mc_samples_mlp": 2000,
        "mc_samples_lenet": 200,
        "n_train": 200,
        "epochs": 1,
    }
    report = suite_deep.run(cfg, tiny)
    assert "synthetic" in report.config["data"] and "synthetic" in report.summary[0]
    # surrogate + plug-in for mlp-1; + linearization_last for mlp-2 and lenet
    assert len(report.rows) == 2 * 2 * (2 + 3 + 3)
    # relu_index=0 identity, evaluated in float64: rounding only (see
    # tests/references/test_linearization.py for the derived bound; 1e-12 is far above it)
    assert report.config["identity_max_rel_diff"] < 1e-12
    # one hidden layer: the surrogate is Theorem 1, exact; Monte Carlo must agree
    # within 5 standard errors (tests/references/test_montecarlo.py explains 5)
    exact = [r for r in report.rows if r["network"] == "mlp-1" and r["estimator"] == "surrogate"]
    assert exact and all(r["max_abs_z"] < 5 for r in exact)


@pytest.mark.slow
def test_same_seed_same_rows(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, seed=2, data_root=None, progress=False)
    tiny = {
        "sigmas": [0.1],
        "mlp_depths": [2],
        "mlp_width": 8,
        "lenet_width": 0.125,
        "points": 1,
        "mc_samples_mlp": 200,
        "mc_samples_lenet": 50,
        "n_train": 100,
        "epochs": 1,
    }
    first = repr(suite_deep.run(cfg, tiny).rows)  # repr: NaN accuracies compare equal
    import torch

    torch.manual_seed(12345)  # the suite must not depend on the global generator's state
    assert repr(suite_deep.run(cfg, tiny).rows) == first
