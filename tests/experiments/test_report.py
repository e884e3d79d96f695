"""Tests of experiments.report: robustness scores, paired bootstrap, fair comparison, tables,
figures and the report command (on synthetic runs built from known per-image arrays, and on
a real tiny grid)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import executors
from experiments.__main__ import main as report_main
from experiments.config import RunConfig
from experiments.grids import expand_spec, write_manifest
from experiments.report import (
    collect_results,
    fair_comparison,
    matched_pairs,
    paired_bootstrap,
    per_image_robustness,
    read_matched,
    results_table,
    trapezoid_weights,
    write_report,
)

EPS = np.finfo(np.float64).eps
SIGMAS = np.linspace(0.0, 0.5, 5)
N = 400  # test images of the synthetic runs


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Independent reference: the trapezoid rule written out."""
    return float(sum((x[k + 1] - x[k]) * (y[k] + y[k + 1]) / 2 for k in range(len(x) - 1)))


def write_run(root: Path, config: RunConfig, n_correct: int, survivors: list[int]) -> Path:
    """A finished run on N images: images 0..n_correct-1 are classified correctly, and at
    test sigma k the images 0..survivors[k]-1 keep their prediction."""
    rdir = executors.run_dir(root, config)
    rdir.mkdir(parents=True)
    correct = np.arange(N) < n_correct
    robust = np.arange(N)[None, :] < np.asarray(survivors)[:, None]
    curve = robust.mean(axis=1)
    np.savez(rdir / "per_image.npz", correct=correct, robust=robust)
    results = {
        "config": config.to_dict(),
        "run_id": config.run_id(),
        "test_accuracy": n_correct / N,
        "robustness": {
            "sigmas": SIGMAS.tolist(),
            "curve": curve.tolist(),
            "auc": _trapezoid(curve, SIGMAS) / 0.5,
            "mean": float(curve.mean()),
            "ci": [0.0, 1.0],
        },
        "epochs_run": config.epochs,
        "best_epoch": config.epochs,
        "stopped_early": False,
        "wall_time_s": 10.0 * config.folds,
        "train_time_s": 8.0 * config.folds,
        "gradient_steps": 100 * config.folds * config.epochs,
        "device": "cpu",
        "version": "test",
    }
    (rdir / "results.json").write_text(json.dumps(results))
    return rdir


def _cfg(method: str, dataset: str = "mnist", **kw: object) -> RunConfig:
    return RunConfig(dataset=dataset, model="lenet", method=method, epochs=3, **kw)


# trapezoid weights on 5 evenly spaced sigmas: [1/8, 1/4, 1/4, 1/4, 1/8]
def _r_by_hand(survivors: list[int]) -> float:
    return (survivors[0] / 8 + sum(survivors[1:4]) / 4 + survivors[4] / 8) / N


RUNS = {
    # name: (method, kwargs, n_correct, survivors per sigma)
    "baseline": ("baseline", {}, 360, [400, 380, 340, 300, 260]),
    "aug2": ("augment", {"folds": 2, "sigma": 0.25}, 360, [400, 390, 370, 350, 330]),
    "aug6": ("augment", {"folds": 6, "sigma": 0.5}, 352, [400] * 5),
    "mom1": ("moment", {"alpha": 1.0, "sigma": 0.5}, 361, [400, 398, 396, 394, 392]),
    "mom5": ("moment", {"alpha": 5.0, "sigma": 2.0}, 359, [400] * 5),
}


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, dict[str, RunConfig]]:
    configs = {}
    for name, (method, kw, n_correct, surv) in RUNS.items():
        configs[name] = _cfg(method, **kw)
        write_run(tmp_path, configs[name], n_correct, surv)
    return tmp_path, configs


# --------------------------------------------------------------------------- statistics


def test_trapezoid_weights_integrate_like_the_trapezoid_rule() -> None:
    rng = np.random.default_rng(0)
    sigmas = np.sort(rng.random(17)) * 0.5
    curve = rng.random(17)
    w = trapezoid_weights(sigmas)
    expected = _trapezoid(curve, sigmas) / (sigmas[-1] - sigmas[0])
    assert abs(w @ curve - expected) <= 8 * EPS
    assert abs(w.sum() - 1.0) <= 8 * EPS
    np.testing.assert_allclose(trapezoid_weights(SIGMAS), [1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8])
    with pytest.raises(ValueError, match="sigmas"):
        trapezoid_weights(np.zeros(3))


