"""Comparisons of runs: settings, the fair comparison, training cost and matched compute.

**Settings.** Runs are compared only with runs of the same *setting*: data set, model, train
and test subsets, evaluation settings, batch size, learning rate, seed and epoch cap.

**Fair comparison** (the paper's Figures 4 and 5), decided in one place, :func:`fair_choice`:

1. The *baseline* is the baseline-method run with the highest clean test accuracy; ties go
   to the smallest run id (so the choice never depends on the order runs were found).
   Runs whose predictions are flagged as (nearly) constant
   (:attr:`~experiments.report.records.RunRecord.degenerate`) are never the baseline.
2. A run *clears the bar* when its accuracy is at least ``threshold = acc_baseline -
   tolerance`` (default tolerance :data:`DEFAULT_TOLERANCE` of the data set: 0 for MNIST,
   0.39 points for CIFAR-10, 0.75 for CIFAR-100, as in the paper). The comparison allows
   :data:`ACCURACY_SLACK` so that an accuracy equal to the threshold in decimal (0.8961
   against 0.9 - 0.0039) clears it despite binary rounding.
3. A run *qualifies* when it clears the bar and is not flagged. Among the qualifying runs
   of each method the most robust (highest R; ties: higher accuracy, then smallest run id)
   is the method's best. A flagged run is never chosen, however robust: Eq. 6 scores a
   constant classifier as perfectly robust.

The factor is ``R(best moment) / R(best augment)``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import rundir
from experiments.config import METHODS
from experiments.report.records import RunRecord, method_order
from experiments.report.stats import Interval, compare_records

__all__ = [
    "ACCURACY_SLACK",
    "COMPARED_METHODS",
    "DEFAULT_TOLERANCE",
    "FairComparison",
    "chosen_pairs",
    "cost_table",
    "fair_choice",
    "fair_comparison",
    "group_by_setting",
    "matched_pairs",
    "read_matched",
    "setting_key",
]

DEFAULT_TOLERANCE: dict[str, float] = {
    "mnist": 0.0,
    "fashion-mnist": 0.0,
    "cifar10": 0.0039,
    "cifar100": 0.0075,
}
"""Accuracy tolerance of the fair comparison per data set, as a fraction (0.0039 = 0.39 points)."""

ACCURACY_SLACK = 1e-9
"""Slack of the accuracy bar. Accuracies are ratios k / n of image counts, so two distinct
accuracies on up to 10^6 test images differ by at least 1e-6: a slack of 1e-9 admits only
rounding (of the order 1e-16) and never a truly lower accuracy."""

COMPARED_METHODS = tuple(m for m in METHODS if m != "baseline")
"""The methods compared against the baseline."""

_SETTING_FIELDS = (
    "dataset",
    "model",
    "train_subset",
    "test_subset",
    "eval_sigmas",
    "eval_samples",
    "batch_size",
    "lr",
    "patience",
    "seed",
    "epochs",
)


def setting_key(config: Mapping[str, Any], *, with_epochs: bool = True) -> tuple:
    """The fields that must agree for two runs to be compared (see the module docstring)."""
    fields = _SETTING_FIELDS if with_epochs else _SETTING_FIELDS[:-1]
    return tuple((f, config.get(f)) for f in fields)


def group_by_setting(
    records: Iterable[RunRecord], *, with_epochs: bool = True
) -> dict[tuple, list[RunRecord]]:
    """Records grouped by :func:`setting_key`, in the order the settings first appear."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(setting_key(r.config, with_epochs=with_epochs), []).append(r)
    return groups


@dataclass
class FairComparison:
    """The fair comparison of one setting (Figures 4 and 5 of the paper).

    ``qualifying[m]`` and ``best[m]`` exist for each method of :data:`COMPARED_METHODS`;
    ``flagged`` lists the runs left out of the choice for (nearly) constant predictions;
    ``comparisons`` holds paired intervals (filled by :func:`fair_comparison`).
    """

    setting: dict[str, Any]
    baseline: RunRecord
    tolerance: float
    threshold: float
    qualifying: dict[str, list[RunRecord]]
    best: dict[str, RunRecord | None]
    flagged: list[RunRecord] = field(default_factory=list)
    comparisons: dict[str, dict[str, Interval]] = field(default_factory=dict)

    def clears_bar(self, record: RunRecord) -> bool:
        """Accuracy at least ``threshold`` (within :data:`ACCURACY_SLACK`)."""
        return record.accuracy >= self.threshold - ACCURACY_SLACK

    def qualifies(self, record: RunRecord) -> bool:
        """Clears the accuracy bar and its predictions are not flagged as degenerate."""
        return self.clears_bar(record) and not record.degenerate

    @property
    def factor(self) -> float:
        """R(best moment) / R(best augment); nan when either method has no qualifying run."""
        m, a = self.best.get("moment"), self.best.get("augment")
        if m is None or a is None or a.robustness == 0:
            return math.nan
        return m.robustness / a.robustness


