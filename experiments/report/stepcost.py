"""Compute to convergence: every run's training in plain-step equivalents.

With early stopping each run decides its own budget (it stops when its validation loss
stops improving), so methods are not compared at equal compute by construction. To compare
them at equal compute after the fact, each run's gradient steps are put in one unit: the
training step of the baseline (plain cross entropy) at the same batch size. How much one
step of each method costs against a plain step is measured by
``benchmarks/bench_train_step.py`` (steps of every method interleaved round by round on the
same machine, so that load hits all alike); the report reads that benchmark's JSON
(``python -m experiments report DIR --step-costs FILE``) and takes, per method and batch
size, the median of the per-round ratios to plain.

* :func:`read_step_costs`: the benchmark JSON -> ``{batch size: {method: ratio}}``;
* :func:`convergence_rows`: per run, epochs, gradient steps, the ratio and the
  plain-step equivalents (``gradient_steps * ratio``; an N-fold augmentation run's
  ``gradient_steps`` already count its N passes);
* :func:`equal_compute_pairs`: each regularizer run beside the noise-training run
  (augmentation or Gaussian noise training) whose compute is closest to its own, when
  within :data:`EQUAL_COMPUTE_SPAN`, with paired intervals;
* :func:`convergence_section`: the markdown of both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import rundir
from experiments.config import PRESETS
from experiments.report.mdtable import md_table, run_name
from experiments.report.records import RunRecord, surrogate_of
from experiments.report.stats import Interval, compare_records

__all__ = [
    "EQUAL_COMPUTE_SPAN",
    "batch_size",
    "bench_method",
    "convergence_rows",
    "convergence_section",
    "equal_compute_pairs",
    "read_step_costs",
]

EQUAL_COMPUTE_SPAN = 1.25
"""Two runs are paired at equal compute when their plain-step equivalents differ by at most
this factor either way."""

_BENCH_METHODS = ("moment", "augment", "gaussian", "moment_network")


def bench_method(config: Mapping[str, Any]) -> str:
    """The benchmark's name for a run's kind of training step (``plain`` for the baseline)."""
    method = config.get("method")
    if method == "baseline":
        return "plain"
    if method == "moment" and surrogate_of(config) == "network":
        return "moment_network"
    return str(method)


def batch_size(config: Mapping[str, Any]) -> int | None:
    """The batch size a run trained with (its own, else its model's Table 1 preset)."""
    if config.get("batch_size") is not None:
        return int(config["batch_size"])
    preset = PRESETS.get(str(config.get("model")))
    return None if preset is None else int(preset.batch_size)


def read_step_costs(path: str | Path) -> dict[int, dict[str, float]]:
    """Step cost relative to a plain step, per batch size and method, from a
    ``bench_train_step.py`` JSON (``plain`` is 1; the median of the per-round ratios).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not that benchmark's JSON or holds a ratio that is not a
            positive finite number.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"read_step_costs: no benchmark JSON at {p}")
    obj = rundir.read_json(p)
    by_size = (obj or {}).get("results", {}).get("results_by_batch_size")
    if not isinstance(by_size, Mapping) or not by_size:
        raise ValueError(
            f"read_step_costs: {p} is not a benchmarks/bench_train_step.py result "
            "(no results.results_by_batch_size)"
        )
    costs: dict[int, dict[str, float]] = {}
    for size, res in by_size.items():
        costs[int(size)] = {"plain": 1.0}
        for m in _BENCH_METHODS:
            key = f"step_ratio_{m}_over_plain_median_of_rounds"
            if key not in res:
                continue
            ratio = float(res[key])
            if not (math.isfinite(ratio) and ratio > 0):
                raise ValueError(f"read_step_costs: {p}: {key} at batch {size} is {ratio}")
            costs[int(size)][m] = ratio
    return costs


def convergence_rows(
    records: Sequence[RunRecord], costs: Mapping[int, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """One row per run, by increasing plain-step equivalents (runs whose step cost was not
    measured last, with ``step_cost`` and ``plain_steps`` ``None``)."""
    rows = []
    for r in records:
        ratio = costs.get(batch_size(r.config) or 0, {}).get(bench_method(r.config))
        steps = r.results.get("gradient_steps")
        plain = None if ratio is None or steps is None else float(steps) * ratio
        rows.append({
            "record": r,
            "epochs_run": r.results.get("epochs_run"),
            "best_epoch": r.results.get("best_epoch"),
            "gradient_steps": steps,
            "step_cost": ratio,
            "plain_steps": plain,
            "train_time_s": r.results.get("train_time_s"),
        })
    return sorted(rows, key=lambda d: (d["plain_steps"] is None, d["plain_steps"] or 0.0))


def equal_compute_pairs(
    rows: Sequence[Mapping[str, Any]], *, n_boot: int, level: float, seed: int
) -> list[tuple[Mapping[str, Any], Mapping[str, Any], dict[str, Interval]]]:
    """``(regularizer row, noise-training row, paired intervals)``: for every regularizer
    run (by label), the augmentation or Gaussian noise-training run of closest compute, if
    within :data:`EQUAL_COMPUTE_SPAN` of its own (flagged runs are never paired)."""
    measured = [d for d in rows if d["plain_steps"] and not d["record"].degenerate]
    noise = [d for d in measured if d["record"].method in ("augment", "gaussian")]
    pairs = []
    regularized = [d for d in measured if d["record"].method == "moment"]
    for d in sorted(regularized, key=lambda d: (d["record"].label(), d["record"].run_id)):
        best = min(noise, key=lambda e: abs(math.log(e["plain_steps"] / d["plain_steps"])),
                   default=None)
        if best is None or not (
            1 / EQUAL_COMPUTE_SPAN <= best["plain_steps"] / d["plain_steps"] <= EQUAL_COMPUTE_SPAN
        ):
            continue
        iv = compare_records(d["record"], best["record"], n_boot=n_boot, level=level, seed=seed)
        pairs.append((d, best, iv))
    return pairs


def convergence_section(
    records: Sequence[RunRecord],
    costs: Mapping[int, Mapping[str, float]] | None,
    boot: Mapping[str, Any],
) -> list[str]:
    """Markdown: compute to convergence of every run, and the equal-compute pairs; nothing
    without step costs."""
    if costs is None:
        return []
    rows = convergence_rows(records, costs)
    md = [
        "### Compute to convergence (plain-step equivalents)",
        "",
        "Each run's gradient steps times the cost of its kind of step relative to a plain "
        "step of the same batch size (benchmark median of interleaved per-round ratios). "
        "Runs stop early on their validation loss, so this is the compute each method "
        "chose; the model evaluated is the one of the best epoch.",
        "",
    ]

    def num(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    table = (
        [run_name(d["record"]), f"{d['epochs_run']} ({d['best_epoch']})",
         d["gradient_steps"], num(d["step_cost"], ".2f"), num(d["plain_steps"], ".0f"),
         num(d["train_time_s"], ".0f"), f"{d['record'].accuracy:.4f}",
         f"{d['record'].robustness:.4f}"]
        for d in rows
    )
    header = ("run", "epochs (best)", "grad. steps", "step cost / plain",
              "plain-step equivalents", "train s", "accuracy", "R")
    md += [md_table(header, table), ""]
    missing = sorted({(batch_size(d["record"].config), bench_method(d["record"].config))
                      for d in rows if d["step_cost"] is None}, key=str)
    if missing:
        md += ["Step cost not in the benchmark for (batch size, step): "
               + ", ".join(f"({b}, {m})" for b, m in missing) + ".", ""]
    pairs = equal_compute_pairs(rows, **boot)
    md += [f"Every regularizer run beside the noise-training run of closest compute (within a "
           f"factor {EQUAL_COMPUTE_SPAN:g}):", ""]
    if not pairs:
        return md + ["No such pair.", ""]
    table = (
        [run_name(d["record"]), run_name(e["record"]),
         f"{e['plain_steps'] / d['plain_steps']:.2f}",
         f"{d['record'].accuracy:.4f} / {e['record'].accuracy:.4f}",
         iv["accuracy_diff"].fmt(2, pct=True),
         f"{d['record'].robustness:.4f} / {e['record'].robustness:.4f}",
         iv["robustness_ratio"].fmt(3)]
        for d, e, iv in pairs
    )
    header = ("regularizer run", "noise-training run", "compute noise / reg.",
              "accuracy reg. / noise", "acc. diff (points)", "R reg. / noise", "R ratio")
    return md + [md_table(header, table), ""]
