"""Seed-to-seed spread: the same run trained with several training seeds.

The paired bootstrap intervals of the rest of the report cover the sampling of test images
only. Training with another seed (another initialization, validation split, batch order and
noise) moves a converged model's accuracy too, and on MNIST by about as much as the paper's
accuracy bar (tolerance 0) asks of a method. When a grid repeats runs with several seeds,
this section puts that variation on the record:

* :func:`seed_groups`: the runs that differ only in ``seed``, with the mean, sample
  standard deviation and range of their accuracy and robustness R;
* :func:`bars_against_seeds`: for every run compared with the baseline, the baseline seeds
  whose fair-comparison bar it clears (the bar and the rule are
  :func:`~experiments.report.compare.fair_choice`'s, applied once per baseline seed);
* :func:`fair_by_seed`: the fair comparison itself at each seed that has a baseline run,
  among the runs of that seed: which runs qualify and the paper's factor, to show whether
  its verdict holds from seed to seed;
* :func:`welch_differences`: the difference of each repeated run's mean accuracy and mean R
  from the baseline's, and of each repeated regularizer run's from each repeated
  noise-training run's, with Welch's t interval over seeds
  (``scipy.stats.ttest_ind(equal_var=False)``); with two or three seeds a side these
  intervals are wide, and they are shown as they come out;
* :func:`paired_differences`: the same pairs of groups, paired by seed. A training seed
  fixes the initialization and the validation split whatever the method, so the runs of
  two methods at one seed start from the same network and train on the same split;
  the mean over the seeds both groups have of the per-seed difference, with the paired
  t interval (``scipy.stats.ttest_rel``). It removes what the seed does to both methods
  alike (the seed-0 baseline of a grid may be a weak one), at the price of fewer
  degrees of freedom (one less than the number of common seeds).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from experiments.report.compare import COMPARED_METHODS, FairComparison, fair_choice, setting_key
from experiments.report.mdtable import md_table
from experiments.report.records import RunRecord, method_order
from experiments.report.stats import finite_or_none

__all__ = [
    "SeedGroup",
    "bars_against_seeds",
    "fair_by_seed",
    "paired_differences",
    "seed_groups",
    "seeds_section",
    "setting_without_seed",
    "welch_differences",
]


@dataclass(frozen=True)
class SeedGroup:
    """Runs whose configurations are equal except for ``seed``, sorted by seed."""

    records: tuple[RunRecord, ...]

    @property
    def label(self) -> str:
        return self.records[0].label()

    @property
    def method(self) -> str:
        return self.records[0].method

    @property
    def seeds(self) -> list[int]:
        return [_seed(r) for r in self.records]

    @property
    def accuracies(self) -> list[float]:
        return [r.accuracy for r in self.records]

    @property
    def robustness(self) -> list[float]:
        return [r.robustness for r in self.records]

    def summary(self) -> dict[str, Any]:
        """Seeds, per-seed values, mean, sample sd (``None`` for one seed), min and max."""
        out: dict[str, Any] = {"label": self.label, "seeds": self.seeds}
        for name, vals in (("accuracy", self.accuracies), ("robustness", self.robustness)):
            out[name] = {
                "values": vals,
                "mean": statistics.fmean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else None,
                "min": min(vals),
                "max": max(vals),
            }
        return out


def _seed(r: RunRecord) -> int:
    return int(r.config.get("seed", 0))


def setting_without_seed(config: dict[str, Any]) -> tuple:
    """:func:`~experiments.report.compare.setting_key` with the seed left out: the runs
    whose seed spread is shown together."""
    return setting_key({**config, "seed": None})


def _identity(config: dict[str, Any]) -> str:
    """A run's configuration without its seed (the key of its seed group)."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def seed_groups(records: Iterable[RunRecord]) -> list[SeedGroup]:
    """Every group of at least two runs that differ only in ``seed`` (by method, then label).

    Runs flagged for degenerate predictions are left out: a constant classifier has R = 1
    (Eq. 6 cannot tell it from a robust one) and the accuracy of one class, and either
    would corrupt a mean over seeds or an interval; :func:`seeds_section` names them.

    Raises:
        ValueError: two runs of one group have the same seed (the same run found twice).
    """
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if not r.degenerate:
            groups.setdefault(_identity(r.config), []).append(r)
    out = []
    for recs in groups.values():
        if len(recs) < 2:
            continue
        recs = sorted(recs, key=_seed)
        seeds = [_seed(r) for r in recs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"seed_groups: runs {[r.run_id for r in recs]} ({recs[0].label()}) repeat a "
                f"seed: {seeds}; each run folder should appear once"
            )
        out.append(SeedGroup(tuple(recs)))
    return sorted(out, key=lambda g: (method_order(g.method), g.label))