def fair_choice(
    records: Sequence[RunRecord], tolerance: float | None = None
) -> FairComparison | None:
    """The baseline, accuracy bar, qualifying runs and best run per method (no intervals).

    The rule is the module docstring's. ``tolerance`` (a fraction) defaults to
    :data:`DEFAULT_TOLERANCE` of the baseline's data set (0 for an unknown one).

    ``records`` are the runs of one setting (the report also passes all epoch caps of one
    setting together, for the compute figure).

    Returns:
        None when ``records`` hold no baseline-method run that is not flagged.

    Raises:
        ValueError: ``tolerance`` is not a finite fraction in [0, 1).
    """
    if tolerance is not None and not 0.0 <= float(tolerance) < 1.0:
        raise ValueError(f"fair_choice: tolerance must be a fraction in [0, 1), got {tolerance}")
    baselines = [r for r in records if r.method == "baseline" and not r.degenerate]
    if not baselines:
        return None
    baseline = min(baselines, key=lambda r: (-r.accuracy, r.run_id))
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(str(baseline.config.get("dataset")), 0.0)
    fc = FairComparison(
        setting=dict(setting_key(baseline.config)),
        baseline=baseline,
        tolerance=float(tolerance),
        threshold=baseline.accuracy - float(tolerance),
        qualifying={},
        best={},
        flagged=[r for r in records if r.degenerate],
    )
    for m in COMPARED_METHODS:
        fc.qualifying[m] = [r for r in records if r.method == m and fc.qualifies(r)]
        ranked = sorted(fc.qualifying[m], key=lambda r: (-r.robustness, -r.accuracy, r.run_id))
        fc.best[m] = ranked[0] if ranked else None
    return fc


def fair_comparison(
    records: Sequence[RunRecord],
    *,
    tolerance: float | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> FairComparison | None:
    """:func:`fair_choice` with paired bootstrap intervals between the chosen runs.

    The comparisons are keyed ``"moment vs augment"``, ``"moment vs baseline"`` and
    ``"augment vs baseline"`` (only those whose runs exist); each is
    :func:`~experiments.report.stats.compare_records` with ``n_boot``, ``level``, ``seed``.
    """
    fc = fair_choice(records, tolerance)
    if fc is None:
        return None
    for name, a, b in chosen_pairs(fc):
        fc.comparisons[name] = compare_records(a, b, n_boot=n_boot, level=level, seed=seed)
    return fc


def chosen_pairs(fc: FairComparison) -> list[tuple[str, RunRecord, RunRecord]]:
    """``(name, a, b)`` for ``"moment vs augment"``, ``"moment vs gaussian"``, and each
    method against the baseline (``"moment vs baseline"``, ...) between the chosen runs,
    leaving out a method with none."""
    pairs = [
        ("moment vs augment", fc.best.get("moment"), fc.best.get("augment")),
        ("moment vs gaussian", fc.best.get("moment"), fc.best.get("gaussian")),
    ]
    pairs += [(f"{m} vs baseline", fc.best.get(m), fc.baseline) for m in COMPARED_METHODS]
    return [(name, a, b) for name, a, b in pairs if a is not None and b is not None]


def noise_references(fc: FairComparison, records: Iterable[RunRecord]) -> dict[str, RunRecord]:
    """For ``"augment"`` and ``"gaussian"``: the fair comparison's best run of the method
    if one qualifies, else the method's most robust run without degenerate predictions
    (so that regularizer runs can be set against noise training even when no
    regularizer run, or no noise run, reaches the baseline's accuracy). Methods without
    runs are left out."""
    refs: dict[str, RunRecord] = {}
    for method in ("augment", "gaussian"):
        best = fc.best.get(method)
        if best is None:
            runs = [r for r in records if r.method == method and not r.degenerate]
            best = max(runs, key=lambda r: r.robustness, default=None)
        if best is not None:
            refs[method] = best
    return refs


def cost_table(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """Per method: number of runs and the median wall time, training time, epochs, steps.

    A median is nan when no run recorded the value.
    """
    by_method: dict[str, list[RunRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    rows = []
    for method in sorted(by_method, key=method_order):
        rs = by_method[method]

        def med(key: str, rs: list[RunRecord] = rs) -> float:
            vals = [float(r.results[key]) for r in rs if r.results.get(key) is not None]
            return statistics.median(vals) if vals else math.nan

        rows.append(
            {
                "method": method,
                "runs": len(rs),
                "wall_time_s": med("wall_time_s"),
                "train_time_s": med("train_time_s"),
                "epochs_run": med("epochs_run"),
                "gradient_steps": med("gradient_steps"),
                "total_wall_time_s": sum(float(r.results.get("wall_time_s") or 0) for r in rs),
            }
        )
    return rows


def read_matched(results_dir: str | Path) -> list[dict[str, Any]]:
    """The matched-compute pairs declared by the grid manifests below ``results_dir``."""
    pairs: list[dict[str, Any]] = []
    for manifest in sorted(Path(results_dir).rglob("grids/*.json")):
        obj = rundir.read_json(manifest)
        if obj is None:
            warnings.warn(f"skipping manifest {manifest}: unreadable", stacklevel=2)
            continue
        pairs += list(obj.get("matched", []))
    return pairs


def matched_pairs(
    records: Sequence[RunRecord],
    declared: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[tuple[RunRecord, RunRecord, Mapping[str, Any], dict[str, Interval]]]:
    """(run, reference, declaration, paired intervals) for each declared pair with results."""
    by_id = {r.run_id: r for r in records}
    out = []
    seen = set()
    for d in declared:
        key = (d["run_id"], d["reference_run_id"])
        a, b = by_id.get(key[0]), by_id.get(key[1])
        if a is None or b is None or key in seen:
            continue
        seen.add(key)
        out.append((a, b, d, compare_records(a, b, n_boot=n_boot, level=level, seed=seed)))
    return out
