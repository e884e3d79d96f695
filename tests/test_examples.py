"""The analysis scripts in ``examples/`` run, and the numbers they print mean what they say.

Monte Carlo tolerances: where a closed form is exact, each difference from Monte Carlo
divided by its standard error is close to a standard normal (the standard error is
itself estimated from >= 2,000 samples), so with at most ``m`` such ratios,
``P(max|z| > 4.5) <= m * 6.8e-6``: below 1e-3 for the ``m <= 60`` compared here. The
runs are seeded, so a pass is reproducible; a wrong formula gives ratios in the tens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.rundir import write_json_atomic, write_npz_atomic
from momentkit.robustness import area_under_curve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMMITTED_RUNS = ROOT / "docs" / "results" / "reduced-cpu" / "run_results"
Z_EXACT = 4.5


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


surrogate_example = _load("surrogate_vs_montecarlo")
covariance_example = _load("correlated_noise_covariance")
compare_example = _load("compare_robustness_runs")


def test_every_example_has_a_main_and_says_what_it_teaches():
    for module in (surrogate_example, covariance_example, compare_example):
        assert callable(module.main)
        assert "What you learn" in module.__doc__


# -- surrogate_vs_montecarlo -------------------------------------------------------

TINY = ["--samples", "2000", "--points", "2", "--sigmas", "0.1", "0.5", "--seed", "1"]


@pytest.mark.slow
def test_surrogate_and_linearization_are_exact_for_one_relu_layer(capsys):
    # 2 points x 10 logits x 2 sigmas = 40 ratios per method
    rows = surrogate_example.main([*TINY, "--hidden-layers", "0", "--device", "cpu"])
    assert [r["sigma"] for r in rows] == [0.1, 0.5]
    for r in rows:
        assert r["surrogate_maxz"] < Z_EXACT, r
        assert r["linearization_maxz"] < Z_EXACT, r
        assert r["mc_se"] > 0
    # Monte Carlo standard errors grow with the noise (roughly in proportion)
    assert rows[1]["mc_se"] > 2 * rows[0]["mc_se"]
    assert "max|z|" in capsys.readouterr().out


def test_surrogate_error_behind_a_second_relu_is_resolved_and_grows_with_sigma():
    rows = surrogate_example.main([*TINY, "--hidden-layers", "1"])
    small, large = rows
    # a real approximation error, many standard errors away from Monte Carlo ...
    assert large["surrogate_maxz"] > 3 * Z_EXACT, large
    assert large["linearization_maxz"] > 3 * Z_EXACT, large
    # ... that grows with the noise faster than the Monte Carlo error does
    assert large["surrogate_err"] > 5 * small["surrogate_err"], rows


# -- correlated_noise_covariance ---------------------------------------------------


def test_exact_covariance_agrees_and_the_shortcuts_do_not(capsys):
    # 2 points x 9 covariance entries = 18 ratios for the exact formula
    rows = {r["method"]: r for r in covariance_example.main(["--samples", "50000", "--seed", "3"])}
    assert rows["exact"]["max_z"] < Z_EXACT, rows
    assert rows["zero-mean"]["max_z"] > 3 * Z_EXACT, rows
    assert rows["independent"]["max_z"] > 3 * Z_EXACT, rows
    assert rows["exact"]["rel"] < 0.05 < rows["zero-mean"]["rel"]
    assert "zero-mean" in capsys.readouterr().out


def test_without_correlation_the_diagonal_formula_is_the_exact_one():
    rows = {r["method"]: r for r in covariance_example.main(["--samples", "2000", "--rho", "0"])}
    assert rows["independent"]["max_err"] == pytest.approx(rows["exact"]["max_err"], abs=1e-12)


def test_correlated_cov_is_the_stated_matrix():
    cov = covariance_example.correlated_cov(4, 0.5, 0.8)
    assert float(cov[0, 0]) == pytest.approx(0.25)
    assert float(cov[0, 3]) == pytest.approx(0.25 * 0.8**3)
    assert float(cov[3, 1]) == pytest.approx(0.25 * 0.8**2)


# -- compare_robustness_runs -------------------------------------------------------


def _write_run(folder: Path, robust: np.ndarray, correct: np.ndarray, sigmas, **config):
    auc = float(np.mean(np.trapezoid(robust.astype(float), sigmas, axis=0)) / sigmas[-1])
    write_json_atomic(
        folder / "results.json",
        {
            "config": {"dataset": "mnist", "test_subset": robust.shape[1], **config},
            "run_id": folder.name,
            "test_accuracy": float(correct.mean()),
            "robustness": {"sigmas": list(sigmas), "auc": auc},
        },
    )
    write_npz_atomic(folder / "per_image.npz", robust=robust, correct=correct)


def test_known_difference_on_hand_made_runs(tmp_path):
    sigmas = [0.0, 0.25, 0.5]
    rng = np.random.default_rng(0)
    robust_a = rng.random((3, 200)) < 0.7
    robust_a[0] = True
    robust_b = robust_a.copy()
    robust_b[:, :20] = True  # B robust on 20 more images wherever A was not
    correct = np.ones(200, dtype=bool)
    _write_run(tmp_path / "a", robust_a, correct, sigmas, method="baseline")
    _write_run(tmp_path / "b", robust_b, correct, sigmas, method="moment")
    out = compare_example.main([str(tmp_path / "a"), str(tmp_path / "b"), "--resamples", "999"])
    for k in range(3):
        a, b, diff, low, high = out["curve"][k]
        expected = float((~robust_a[k, :20]).sum()) / 200
        assert diff == pytest.approx(expected, abs=1e-12)
        assert low <= diff <= high
    assert out["curve"][0][2:] == (0.0, 0.0, 0.0)  # every image robust at sigma 0 in both
    assert out["accuracy"][2:] == (0.0, 0.0, 0.0)  # same predictions: no difference at all
    # the per-image areas average to the auc each run recorded
    assert out["auc"][0] == pytest.approx(out["recorded_auc"][0], abs=1e-12)
    assert out["auc"][1] == pytest.approx(out["recorded_auc"][1], abs=1e-12)


def test_runs_on_different_images_are_refused(tmp_path, capsys):
    robust = np.ones((2, 10), dtype=bool)
    _write_run(tmp_path / "a", robust, robust[0], [0.0, 0.5])
    _write_run(tmp_path / "b", np.ones((2, 12), dtype=bool), np.ones(12, bool), [0.0, 0.5])
    _write_run(tmp_path / "c", robust, robust[0], [0.0, 0.4])
    with pytest.raises(SystemExit) as exc:
        compare_example.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert exc.value.code == 2
    assert "different test images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_example.main([str(tmp_path / "a"), str(tmp_path / "c")])
    assert "different noise levels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_example.main([str(tmp_path / "a"), str(tmp_path / "missing")])
    assert "not a complete run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not COMMITTED_RUNS.is_dir(), reason=f"no {COMMITTED_RUNS}")
def test_committed_baseline_and_regularized_runs():
    baseline, regularized = COMMITTED_RUNS / "41a7d9f67b9b", COMMITTED_RUNS / "70650c500e47"
    if not (baseline.is_dir() and regularized.is_dir()):
        pytest.skip("the committed reduced-grid runs moved")
    out = compare_example.compare_runs(baseline, regularized, seed=0, n_resamples=199)
    a, b = out["auc"][:2]
    # the areas recomputed from per_image.npz are the runs' recorded auc (float64 rounding)
    assert a == pytest.approx(out["recorded_auc"][0], abs=1e-12)
    assert b == pytest.approx(out["recorded_auc"][1], abs=1e-12)
    # with 2,000 images the mean paired difference is close to normal (CLT): the
    # percentile interval matches mean +- 1.96 sd / sqrt(N) to a few percent of its
    # half-width (the resampling error of a 2.5% quantile of 9,999 resamples is ~1.5%)
    sigmas = torch.tensor(out["sigmas"], dtype=torch.float64)
    area_a, area_b = (
        area_under_curve(torch.as_tensor(compare_example.load_run(r)[1]["robust"]), sigmas)
        .numpy()
        for r in (baseline, regularized)
    )
    diff, low, high = compare_example.paired_interval(area_a, area_b, seed=0)
    assert diff == pytest.approx(b - a, abs=1e-12)
    d = area_b - area_a
    half = 1.959964 * d.std(ddof=1) / np.sqrt(d.size)
    assert low == pytest.approx(diff - half, abs=0.1 * half)
    assert high == pytest.approx(diff + half, abs=0.1 * half)
    # the regularized run is more robust, and 2,000 images resolve it
    assert low > 0