def test_per_image_scores_average_to_the_robustness() -> None:
    rng = np.random.default_rng(1)
    robust = rng.random((5, 300)) < 0.8
    r = per_image_robustness(robust, SIGMAS)
    assert r.shape == (300,)
    assert abs(r.mean() - _trapezoid(robust.mean(1), SIGMAS) / 0.5) <= 8 * EPS


def test_paired_bootstrap_agrees_with_normal_theory() -> None:
    """For means of n=4000 paired per-image values the bootstrap distribution is close to
    normal, so its 95% percentile interval must be est +- 1.96 sd/sqrt(n) (difference) and
    the delta-method interval (ratio). Tolerance: 0.2 standard errors, which covers the
    Monte Carlo error of a 2.5% quantile from 4000 resamples (about 0.04 standard errors,
    taken 4 times) plus the O(1/sqrt(n)) skewness of the resampled means."""
    rng = np.random.default_rng(2)
    n = 4000
    correct_b = rng.random(n) < 0.9
    flip = rng.random(n) < 0.05
    correct_a = np.where(flip, ~correct_b, correct_b)
    score_b = rng.beta(5, 2, n)
    score_a = np.clip(score_b + rng.normal(0.05, 0.1, n), 0, 1)
    iv = paired_bootstrap(correct_a, score_a, correct_b, score_b, n_boot=4000, seed=3)
    z = stats.norm.ppf(0.975)
    d_acc = correct_a.astype(float) - correct_b
    d_rob = score_a - score_b
    ratio = score_a.mean() / score_b.mean()
    lin = (score_a - ratio * score_b) / score_b.mean()  # delta-method influence values
    for name, values, est in (
        ("accuracy_diff", d_acc, d_acc.mean()),
        ("robustness_diff", d_rob, d_rob.mean()),
        ("robustness_ratio", lin, ratio),
    ):
        se = values.std(ddof=1) / math.sqrt(n)
        got = iv[name]
        assert abs(got.estimate - est) <= 64 * EPS * max(1.0, abs(est)), name
        assert abs(got.low - (est - z * se)) <= 0.2 * se, (name, got, est, se)
        assert abs(got.high - (est + z * se)) <= 0.2 * se, (name, got, est, se)
    # the single-model intervals too
    se_a = score_a.std(ddof=1) / math.sqrt(n)
    assert abs(iv["robustness_a"].low - (score_a.mean() - z * se_a)) <= 0.2 * se_a
    # pairing matters: the difference interval is far narrower than an unpaired one
    unpaired = z * math.sqrt(score_a.var(ddof=1) / n + score_b.var(ddof=1) / n)
    assert iv["robustness_diff"].high - iv["robustness_diff"].low < unpaired


def test_paired_bootstrap_rejects_bad_input() -> None:
    a = np.ones(5)
    with pytest.raises(ValueError, match="four"):
        paired_bootstrap(a, a, a, np.ones(4))
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(a, a, a, a, n_boot=5)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, a, a, a, level=1.0)


# --------------------------------------------------------------------------- fair comparison