def _baselines(records: Iterable[RunRecord]) -> list[RunRecord]:
    return sorted(
        (r for r in records if r.method == "baseline" and not r.degenerate),
        key=lambda r: (_seed(r), r.run_id),
    )


def bars_against_seeds(
    records: Sequence[RunRecord], tolerance: float
) -> list[tuple[RunRecord, list[int]]]:
    """For every non-baseline run: the seeds of the baseline runs whose bar it clears.

    ``records`` are the runs of one setting but the seed. Each baseline run (not flagged)
    is taken as the fair comparison's baseline in turn, and the run is tested with
    :meth:`~experiments.report.compare.FairComparison.qualifies` (bar and flag). Empty
    when there are fewer than two baseline seeds.
    """
    baselines = _baselines(records)
    if len(baselines) < 2:
        return []
    out = []
    others = [r for r in records if r.method != "baseline"]

    def order(r: RunRecord) -> tuple:
        return (method_order(r.method), r.label(), _seed(r), r.run_id)

    for r in sorted(others, key=order):
        cleared = []
        for b in baselines:
            fc = fair_choice([b, r], tolerance)
            if fc is not None and fc.qualifies(r):
                cleared.append(_seed(b))
        out.append((r, cleared))
    return out


def fair_by_seed(
    records: Sequence[RunRecord], tolerance: float
) -> list[tuple[int, FairComparison]]:
    """``(seed, fair comparison among the runs of that seed)`` for every seed with a
    baseline run (not flagged), by seed; empty when fewer than two seeds have one.

    ``records`` are the runs of one setting but the seed. Unlike
    :func:`bars_against_seeds`, each seed's comparison sees only that seed's runs: it is
    the comparison the paper's procedure would have made had the grid been run with that
    seed alone.
    """
    if len({_seed(b) for b in _baselines(records)}) < 2:
        return []
    by_seed: dict[int, list[RunRecord]] = {}
    for r in records:
        by_seed.setdefault(_seed(r), []).append(r)
    out = []
    for seed in sorted(by_seed):
        fc = fair_choice(by_seed[seed], tolerance)
        if fc is not None:
            out.append((seed, fc))
    return out


def _welch(a: Sequence[float], b: Sequence[float], level: float) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t interval; nan bounds when it is undefined
    (fewer than two values a side, or no spread on either side)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return diff, math.nan, math.nan
    with warnings.catch_warnings():
        # one side without spread (e.g. equal accuracies at two seeds) is exact, and the
        # interval is the other side's; SciPy warns of cancellation in that side's variance
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=level)
    return diff, float(ci.low), float(ci.high)


def _compared_groups(groups: Sequence[SeedGroup]) -> list[tuple[SeedGroup, SeedGroup]]:
    """Every repeated non-baseline group with the repeated baseline group of its setting,
    then every repeated regularizer group with every repeated augmentation and Gaussian
    noise-training group of its setting."""

    def key(g: SeedGroup) -> tuple:
        return setting_without_seed(g.records[0].config)

    pairs = [
        (g, b) for g in groups for b in groups
        if b.method == "baseline" and g.method != "baseline" and key(g) == key(b)
    ]
    pairs += [
        (g, b) for g in groups for b in groups
        if g.method == "moment" and b.method in ("augment", "gaussian") and key(g) == key(b)
    ]
    return pairs


