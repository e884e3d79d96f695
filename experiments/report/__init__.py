"""Collect a grid's results and compare the training methods fairly, with uncertainty.

``python -m experiments report RESULTS_DIR`` reads every run folder below ``RESULTS_DIR``
and writes into ``--out`` (default ``RESULTS_DIR/report``): ``results.csv`` (one row per
run), PNG figures, ``summary.json`` and ``report.md``. The package has one module per job:

* :mod:`~experiments.report.records`: run folders -> :class:`RunRecord` (complete runs) and
  :class:`LeftOutRun` (failed, diverged or invalid); the flat results table;
* :mod:`~experiments.report.certificates`: a run's randomized-smoothing certificates
  (:class:`Certificate`, summary recomputed from the per-image radii);
* :mod:`~experiments.report.stats`: per-image robustness (Eq. 6) and paired bootstrap
  intervals (``scipy.stats.bootstrap`` with ``paired=True``), also of two runs' certified
  radii (:func:`compare_certificates`);
* :mod:`~experiments.report.compare`: settings, the fair-comparison rule
  (:func:`fair_choice`, the only place it is written), cost table, matched pairs;
* :mod:`~experiments.report.figures`: the PNG figures;
* :mod:`~experiments.report.mdtable`: markdown tables and run names;
* :mod:`~experiments.report.smoothing`: the certified-robustness section of the report;
* :mod:`~experiments.report.stepcost`: compute to convergence in plain-step equivalents
  from the training-step benchmark, and equal-compute pairs;
* :mod:`~experiments.report.seeds`: the seed-to-seed spread of runs repeated with other
  training seeds;
* :mod:`~experiments.report.surrogates`: the regularizer on whole-network moments against
  its twin with the paper's surrogate;
* :mod:`~experiments.report.markdown`: :func:`write_report`;
* :mod:`~experiments.report.cli`: the ``report`` command (:func:`register`).
"""

from experiments.report.certificates import CERTIFIED_RADII, Certificate, load_certificates
from experiments.report.cli import register
from experiments.report.compare import (
    ACCURACY_SLACK,
    DEFAULT_TOLERANCE,
    FairComparison,
    cost_table,
    fair_choice,
    fair_comparison,
    group_by_setting,
    matched_pairs,
    read_matched,
    setting_key,
)
from experiments.report.markdown import write_report
from experiments.report.records import (
    CERTIFIED_COLUMNS,
    TABLE_COLUMNS,
    LeftOutRun,
    RunRecord,
    collect_results,
    collect_runs,
    results_table,
    write_csv,
)
from experiments.report.stats import (
    Interval,
    compare_certificates,
    compare_records,
    paired_bootstrap,
    per_image_robustness,
    trapezoid_weights,
)

__all__ = [
    "ACCURACY_SLACK",
    "CERTIFIED_COLUMNS",
    "CERTIFIED_RADII",
    "DEFAULT_TOLERANCE",
    "TABLE_COLUMNS",
    "Certificate",
    "FairComparison",
    "Interval",
    "LeftOutRun",
    "RunRecord",
    "collect_results",
    "collect_runs",
    "compare_certificates",
    "compare_records",
    "cost_table",
    "fair_choice",
    "fair_comparison",
    "group_by_setting",
    "load_certificates",
    "matched_pairs",
    "paired_bootstrap",
    "per_image_robustness",
    "read_matched",
    "register",
    "results_table",
    "setting_key",
    "trapezoid_weights",
    "write_csv",
    "write_report",
]
