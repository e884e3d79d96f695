"""Suite ``deep`` on tiny networks and synthetic data, and its per-cell comparison
``compare_methods`` on networks whose moments are known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from validation import suite_deep
from validation.networks import set_batchnorm_statistics, small_resnet
from validation.reporting import SuiteConfig

TINY = {
    "sigmas": [0.1],
    "mlp_depths": [1, 2],
    "mlp_width": 16,
    "lenet_width": 0.125,
    "resnet_width": 3,
    "alexnet": False,
    "points": 1,
    "mc_samples_mlp": 2000,
    "mc_samples_lenet": 200,
    "mc_samples_resnet": 400,
    "n_train": 200,
    "epochs": 1,
    "skip_factor": ["lenet-avgpool"],
}


def _linear_net(hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.Linear(hidden, 3)).double()


def test_linear_network_every_mode_is_exact_to_monte_carlo_resolution():
    # Without a nonlinearity every mode's mean and variance are exact (J Sigma J^T), so
    # the errors are Monte Carlo's own: the mean within 5 standard errors (Bonferroni
    # over 2 x 3 values, see tests/references/test_montecarlo.py), and the median
    # relative variance error of 6 sample variances, each with relative standard error
    # sqrt(2/(N-1)) (Gaussian output), below 3 of them.
    model = _linear_net(8)
    x = torch.rand(2, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = suite_deep.compare_methods(model, x, 0.5, 4000, seed=3)
    by = {r["estimator"]: r for r in rows}
    assert set(by) == {"surrogate", "nm_diagonal", "nm_factor", "nm_full", "plug_in", "monte_carlo"}
    assert by["surrogate"]["status"].startswith("refused: ") and "ReLU" in by["surrogate"]["status"]
    floor = by["monte_carlo"]["mc_var_rel_stderr"]
    assert floor == pytest.approx(math.sqrt(2 / 3999))
    for mode in ("nm_factor", "nm_full"):
        r = by[mode]
        assert r["status"] == "ok" and r["max_abs_z"] < 5 and not r["resolved"]
        assert r["var_err_median"] < 3 * floor
    # the diagonal mode drops the correlations of the hidden units: it is exact for the
    # mean but its variance is off by far more than Monte Carlo's error
    assert by["nm_diagonal"]["max_abs_z"] < 5
    assert by["nm_diagonal"]["var_err_median"] > 5 * floor
    # the plug-in mean of a linear network is its mean: exact too
    assert by["plug_in"]["max_abs_z"] < 5 and math.isnan(by["plug_in"]["var_err_median"])


def test_refused_and_skipped_modes_say_why():
    model = _linear_net(2100)  # more units than the full mode keeps
    x = torch.rand(1, 1, 3, 4, dtype=torch.float64)
    rows = suite_deep.compare_methods(model, x, 0.1, 50, seed=0, skip={"factor": "not today"})
    by = {r["estimator"]: r for r in rows}
    assert "FULL_MAX_UNITS" in by["nm_full"]["status"]
    assert by["nm_full"]["status"].startswith("refused: network_moments")
    assert by["nm_factor"]["status"] == "not today" and "seconds" not in by["nm_factor"]
    assert by["nm_diagonal"]["status"] == "ok"


@pytest.mark.slow
def test_small_resnet_is_supported_and_set_to_eval_statistics():
    torch.manual_seed(0)
    model = small_resnet(2).double()
    # fully convolutional up to the global average pool: 12x12 inputs keep the full
    # mode's covariances small (2 x 144 units at most)
    x = torch.rand(64, 1, 12, 12, dtype=torch.float64)
    set_batchnorm_statistics(model, x, batch=32)
    assert not model.training
    bn = model[3].bn1
    # cumulative average of the two batches' statistics: the batch mean of the first
    # block's convolution over all 64 images
    with torch.no_grad():
        pre = model[3].conv1(model[2](model[1](model[0](x))))
    assert torch.allclose(bn.running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-12)
    assert suite_deep.default_mode(model, x[:1]) == "factor"  # 288 units > 256
    rows = suite_deep.compare_methods(model, x[:1], 0.1, 400, seed=0)
    by = {r["estimator"]: r for r in rows}
    assert by["linearization_last"]["status"].startswith("refused: two_stage_linearization")
    assert by["surrogate"]["status"] == "ok"  # the stem has no BatchNorm: it splits
    for mode in suite_deep.MODES:
        r = by[f"nm_{mode}"]
        assert r["status"] == "ok" and math.isfinite(r["var_err_median"]), (mode, r)


@pytest.mark.slow
def test_tiny_run_on_synthetic_data(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, seed=1, data_root=None, progress=False)
    report = suite_deep.run(cfg, TINY)
    assert "synthetic" in report.config["data"] and "synthetic" in report.summary[0]
    nets = ["mlp-1", "mlp-2", "lenet", "lenet-avgpool", "resnet"]
    methods = {
        net: {"surrogate", "nm_diagonal", "nm_factor", "nm_full", "plug_in", "monte_carlo"}
        | ({"linearization_last"} if net != "mlp-1" else set())
        for net in nets
    }
    for weights in ("random", "trained"):
        for sigma in TINY["sigmas"]:
            for net in nets:
                got = {
                    r["estimator"]
                    for r in report.rows
                    if (r["network"], r["weights"], r["sigma"]) == (net, weights, sigma)
                }
                assert got == methods[net]
    # one row per (weights, sigma, network, method): the loops above saw every one
    assert len(report.rows) == 2 * len(TINY["sigmas"]) * sum(len(m) for m in methods.values())
    # every row that is not "ok" says why, and the summary lists it
    for r in report.rows:
        assert r["status"] == "ok" or r["status"].startswith(("refused: ", "skipped for time"))
    text = "\n".join(report.summary)
    assert "lenet-avgpool, nm_factor: skipped for time" in text
    assert "resnet, linearization_last: refused: " in text
    # relu_index=0 identity, evaluated in float64: rounding only (see
    # tests/references/test_linearization.py for the derived bound; 1e-12 is far above it)
    assert report.config["identity_max_rel_diff"] < 1e-12
    # one hidden layer: the surrogate and every mode's mean are Theorem 1, exact; Monte
    # Carlo must agree within 5 standard errors (tests/references/test_montecarlo.py)
    exact = [
        r
        for r in report.rows
        if r["network"] == "mlp-1"
        and r["estimator"] in ("surrogate", "nm_diagonal", "nm_factor", "nm_full")
    ]
    assert len(exact) == 8 and all(r["max_abs_z"] < 5 for r in exact)
    goal = report.config["resnet_goal"]
    assert set(goal) == {"random", "trained"}
    assert all(v["met"] is not None and v["mode"] == "factor" for v in goal.values())
    assert "Small ResNet goal" in text


@pytest.mark.slow
def test_same_seed_same_rows(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, seed=2, data_root=None, progress=False)
    tiny = {
        **TINY,
        "sigmas": [0.1],
        "mlp_depths": [2],
        "mlp_width": 8,
        "points": 1,
        "mc_samples_mlp": 200,
        "mc_samples_lenet": 50,
        "mc_samples_resnet": 50,
        "n_train": 100,
    }
    strip = ("seconds", "mc_seconds")

    def rows():
        return repr(  # repr: NaN accuracies compare equal
            [{k: v for k, v in r.items() if k not in strip} for r in suite_deep.run(cfg, tiny).rows]
        )

    first = rows()
    torch.manual_seed(12345)  # the suite must not depend on the global generator's state
    assert rows() == first