def welch_differences(
    groups: Sequence[SeedGroup], *, level: float = 0.95
) -> list[tuple[SeedGroup, SeedGroup, dict[str, tuple[float, float, float]]]]:
    """``(group, reference group, {"accuracy": (diff, low, high), "robustness": ...})``:
    every repeated non-baseline group against the repeated baseline group of its setting,
    then every repeated regularizer group against every repeated augmentation and Gaussian
    noise-training group of its setting (``diff`` is the group's mean minus the
    reference's)."""
    return [
        (g, b, {
            "accuracy": _welch(g.accuracies, b.accuracies, level),
            "robustness": _welch(g.robustness, b.robustness, level),
        })
        for g, b in _compared_groups(groups)
    ]


def _paired(d: Sequence[float], level: float) -> tuple[float, float, float]:
    """mean(d) and its t interval (df = len(d) - 1); nan bounds when it is undefined
    (fewer than two differences, or all of them equal)."""
    mean = statistics.fmean(d)
    if len(d) < 2 or statistics.stdev(d) == 0:
        return mean, math.nan, math.nan
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence_level=level)
    return mean, float(ci.low), float(ci.high)


def paired_differences(
    groups: Sequence[SeedGroup], *, level: float = 0.95
) -> list[tuple[SeedGroup, SeedGroup, dict[str, Any]]]:
    """``(group, reference group, {"seeds": [...], "accuracy": (mean, low, high),
    "robustness": ...})`` for the pairs of :func:`welch_differences`, paired by seed: over
    the seeds both groups have, the mean of (the group's value minus the reference's at the
    same seed) with its paired t interval (the one-sample t interval of the differences,
    which is ``scipy.stats.ttest_rel``'s). Pairs with fewer than two common seeds are left
    out."""
    out = []
    for g, b in _compared_groups(groups):
        ref = {_seed(r): r for r in b.records}
        common = [r for r in g.records if _seed(r) in ref]
        if len(common) < 2:
            continue
        acc = [r.accuracy - ref[_seed(r)].accuracy for r in common]
        rob = [r.robustness - ref[_seed(r)].robustness for r in common]
        out.append((g, b, {
            "seeds": [_seed(r) for r in common],
            "accuracy": _paired(acc, level),
            "robustness": _paired(rob, level),
        }))
    return out


