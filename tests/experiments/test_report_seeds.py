"""Tests of experiments.report.seeds: groups of runs repeated with other training seeds,
the bar of each baseline seed, Welch and paired-by-seed intervals over seeds, and the
report section."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

import pytest
from scipy import stats

from experiments.report import write_report
from experiments.report.seeds import (
    bars_against_seeds,
    fair_by_seed,
    paired_differences,
    seed_groups,
    welch_differences,
)
from tests.experiments.report_runs import EPS, N, cfg, record, write_run


def rec(run_id: str, method: str, acc: float, r: float, seed: int, **kw: object):
    """A hand-built record with a seed (and optional flag)."""
    out = record(run_id, method, acc, r, **kw)
    out.config["seed"] = seed
    return out


def test_groups_hold_runs_that_differ_only_in_the_seed() -> None:
    runs = [
        rec("b0", "baseline", 0.90, 0.50, 0),
        rec("b2", "baseline", 0.92, 0.56, 2),
        rec("b1", "baseline", 0.91, 0.53, 1),
        rec("m0", "moment", 0.89, 0.70, 0),
        rec("a0", "augment", 0.90, 0.80, 0),
        rec("a1", "augment", 0.88, 0.84, 1),
    ]
    runs[4].config["sigma"] = 0.25  # another configuration: a different group than a1
    groups = seed_groups(runs)
    assert [g.label for g in groups] == ["baseline"]  # a0 and a1 differ in sigma
    (g,) = groups
    assert g.seeds == [0, 1, 2] and [r.run_id for r in g.records] == ["b0", "b1", "b2"]
    s = g.summary()
    assert abs(s["accuracy"]["mean"] - 0.91) <= 4 * EPS
    assert abs(s["accuracy"]["sd"] - 0.01) <= 1e-12  # sqrt(((-.01)^2 + 0 + .01^2) / 2)
    assert s["robustness"]["min"] == 0.50 and s["robustness"]["max"] == 0.56
    runs[4].config["sigma"] = 0.5
    assert [g.label for g in seed_groups(runs)] == ["baseline", "augment N~=2 sigma=0.5"]


def test_degenerate_runs_stay_out_of_the_spread_and_the_intervals() -> None:
    """A constant classifier (R = 1) among the seeds would lift the group's mean R; it is
    left out, and a group left with one run is no group."""
    runs = [rec(f"b{s}", "baseline", 0.99, 0.80 + s / 100, s) for s in range(3)]
    runs += [
        rec("g0", "gaussian", 0.11, 1.0, 0, flagged=True),
        rec("g1", "gaussian", 0.99, 0.95, 1),
        rec("g2", "gaussian", 0.98, 0.96, 2),
        rec("h0", "augment", 0.11, 1.0, 0, flagged=True),
        rec("h1", "augment", 0.99, 0.97, 1),
    ]
    groups = {g.method: g for g in seed_groups(runs)}
    assert set(groups) == {"baseline", "gaussian"}  # augment keeps one run: no group
    assert [r.run_id for r in groups["gaussian"].records] == ["g1", "g2"]
    ((g, b, d),) = welch_differences(list(groups.values()))
    assert g.method == "gaussian" and d["robustness"][0] == pytest.approx(0.955 - 0.81)
    ((_, _, p),) = paired_differences(list(groups.values()))
    assert p["seeds"] == [1, 2]


def test_a_seed_found_twice_is_an_error() -> None:
    runs = [rec("b0", "baseline", 0.9, 0.5, 0), rec("b0-copy", "baseline", 0.9, 0.5, 0)]
    with pytest.raises(ValueError, match="seed_groups: .*repeat a seed"):
        seed_groups(runs)


def test_each_baseline_seed_sets_its_own_bar() -> None:
    runs = [
        rec("b0", "baseline", 0.900, 0.5, 0),
        rec("b1", "baseline", 0.905, 0.5, 1),
        rec("b2", "baseline", 0.895, 0.5, 2),
        rec("m", "moment", 0.900, 0.7, 0),  # on the bar of seed 0, above seed 2's
        rec("flat", "moment", 0.990, 1.0, 0, flagged=True),  # flagged: never qualifies
        rec("a", "augment", 0.8951, 0.8, 0),
    ]
    bars = {r.run_id: seeds for r, seeds in bars_against_seeds(runs, 0.0)}
    assert bars == {"m": [0, 2], "flat": [], "a": [2]}
    # a tolerance lowers every bar alike
    assert {r.run_id: s for r, s in bars_against_seeds(runs, 0.01)}["a"] == [0, 1, 2]
    # one baseline seed: nothing to say beyond the fair comparison itself
    assert bars_against_seeds(runs[:1] + runs[3:], 0.0) == []


def test_the_fair_comparison_at_each_seed_sees_only_that_seeds_runs() -> None:
    runs = [
        rec("b0", "baseline", 0.900, 0.5, 0),
        rec("b1", "baseline", 0.905, 0.5, 1),
        rec("m0", "moment", 0.901, 0.7, 0),
        rec("a0", "augment", 0.902, 0.8, 0),
        rec("m1", "moment", 0.906, 0.75, 1),  # the only run at seed 1's bar
        rec("a1", "augment", 0.904, 0.85, 1),
        rec("a2", "augment", 0.999, 0.99, 2),  # seed 2 has no baseline: no comparison
    ]
    got = fair_by_seed(runs, 0.0)
    assert [seed for seed, _ in got] == [0, 1]
    fc0, fc1 = got[0][1], got[1][1]
    assert fc0.baseline.run_id == "b0" and fc0.factor == pytest.approx(0.7 / 0.8)
    assert [r.run_id for r in fc1.qualifying["moment"]] == ["m1"]
    assert fc1.qualifying["augment"] == [] and math.isnan(fc1.factor)
    # a run of another seed never enters (a2 would clear seed 0's bar and be the best)
    assert fc0.best["augment"].run_id == "a0"
    # one baseline seed: the fair comparison of the setting says it all
    assert fair_by_seed([r for r in runs if r.run_id != "b1"], 0.0) == []


def test_welch_interval_against_the_formula() -> None:
    """Independent reference: Welch's interval written out with the Welch-Satterthwaite
    degrees of freedom and scipy.stats.t quantiles."""
    base = [0.9905, 0.9890, 0.9912]
    mom = [0.9904, 0.9880, 0.9897]
    runs = [rec(f"b{s}", "baseline", a, 0.8, s) for s, a in enumerate(base)]
    runs += [rec(f"m{s}", "moment", a, 0.97, s) for s, a in enumerate(mom)]
    ((g, b, d),) = welch_differences(seed_groups(runs), level=0.9)
    assert g.label == "moment alpha=1 sigma=0.5" and b.label == "baseline"
    va, vb = statistics.variance(mom) / 3, statistics.variance(base) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    half = stats.t.ppf(0.95, df) * math.sqrt(va + vb)
    diff = statistics.fmean(mom) - statistics.fmean(base)
    assert d["accuracy"][0] == pytest.approx(diff, abs=1e-15)
    assert d["accuracy"][1] == pytest.approx(diff - half, rel=1e-9)
    assert d["accuracy"][2] == pytest.approx(diff + half, rel=1e-9)
    # no spread on either side: the interval is undefined, the difference is not
    diff_r, low, high = d["robustness"]
    assert diff_r == pytest.approx(0.97 - 0.8) and math.isnan(low) and math.isnan(high)


def test_regularizer_groups_are_also_set_against_noise_training_groups() -> None:
    runs = [rec(f"b{s}", "baseline", 0.90 + s / 1000, 0.5 + s / 100, s) for s in range(3)]
    runs += [rec(f"m{s}", "moment", 0.90 - s / 1000, 0.7 + s / 100, s) for s in range(3)]
    runs += [rec(f"a{s}", "augment", 0.91 + s / 1000, 0.8 - s / 100, s) for s in range(2)]
    got = [(g.method, b.method, d) for g, b, d in welch_differences(seed_groups(runs))]
    assert [(g, b) for g, b, _ in got] == [
        ("moment", "baseline"), ("augment", "baseline"), ("moment", "augment")]
    d = got[2][2]
    assert d["accuracy"][0] == pytest.approx(0.899 - 0.9105)  # means 0.899 and 0.9105
    assert d["robustness"][0] == pytest.approx(0.71 - 0.795)
    ref = stats.ttest_ind([0.90, 0.899, 0.898], [0.91, 0.911], equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (d["accuracy"][1], d["accuracy"][2]) == pytest.approx((ci.low, ci.high))


def test_one_side_without_spread_has_the_other_sides_interval() -> None:
    """Two seeds with equal accuracy: Welch's interval is the other side's t interval
    (df = n - 1), with no warning from SciPy."""
    runs = [rec(f"b{s}", "baseline", a, 0.5 + s / 100, s) for s, a in enumerate([0.90, 0.91])]
    runs += [rec(f"a{s}", "augment", 0.92, 0.8 + s / 100, s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((_, _, d),) = welch_differences(seed_groups(runs))
    half = stats.t.ppf(0.975, 1) * statistics.stdev([0.90, 0.91]) / math.sqrt(2)
    assert d["accuracy"] == pytest.approx((0.92 - 0.905, 0.015 - half, 0.015 + half))


def test_paired_interval_against_the_formula() -> None:
    """Independent reference: the t interval of the per-seed differences written out
    (mean +- t_{n-1} sd / sqrt(n)), over the seeds both groups have (seed 3 of the
    regularizer has no baseline partner and is left out of the pairing)."""
    base = {0: 0.9905, 1: 0.9928, 2: 0.9927}
    mom = {0: 0.9914, 1: 0.9905, 2: 0.9899, 3: 0.9950}
    # R: the seed lifts both methods by 0.05 a seed; the regularizer gains 0.001 a seed more
    runs = [rec(f"b{s}", "baseline", a, 0.80 + s / 20, s) for s, a in base.items()]
    runs += [rec(f"m{s}", "moment", a, 0.95 + s / 20 + s / 1000, s) for s, a in mom.items()]
    ((g, b, d),) = paired_differences(seed_groups(runs), level=0.9)
    assert (g.method, b.method, d["seeds"]) == ("moment", "baseline", [0, 1, 2])
    diffs = [mom[s] - base[s] for s in (0, 1, 2)]
    mean = statistics.fmean(diffs)
    half = stats.t.ppf(0.95, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert d["accuracy"] == pytest.approx((mean, mean - half, mean + half), rel=1e-9)
    # R differences 0.150, 0.151, 0.152: interval 0.151 +- t_2 * 0.001 / sqrt(3)
    half = stats.t.ppf(0.95, 2) * 0.001 / math.sqrt(3)
    assert d["robustness"] == pytest.approx((0.151, 0.151 - half, 0.151 + half), rel=1e-9)
    # ttest_rel on the aligned values gives the same interval
    ref = stats.ttest_rel([mom[s] for s in (0, 1, 2)], [base[s] for s in (0, 1, 2)])
    ci = ref.confidence_interval(0.9)
    assert d["accuracy"][1:] == pytest.approx((ci.low, ci.high), rel=1e-9)
    # pairing removes a shift that the seed gives both methods: Welch does not
    ((_, _, w),) = welch_differences(seed_groups(runs), level=0.9)
    assert w["robustness"][2] - w["robustness"][1] > 20 * 2 * half


def test_paired_needs_two_common_seeds_and_spread() -> None:
    runs = [rec(f"b{s}", "baseline", 0.90, 0.5, s) for s in (0, 1)]
    runs += [rec(f"m{s}", "moment", 0.91, 0.7 + s / 100, s) for s in (1, 2)]
    assert paired_differences(seed_groups(runs)) == []  # only seed 1 in common
    runs.append(rec("m0", "moment", 0.91, 0.7, 0))
    ((_, _, d),) = paired_differences(seed_groups(runs))
    assert d["seeds"] == [0, 1]
    # equal accuracy differences (0.01 at both seeds): no spread, no interval
    mean, low, high = d["accuracy"]
    assert mean == pytest.approx(0.01) and math.isnan(low) and math.isnan(high)
    assert d["robustness"][1] < d["robustness"][0] < d["robustness"][2]


def test_a_single_seed_group_has_no_interval() -> None:
    runs = [rec("b0", "baseline", 0.9, 0.5, 0), rec("b1", "baseline", 0.91, 0.5, 1)]
    runs += [rec("m0", "moment", 0.9, 0.7, 0)]
    assert welch_differences(seed_groups(runs)) == []  # m0 has no repeat: no group


def test_the_report_section_on_run_folders(tmp_path: Path) -> None:
    # baseline at seeds 0, 1, 2 with 360, 364, 356 correct of N; moment at seeds 0, 1
    for seed, n_correct in ((0, 360), (1, 364), (2, 356)):
        write_run(tmp_path, cfg("baseline", seed=seed), n_correct, [400, 380, 340, 300, 260])
    for seed, n_correct in ((0, 360), (1, 358)):
        config = cfg("moment", alpha=1.0, sigma=0.5, seed=seed)
        write_run(tmp_path, config, n_correct, [400, 398, 396, 394, 392])
    # a run with constant predictions at seed 1: named, and in no group or interval
    write_run(tmp_path, cfg("gaussian", sigma=0.5, seed=1), 40, [400] * 5, degenerate=1.0)
    write_run(tmp_path, cfg("gaussian", sigma=0.5, seed=2), 350, [400, 390, 380, 370, 360])
    text = write_report(tmp_path, tmp_path / "out", n_boot=100).read_text()
    assert "Left out of the spread and of every interval over seeds for degenerate" in text
    assert "gaussian sigma=0.5 seed 1 (" in text
    assert "## Seed-to-seed spread: lenet on mnist (epochs 3)" in text
    assert f"| baseline | 0, 1, 2 | {360 / N:.4f}, {364 / N:.4f}, {356 / N:.4f} |" in text
    # moment seed 0 (360) clears the bars of seeds 0 (360) and 2 (356), seed 1 (358) only 2's
    assert "| moment alpha=1 sigma=0.5 | 0 | 0.9000 | " in text
    assert "| 2 of 3 (0, 2) |" in text and "| 1 of 3 (2) |" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (entry,) = summary["seeds"]
    assert [g["seeds"] for g in entry["groups"]] == [[0, 1, 2], [0, 1]]  # no gaussian group
    assert len(entry["left_out_degenerate"]) == 1
    welch = entry["welch"][0]["accuracy"]
    assert welch["diff"] == pytest.approx((360 + 358) / 2 / N - 360 / N)
    assert welch["low"] < welch["diff"] < welch["high"]
    # each seed has its own compute section, named by its seed
    for seed in (0, 1, 2):
        assert f"seed {seed}, all epoch caps)\n" in text
    # the fair comparison at each seed: moment seed 0 clears its bar, seed 1 does not
    assert "made at each seed alone" in text
    fair = entry["fair_by_seed"]
    assert [(e["seed"], len(e["qualifying"]["moment"])) for e in fair] == [(0, 1), (1, 0), (2, 0)]
    assert fair[0]["best"]["moment"] == fair[0]["qualifying"]["moment"][0]
    assert all(e["factor"] is None for e in fair)  # no augmentation run: no factor
    # paired over seeds 0 and 1: differences 0 and -6 of N
    assert "Paired by seed" in text and "| moment alpha=1 sigma=0.5 | baseline | 0, 1 |" in text
    (paired,) = entry["paired"]
    assert paired["seeds"] == [0, 1]
    assert paired["accuracy"]["diff"] == pytest.approx(-3 / N)
    assert paired["accuracy"]["low"] < -3 / N < paired["accuracy"]["high"]
    # without repeated runs there is no such section
    other = tmp_path / "single"
    write_run(other, cfg("baseline"), 360, [400, 380, 340, 300, 260])
    text = write_report(other, other / "out", n_boot=100).read_text()
    assert "Seed-to-seed" not in text
    assert json.loads((other / "out" / "summary.json").read_text())["seeds"] == []
