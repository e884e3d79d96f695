"""Tests of experiments.report.compare: the fair-comparison rule (fair_choice) on hand-built
records, the fair comparison with intervals on synthetic runs, and matched pairs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from experiments.grids import expand_spec, write_manifest
from experiments.report import (
    collect_results,
    fair_choice,
    fair_comparison,
    matched_pairs,
    read_matched,
)
from experiments.report.surrogates import surrogate_pairs
from tests.experiments.report_runs import (
    EPS,
    RUNS,
    N,
    cfg,
    r_by_hand,
    record,
    synthetic_runs,
    write_run,
)

# --------------------------------------------------------------------------- the rule


def test_baseline_is_the_most_accurate_then_the_smallest_run_id() -> None:
    runs = [
        record("b-c", "baseline", 0.90, 0.5),
        record("b-a", "baseline", 0.90, 0.4),
        record("b-z", "baseline", 0.85, 0.9),
        record("m-1", "moment", 0.90, 0.7),
    ]
    for seed in range(6):  # whatever order the runs were found in
        random.Random(seed).shuffle(runs)
        fc = fair_choice(runs, 0.0)
        assert fc.baseline.run_id == "b-a"
        assert fc.threshold == 0.90


def test_accuracy_exactly_at_the_bar_qualifies_and_one_image_less_does_not() -> None:
    """0.9 - 0.0039 is 0.8961000000000001 in binary; a run with accuracy 0.8961 (decimal)
    sits exactly on the bar and qualifies; 0.8960 (one image in 10^4 less) does not."""
    runs = [
        record("base", "baseline", 0.9, 0.5),
        record("on", "moment", 0.8961, 0.6),
        record("below", "moment", 0.8960, 0.9),
        record("aug-on", "augment", 0.9, 0.55),
    ]
    fc = fair_choice(runs, 0.0039)
    assert [r.run_id for r in fc.qualifying["moment"]] == ["on"]
    assert fc.best["moment"].run_id == "on"
    assert fc.qualifies(runs[1]) and not fc.qualifies(runs[2])
    # tolerance 0: equal accuracy qualifies, and the baseline clears its own bar
    fc0 = fair_choice(runs, 0.0)
    assert [r.run_id for r in fc0.qualifying["augment"]] == ["aug-on"]
    assert fc0.qualifying["moment"] == [] and fc0.clears_bar(fc0.baseline)


def test_ties_in_robustness_go_to_accuracy_then_run_id() -> None:
    runs = [
        record("base", "baseline", 0.9, 0.5),
        record("m-b", "moment", 0.91, 0.8),
        record("m-a", "moment", 0.91, 0.8),
        record("m-c", "moment", 0.95, 0.8),
        record("a-b", "augment", 0.92, 0.7),
        record("a-a", "augment", 0.92, 0.7),
    ]
    fc = fair_choice(runs, 0.0)
    assert fc.best["moment"].run_id == "m-c"
    assert fc.best["augment"].run_id == "a-a"
    assert abs(fc.factor - 0.8 / 0.7) <= 4 * EPS


def test_no_qualifying_run_and_no_baseline() -> None:
    runs = [record("base", "baseline", 0.9, 0.5), record("m", "moment", 0.5, 1.0)]
    fc = fair_choice(runs, 0.01)
    assert fc.best == {"moment": None, "augment": None, "gaussian": None}
    assert fc.qualifying == {"moment": [], "augment": [], "gaussian": []}
    assert math.isnan(fc.factor)
    assert fair_choice(runs[1:], 0.01) is None


def test_noise_references_fall_back_to_the_most_robust_run() -> None:
    from experiments.report.compare import noise_references

    runs = [
        record("base", "baseline", 0.9, 0.5),
        record("a-ok", "augment", 0.9, 0.7),  # qualifies
        record("a-rob", "augment", 0.8, 0.9),  # more robust, does not qualify
        record("g-rob", "gaussian", 0.8, 0.95),
        record("g-flat", "gaussian", 0.8, 1.0, flagged=True),
        record("g-less", "gaussian", 0.85, 0.6),
        record("m", "moment", 0.85, 0.8),
    ]
    fc = fair_choice(runs, 0.0)
    refs = noise_references(fc, runs)
    # augment: the qualifying best; gaussian: none qualifies, so its most robust run
    # that is not flagged.
    assert {k: r.run_id for k, r in refs.items()} == {"augment": "a-ok", "gaussian": "g-rob"}
    assert noise_references(fair_choice(runs[:1] + runs[-1:], 0.0), runs[-1:]) == {}


def test_flagged_runs_are_never_chosen() -> None:
    """A run with (nearly) constant predictions is perfectly robust by Eq. 6; it must not
    be picked as the most robust run, nor be the baseline."""
    runs = [
        record("base-flat", "baseline", 0.95, 1.0, flagged=True),
        record("base", "baseline", 0.9, 0.5),
        record("m-flat", "moment", 0.9, 1.0, flagged=True),
        record("m-ok", "moment", 0.9, 0.7),
    ]
    fc = fair_choice(runs, 0.0)
    assert fc.baseline.run_id == "base"
    assert fc.best["moment"].run_id == "m-ok"
    assert [r.run_id for r in fc.flagged] == ["base-flat", "m-flat"]
    assert fc.clears_bar(runs[2]) and not fc.qualifies(runs[2])
    assert fair_choice(runs[:1] + runs[2:], 0.0) is None  # only a flagged baseline


def test_default_tolerance_is_the_data_sets() -> None:
    runs = [
        record("base", "baseline", 0.9, 0.5, dataset="cifar10"),
        record("m", "moment", 0.8961, 0.6, dataset="cifar10"),
    ]
    fc = fair_choice(runs)
    assert fc.tolerance == 0.0039 and fc.best["moment"].run_id == "m"
    assert fair_choice([record("b", "baseline", 0.9, 0.5, dataset="new")]).tolerance == 0.0
    for bad in (-0.01, 1.0, float("nan")):
        with pytest.raises(ValueError, match="tolerance"):
            fair_choice(runs, bad)


# --------------------------------------------------------------------------- on run folders


@pytest.fixture
def synthetic(tmp_path: Path):
    return tmp_path, synthetic_runs(tmp_path)


def test_fair_comparison_picks_the_models_a_hand_computation_picks(synthetic) -> None:
    root, cfg_ = synthetic
    records = collect_results(root)
    by_id = {r.run_id: r for r in records}
    for name, (_, _, _, surv) in RUNS.items():
        assert abs(by_id[cfg_[name].run_id()].robustness - r_by_hand(surv)) <= 8 * EPS
    fc = fair_comparison(records, n_boot=500)
    # MNIST: tolerance 0, the baseline accuracy 0.9 is the threshold
    assert fc.baseline.run_id == cfg_["baseline"].run_id()
    assert fc.threshold == 0.9 and fc.tolerance == 0.0
    # aug6 (0.88) and mom5 (0.8975) fall below it, aug2 (exactly 0.9) qualifies
    assert [r.run_id for r in fc.qualifying["augment"]] == [cfg_["aug2"].run_id()]
    assert [r.run_id for r in fc.qualifying["moment"]] == [cfg_["mom1"].run_id()]
    assert fc.best["augment"].run_id == cfg_["aug2"].run_id()
    assert fc.best["moment"].run_id == cfg_["mom1"].run_id()
    r_mom, r_aug = r_by_hand(RUNS["mom1"][3]), r_by_hand(RUNS["aug2"][3])
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
    root, cfg_ = synthetic
    # the CIFAR-10 tolerance (0.39 points) lets mom5 (0.8975 >= 0.8961) in, not aug6 (0.88)
    fc = fair_comparison(collect_results(root), tolerance=0.0039, n_boot=200)
    assert len(fc.qualifying["moment"]) == 2 and len(fc.qualifying["augment"]) == 1
    assert fc.best["moment"].run_id == cfg_["mom5"].run_id()
    assert abs(fc.factor - 1.0 / 0.921875) <= 8 * EPS


def test_the_data_set_default_tolerance_applies(tmp_path: Path) -> None:
    base = cfg("baseline", dataset="cifar10")
    mom = cfg("moment", dataset="cifar10", alpha=1.0, sigma=0.5)
    write_run(tmp_path, base, 360, [400] * 5)
    write_run(tmp_path, mom, 359, [400] * 5)
    fc = fair_comparison(collect_results(tmp_path), n_boot=100)
    assert fc.tolerance == 0.0039 and len(fc.qualifying["moment"]) == 1
    assert fc.best["augment"] is None and math.isnan(fc.factor)
    assert set(fc.comparisons) == {"moment vs baseline"}


def test_no_baseline_no_fair_comparison(tmp_path: Path) -> None:
    write_run(tmp_path, cfg("moment", alpha=1.0, sigma=0.5), 300, [400] * 5)
    assert fair_comparison(collect_results(tmp_path)) is None


def test_matched_pairs_come_from_the_grid_manifest(synthetic) -> None:
    root, cfg_ = synthetic
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
    assert grid.configs[1] == cfg_["mom1"]
    write_run(root, grid.configs[0], 350, [400] * 5)
    write_manifest(grid, root)
    declared = read_matched(root)
    assert declared == [m.to_dict() for m in grid.matched]
    pairs = matched_pairs(collect_results(root), declared, n_boot=200)
    assert len(pairs) == 1
    a, b, d, iv = pairs[0]
    assert (a.run_id, b.run_id, d["by"]) == (cfg_["mom1"].run_id(), grid.run_ids()[0], "wall_time")
    assert abs(iv["accuracy_diff"].estimate - (361 - 350) / N) <= 8 * EPS


# ---------------------------------------------------------------- surrogate twins


def test_surrogate_pairs_match_alpha_and_sigma(tmp_path: Path) -> None:
    """Each whole-network run meets the first-ReLU run of its alpha and sigma; a network
    run without a twin, and first-ReLU runs without a network run, are left out."""
    configs = {
        "net_1_05": cfg("moment", alpha=1.0, sigma=0.5, moments="network"),
        "net_5_1": cfg("moment", alpha=5.0, sigma=1.0, moments="network"),  # no twin
        "fr_1_05": cfg("moment", alpha=1.0, sigma=0.5),
        "fr_1_1": cfg("moment", alpha=1.0, sigma=1.0),
        "fr_5_05": cfg("moment", alpha=5.0, sigma=0.5),
        "aug": cfg("augment", folds=2, sigma=0.5),
    }
    for c in configs.values():
        write_run(tmp_path, c, 360, [400] * 5)
    records = collect_results(tmp_path)
    pairs = surrogate_pairs(records)
    ids = {c.run_id(): name for name, c in configs.items()}
    assert [(ids[a.run_id], ids[b.run_id]) for a, b in pairs] == [("net_1_05", "fr_1_05")]
    assert surrogate_pairs([r for r in records if ids[r.run_id] != "fr_1_05"]) == []