def _values(vals: Sequence[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in vals)


def _mean_sd(vals: Sequence[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return f"{statistics.fmean(vals):.4f} ± {sd:.4f}"


def _interval(t: tuple[float, float, float]) -> str:
    diff, low, high = t
    return f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]"


def seeds_section(
    setting: dict[str, Any], records: Sequence[RunRecord], tolerance: float, level: float
) -> tuple[list[str], dict[str, Any] | None]:
    """Markdown and ``summary.json`` entry of the seed spread of one setting (all seeds);
    nothing when no run of the setting was repeated with another seed."""
    groups = seed_groups(records)
    if not groups:
        return [], None
    flagged = [r for r in records if r.degenerate]
    title = f"{setting['model']} on {setting['dataset']}"
    md = [
        f"## Seed-to-seed spread: {title} (epochs {setting['epochs']})",
        "",
        "Runs repeated with other training seeds, everything else equal. The intervals in "
        "the rest of this report cover the sampling of test images only; this is the "
        "variation of training itself (initialization, validation split, batch order, "
        "noise). sd is the sample standard deviation over seeds.",
        "",
    ]
    rows = (
        [g.label, ", ".join(map(str, g.seeds)), _values(g.accuracies), _mean_sd(g.accuracies),
         _values(g.robustness), _mean_sd(g.robustness)]
        for g in groups
    )
    md += [md_table(("run", "seeds", "accuracy", "mean ± sd", "R", "mean ± sd"), rows), ""]
    if flagged:
        md += [
            "Left out of the spread and of every interval over seeds for degenerate "
            "predictions (a constant classifier's R is 1): "
            + ", ".join(f"{r.label()} seed {_seed(r)} ({r.run_id})" for r in flagged) + ".",
            "",
        ]
    bars = bars_against_seeds(records, tolerance)
    if bars:
        base_seeds = [_seed(b) for b in _baselines(records)]
        md += [
            f"Every run against the fair comparison's bar (tolerance {100 * tolerance:g} "
            f"points) of each baseline seed ({', '.join(map(str, base_seeds))}):",
            "",
        ]
        rows = (
            [r.label(), _seed(r), f"{r.accuracy:.4f}", f"{r.robustness:.4f}",
             f"{len(c)} of {len(base_seeds)}" + (f" ({', '.join(map(str, c))})" if c else "")]
            for r, c in bars
        )
        header = ("run", "seed", "accuracy", "R", "clears the bar of baseline seeds")
        md += [md_table(header, rows), ""]
    by_seed = fair_by_seed(records, tolerance)
    if by_seed:
        md += [
            "The fair comparison (tolerance "
            f"{100 * tolerance:g} points) made at each seed alone, among that seed's runs "
            "(the qualifying runs of each method; the factor is R(best regularizer) / "
            "R(best augmentation), with intervals in that seed's section):",
            "",
        ]
        rows = []
        for seed, fc in by_seed:
            runs = [r for r in records if _seed(r) == seed]
            qualifying = ", ".join(
                f"{m} {len(fc.qualifying[m])} of {sum(r.method == m for r in runs)}"
                for m in COMPARED_METHODS if any(r.method == m for r in runs)
            )
            best = [fc.best[m].label() if fc.best[m] else "none" for m in ("moment", "augment")]
            factor = f"{fc.factor:.3f}" if math.isfinite(fc.factor) else "undefined"
            rows.append([seed, f"{fc.baseline.accuracy:.4f}", qualifying, *best, factor])
        header = ("seed", "baseline accuracy (the bar)", "qualifying", "best regularizer",
                  "best augmentation", "factor")
        md += [md_table(header, rows), ""]
    diffs = welch_differences(groups, level=level)
    if diffs:
        md += [
            f"Mean over seeds minus the reference's mean, with Welch's t {int(100 * level)}% "
            "interval over seeds:",
            "",
        ]
        rows = (
            [g.label, b.label, f"{len(g.seeds)} / {len(b.seeds)}", _interval(d["accuracy"]),
             _interval(d["robustness"])]
            for g, b, d in diffs
        )
        header = ("run", "reference", "seeds run / ref.", "Δ accuracy", "Δ R")
        md += [md_table(header, rows), ""]
    paired = paired_differences(groups, level=level)
    if paired:
        md += [
            "Paired by seed (one seed gives every method the same initialization and "
            "validation split): the mean over common seeds of the per-seed difference, with "
            f"the paired t {int(100 * level)}% interval (df = common seeds - 1):",
            "",
        ]
        rows = (
            [g.label, b.label, ", ".join(map(str, d["seeds"])), _interval(d["accuracy"]),
             _interval(d["robustness"])]
            for g, b, d in paired
        )
        header = ("run", "reference", "common seeds", "Δ accuracy", "Δ R")
        md += [md_table(header, rows), ""]
    entry = {
        "setting": {k: v for k, v in setting.items() if k != "seed"},
        "groups": [g.summary() for g in groups],
        "left_out_degenerate": [r.run_id for r in flagged],
        "bars": [
            {"run_id": r.run_id, "label": r.label(), "seed": _seed(r),
             "baseline_seeds_cleared": c}
            for r, c in bars
        ],
        "fair_by_seed": [
            {"seed": seed, "baseline_accuracy": fc.baseline.accuracy,
             "qualifying": {m: [r.run_id for r in fc.qualifying[m]] for m in COMPARED_METHODS},
             "best": {m: (fc.best[m].run_id if fc.best[m] else None) for m in COMPARED_METHODS},
             "factor": finite_or_none(fc.factor)}
            for seed, fc in by_seed
        ],
        "welch": [
            {"label": g.label, "reference": b.label, "level": level}
            | {
                k: dict(zip(("diff", "low", "high"), map(finite_or_none, v), strict=True))
                for k, v in d.items()
            }
            for g, b, d in diffs
        ],
        "paired": [
            {"label": g.label, "reference": b.label, "level": level, "seeds": d["seeds"]}
            | {
                k: dict(zip(("diff", "low", "high"), map(finite_or_none, d[k]), strict=True))
                for k in ("accuracy", "robustness")
            }
            for g, b, d in paired
        ],
    }
    return md, entry