def test_fair_comparison_picks_the_models_a_hand_computation_picks(synthetic) -> None:
    root, cfg = synthetic
    records = collect_results(root)
    by_id = {r.run_id: r for r in records}
    for name, (_, _, _, surv) in RUNS.items():
        assert abs(by_id[cfg[name].run_id()].robustness - _r_by_hand(surv)) <= 8 * EPS
    fc = fair_comparison(records, n_boot=500)
    # MNIST: tolerance 0, the baseline accuracy 0.9 is the threshold
    assert fc.baseline.run_id == cfg["baseline"].run_id()
    assert fc.threshold == 0.9 and fc.tolerance == 0.0
    # aug6 (0.88) and mom5 (0.8975) fall below it, aug2 (exactly 0.9) qualifies
    assert [r.run_id for r in fc.qualifying["augment"]] == [cfg["aug2"].run_id()]
    assert [r.run_id for r in fc.qualifying["moment"]] == [cfg["mom1"].run_id()]
    assert fc.best["augment"].run_id == cfg["aug2"].run_id()
    assert fc.best["moment"].run_id == cfg["mom1"].run_id()
    r_mom, r_aug = _r_by_hand(RUNS["mom1"][3]), _r_by_hand(RUNS["aug2"][3])
    assert r_mom == 0.99 and r_aug == 0.921875
    assert abs(fc.factor - r_mom / r_aug) <= 8 * EPS
    iv = fc.comparisons["moment vs augment"]
    assert abs(iv["robustness_diff"].estimate - (r_mom - r_aug)) <= 8 * EPS
    assert abs(iv["robustness_ratio"].estimate - r_mom / r_aug) <= 8 * EPS
    assert abs(iv["accuracy_diff"].estimate - 1 / N) <= 8 * EPS
    for interval in iv.values():
        assert interval.low <= interval.estimate <= interval.high
    # the moment model survives every test sigma wherever the augmented one does, so every
    # resampled robustness difference is positive: the interval excludes 0
    assert iv["robustness_diff"].low > 0
    assert set(fc.comparisons) == {"moment vs augment", "moment vs baseline", "augment vs baseline"}


def test_tolerance_admits_slightly_less_accurate_models(synthetic) -> None:
    root, cfg = synthetic
    # the CIFAR-10 tolerance (0.39 points) lets mom5 (0.8975 >= 0.8961) in, not aug6 (0.88)
    fc = fair_comparison(collect_results(root), tolerance=0.0039, n_boot=200)
    assert len(fc.qualifying["moment"]) == 2 and len(fc.qualifying["augment"]) == 1
    assert fc.best["moment"].run_id == cfg["mom5"].run_id()
    assert abs(fc.factor - 1.0 / 0.921875) <= 8 * EPS


def test_the_data_set_default_tolerance_applies(tmp_path: Path) -> None:
    base = _cfg("baseline", dataset="cifar10")
    mom = _cfg("moment", dataset="cifar10", alpha=1.0, sigma=0.5)
    write_run(tmp_path, base, 360, [400] * 5)
    write_run(tmp_path, mom, 359, [400] * 5)
    fc = fair_comparison(collect_results(tmp_path), n_boot=100)
    assert fc.tolerance == 0.0039 and len(fc.qualifying["moment"]) == 1
    assert fc.best["augment"] is None and math.isnan(fc.factor)
    assert set(fc.comparisons) == {"moment vs baseline"}


def test_no_baseline_no_fair_comparison(tmp_path: Path) -> None:
    write_run(tmp_path, _cfg("moment", alpha=1.0, sigma=0.5), 300, [400] * 5)
    assert fair_comparison(collect_results(tmp_path)) is None


# --------------------------------------------------------------------------- tables and report


def test_results_table_and_incomplete_runs(synthetic) -> None:
    root, cfg = synthetic
    broken = root / "runs" / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"config": {}}')
    with pytest.warns(UserWarning, match="incomplete"):
        records = collect_results(root)
    rows = results_table(records)
    assert [r["method"] for r in rows] == ["baseline", "augment", "augment", "moment", "moment"]
    assert [r["folds"] for r in rows[1:3]] == [2, 6]
    assert rows[0]["robustness_auc"] == _r_by_hand(RUNS["baseline"][3])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_results(root / "nope")


def test_matched_pairs_come_from_the_grid_manifest(synthetic) -> None:
    root, cfg = synthetic
    spec = {
        "name": "m",
        "defaults": {"dataset": "mnist", "model": "lenet", "epochs": 3},
        "groups": [
            {"method": "augment", "folds": 6, "sigma": 0.5, "epochs": 1},
            {
                "method": "moment",
                "alpha": 1.0,
                "sigma": 0.5,
                "matched": {
                    "method": "augment",
                    "folds": 6,
                    "epochs": 1,
                    "by": "wall_time",
                    "cost_ratio": 2.0,
                },
            },
        ],
    }
    grid = expand_spec(spec)
    # the matched moment run is mom1 (6 passes / cost 2 = 3 epochs); write its reference
    assert grid.configs[1] == cfg["mom1"]
    write_run(root, grid.configs[0], 350, [400] * 5)
    write_manifest(grid, root)
    declared = read_matched(root)
    assert declared == [m.to_dict() for m in grid.matched]
    pairs = matched_pairs(collect_results(root), declared, n_boot=200)
    assert len(pairs) == 1
    a, b, d, iv = pairs[0]
    assert (a.run_id, b.run_id, d["by"]) == (cfg["mom1"].run_id(), grid.run_ids()[0], "wall_time")
    assert abs(iv["accuracy_diff"].estimate - (361 - 350) / N) <= 8 * EPS


def test_write_report_on_synthetic_runs(synthetic, capsys: pytest.CaptureFixture) -> None:
    root, _ = synthetic
    out = root / "out"
    assert report_main(["report", str(root), "--out", str(out), "--bootstrap", "200"]) == 0
    text = (out / "report.md").read_text()
    assert f"Factor R(best moment) / R(best augment) = {0.99 / 0.921875:.4f}" in text
    assert "qualify (1 augmentation, 1 regularizer)" in text
    # every run against the baseline: mom1 has one more correct image (+0.25 points), aug6
    # has eight fewer (-2 points) and does not qualify
    assert "| moment alpha=1 sigma=0.5 | 0.9025 | 0.25 [" in text
    assert "| augment N~=6 sigma=0.5 | 0.8800 | -2.00 [" in text
    assert text.count("| no |") == 2 and text.count("| yes |") == 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert [p.split("_")[0] for p in pngs] == ["accuracy", "compute", "fair"]
    with (out / "results.csv").open() as fh:
        lines = fh.read().splitlines()
    assert lines[0].startswith("# momentkit ") and lines[1].startswith("# 5 runs")
    rows = list(csv.DictReader(lines[2:]))
    assert len(rows) == 5 and rows[0]["method"] == "baseline"
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["settings"][0]["factor"] - 0.99 / 0.921875) <= 8 * EPS
    # a different tolerance is a command-line option
    assert (
        report_main(
            [
                "report",
                str(root),
                "--out",
                str(out),
                "--bootstrap",
                "100",
                "--tolerance",
                "mnist=0.0039",
            ]
        )
        == 0
    )
    assert "qualify (1 augmentation, 2 regularizer)" in (out / "report.md").read_text()
    assert report_main(["report", str(root), "--tolerance", "mnist"]) == 2
    assert "DATASET=FRACTION" in capsys.readouterr().err


def test_report_of_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no finished run"):
        write_report(tmp_path)


def test_report_command_on_a_real_tiny_grid(tmp_path: Path, mnist_root: Path) -> None:
    spec = {
        "name": "report-tiny",
        "defaults": {
            "dataset": "mnist",
            "model": "lenet",
            "epochs": 1,
            "train_subset": 200,
            "test_subset": 100,
            "eval_sigmas": 4,
            "batch_size": 100,
            "lr": 0.001,
        },
        "groups": [
            {"method": "baseline"},
            {"method": "moment", "alpha": 1.0, "sigma": 0.5},
            {"method": "augment", "folds": 2, "sigma": 0.5},
        ],
    }
    grid = expand_spec(spec)
    write_manifest(grid, tmp_path)
    outcomes = executors.run_local(
        grid.configs, tmp_path, data_root=str(mnist_root), progress=False
    )
    assert [o.status for o in outcomes] == ["done"] * 3
    assert report_main(["report", str(tmp_path), "--bootstrap", "200"]) == 0
    out = tmp_path / "report"
    text = (out / "report.md").read_text()
    assert "## lenet on mnist (train subset 200, test subset 100, epochs 1, seed 0)" in text
    assert "### Fair comparison" in text and "### Training cost per method" in text
    assert len(list(out.glob("*.png"))) == 3
    rows = results_table(collect_results(tmp_path))
    assert {r["run_id"] for r in rows} == set(grid.run_ids())
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["robustness_auc"] <= 1.0
        assert row["gradient_steps"] == (2 if row["method"] == "augment" else 1) * 2
