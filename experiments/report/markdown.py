"""``report.md``, ``results.csv`` and ``summary.json`` of a results directory.

:func:`write_report` loads the runs (:mod:`~experiments.report.records`), groups them by
setting and writes, per setting: the run table and Figure 3, the fair comparison (Figures
4 and 5, :func:`~experiments.report.compare.fair_comparison`) with paired intervals, every
run against the baseline, every whole-network regularizer run against its twin with the
paper's surrogate (:func:`~experiments.report.surrogates.surrogate_section`), the
certified robustness of the runs that hold randomized-smoothing certificates
(:func:`~experiments.report.smoothing.certified_section`) and the training cost (with
step costs: the compute to convergence,
:func:`~experiments.report.stepcost.convergence_section`); per setting without the seed:
the seed-to-seed spread of runs repeated with other training seeds
(:func:`~experiments.report.seeds.seeds_section`); per setting without the epoch cap:
robustness against compute and the declared matched-compute pairs; at the end the runs
left out (failed, diverged or invalid results) with the reason. Runs whose predictions are
flagged as (nearly) constant are marked wherever they appear and never chosen as a
method's best.

``summary.json`` holds ``settings`` (the fair comparison per setting), ``certified`` (per
setting with certificates: each run's recomputed certificate summary per certification
sigma, the figure files and the paired ACR comparisons), ``seeds`` (per setting with
repeated runs: spread, bars against each baseline seed, the fair comparison at each
seed, Welch and paired-by-seed intervals) and ``left_out``.
It is strict JSON: a number that is not finite (a factor with no qualifying run, a ratio
interval with R = 0) is written as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from experiments import rundir
from experiments.report.compare import (
    DEFAULT_TOLERANCE,
    FairComparison,
    cost_table,
    fair_choice,
    fair_comparison,
    group_by_setting,
    matched_pairs,
    noise_references,
    read_matched,
)
from experiments.report.figures import (
    figure_slug,
    plot_accuracy_robustness,
    plot_compute,
    plot_fair,
)
from experiments.report.mdtable import FLAG, by_method, md_table, run_name
from experiments.report.records import (
    LeftOutRun,
    RunRecord,
    collect_runs,
    results_table,
    write_csv,
)
from experiments.report.seeds import seeds_section, setting_without_seed
from experiments.report.smoothing import certified_section
from experiments.report.stats import (
    BOOTSTRAP_METHOD,
    Interval,
    compare_records,
    finite_or_none,
    intervals_json,
)
from experiments.report.stepcost import convergence_rows, convergence_section
from experiments.report.surrogates import surrogate_section

__all__ = ["write_report"]

def _train_s(r: RunRecord) -> float:
    v = r.results.get("train_time_s")
    return float(v) if v is not None else math.nan


def _run_row(r: RunRecord) -> list[Any]:
    return [
        run_name(r),
        f"{r.accuracy:.4f}",
        f"{r.robustness:.4f}",
        r.results.get("epochs_run"),
        r.results.get("gradient_steps"),
        f"{_train_s(r):.1f}",
        r.run_id,
    ]


_RUN_HEADER = ("run", "accuracy", "R", "epochs run", "grad. steps", "train s", "run id")


def _flag_note(records: Sequence[RunRecord]) -> list[str]:
    flagged = [r for r in records if r.degenerate]
    if not flagged:
        return []
    fractions = ", ".join(
        f"{r.run_id}: {r.top_class_fraction:.3f}" if r.top_class_fraction is not None else r.run_id
        for r in flagged
    )
    return [
        f"{FLAG}: one class gets nearly all test predictions (top-class fraction {fractions}). "
        "Eq. 6 scores a constant classifier as perfectly robust, so these runs are never "
        "chosen by the fair comparison.",
        "",
    ]


def _comparison_lines(name: str, iv: Mapping[str, Interval]) -> list[str]:
    pct = iv["accuracy_diff"]
    return [
        f"- **{name}**: robustness difference {iv['robustness_diff'].fmt(4)}, "
        f"ratio {iv['robustness_ratio'].fmt(3)}, accuracy difference "
        f"{pct.fmt(2, pct=True)} points "
        f"({int(round(100 * iv['robustness_ratio'].level))}% paired bootstrap over test images)",
    ]


def _qualifies_cell(fc: FairComparison, r: RunRecord) -> str:
    if r.degenerate:
        return "no (degenerate predictions)"
    return "yes" if fc.qualifies(r) else "no"


def _against_baseline(
    fc: FairComparison, records: Sequence[RunRecord], *, n_boot: int, level: float, seed: int
) -> str:
    """Markdown table: each run's accuracy and robustness differences to the baseline."""
    rows = []
    for r in by_method(r for r in records if r.run_id != fc.baseline.run_id):
        iv = compare_records(r, fc.baseline, n_boot=n_boot, level=level, seed=seed)
        rows.append(
            [
                run_name(r),
                f"{r.accuracy:.4f}",
                iv["accuracy_diff"].fmt(2, pct=True),
                f"{r.robustness:.4f}",
                iv["robustness_diff"].fmt(4),
                iv["robustness_ratio"].fmt(3),
                _qualifies_cell(fc, r),
            ]
        )
    header = ("run", "accuracy", "acc. - baseline (points)", "R", "R - baseline", "R / baseline")
    return md_table(header + ("qualifies",), rows)


def _against_noise(fc: FairComparison, records: Sequence[RunRecord], boot: dict) -> list[str]:
    """Each regularizer run against the reference augmentation and Gaussian runs
    (:func:`~experiments.report.compare.noise_references`), paired, whatever the
    accuracies: the factor of the paper's comparison even where no run qualifies."""
    refs = noise_references(fc, records)
    moments = [r for r in by_method(records) if r.method == "moment"]
    if not refs or not moments:
        return []
    rows = []
    for m in moments:
        for ref in refs.values():
            iv = compare_records(m, ref, **boot)
            rows.append(
                [
                    run_name(m),
                    run_name(ref) + ("" if fc.qualifies(ref) else " (does not qualify)"),
                    iv["accuracy_diff"].fmt(2, pct=True),
                    iv["robustness_diff"].fmt(4),
                    iv["robustness_ratio"].fmt(3),
                ]
            )
    header = ("regularizer run", "against", "acc. difference (points)", "R difference",
              "R ratio")
    return [
        "Every regularizer run against the best noise-training runs (the best qualifying "
        "run of each method, else its most robust run), paired, whatever the accuracies:",
        "",
        md_table(header, rows),
        "",
    ]


def _fair_section(
    fc: FairComparison | None, recs: Sequence[RunRecord], out: Path, title: str, boot: dict
) -> tuple[list[str], dict[str, Any] | None]:
    """The fair-comparison markdown of one setting and its ``summary.json`` entry."""
    md = ["### Fair comparison (Figures 4 and 5)", ""]
    if fc is None:
        md += ["No baseline run with unflagged predictions in this setting: no fair comparison."]
        md += [""]
        return md, None
    fig = plot_fair(fc, out / f"fair_{figure_slug(fc.setting)}.png", title)
    md += [
        f"Baseline accuracy {fc.baseline.accuracy:.4f}, tolerance "
        f"{100 * fc.tolerance:.2f} points: runs with accuracy >= {fc.threshold:.4f} "
        f"qualify ({len(fc.qualifying['augment'])} augmentation, "
        f"{len(fc.qualifying['moment'])} regularizer, "
        f"{len(fc.qualifying['gaussian'])} Gaussian noise training).",
        "",
    ]
    if fc.flagged:
        ids = ", ".join(r.run_id for r in fc.flagged)
        md += [f"Left out of the choice for degenerate predictions: {ids}.", ""]
    md += [
        f"![fair comparison]({fig.name})",
        "",
        md_table(
            ("method",) + _RUN_HEADER,
            [["baseline"] + _run_row(fc.baseline)]
            + [
                [f"best {m}"] + (_run_row(r) if r else ["none qualifies"] + [""] * 6)
                for m, r in fc.best.items()
            ],
        ),
        "",
        f"Factor R(best moment) / R(best augment) = {fc.factor:.4f}.",
        "",
    ]
    for name, iv in fc.comparisons.items():
        md += _comparison_lines(name, iv)
    md += ["", "Every run against the baseline (paired intervals):", ""]
    md += [_against_baseline(fc, recs, **boot), ""]
    md += _against_noise(fc, recs, boot)
    summary = {
        "setting": fc.setting,
        "baseline": fc.baseline.run_id,
        "threshold": fc.threshold,
        "best": {m: (r.run_id if r else None) for m, r in fc.best.items()},
        "flagged": [r.run_id for r in fc.flagged],
        "factor": finite_or_none(fc.factor),
        "comparisons": {n: intervals_json(iv) for n, iv in fc.comparisons.items()},
    }
    return md, summary


def _cost_section(recs: Sequence[RunRecord]) -> list[str]:
    header = ("method", "runs", "median wall s", "median train s", "median epochs")
    header += ("median grad. steps", "total wall s")
    keys = ("method", "runs", "wall_time_s", "train_time_s", "epochs_run", "gradient_steps")
    keys += ("total_wall_time_s",)
    table = md_table(header, ([c[k] for k in keys] for c in cost_table(recs)))
    return ["### Training cost per method", "", table, ""]


def _setting_section(
    setting: dict[str, Any],
    recs: Sequence[RunRecord],
    out: Path,
    tolerance: float,
    boot: dict,
    costs: Mapping[int, Mapping[str, float]] | None = None,
) -> tuple[list[str], dict[str, Any] | None, dict[str, Any] | None]:
    """Markdown of one setting, its fair-comparison and its certified ``summary.json`` entries."""
    title = (
        f"{setting['model']} on {setting['dataset']} (train subset {setting['train_subset']}, "
        f"test subset {setting['test_subset']}, epochs {setting['epochs']}, "
        f"seed {setting['seed']})"
    )
    fig_path = out / f"accuracy_robustness_{figure_slug(setting)}.png"
    fig = plot_accuracy_robustness(recs, fig_path, title)
    md = [f"## {title}", "", "### Accuracy and robustness against training sigma (Figure 3)", ""]
    md += [f"![accuracy and robustness]({fig.name})", ""]
    md += [md_table(_RUN_HEADER, (_run_row(r) for r in by_method(recs))), ""]
    md += _flag_note(recs)
    fc = fair_comparison(recs, tolerance=tolerance, **boot)
    fair_md, summary = _fair_section(fc, recs, out, title, boot)
    cert_md, certified = certified_section(setting, recs, fc, out, title, boot)
    md += fair_md + surrogate_section(recs, boot) + cert_md + _cost_section(recs)
    md += convergence_section(recs, costs, boot)
    return md, summary, certified


def _matched_section(
    setting: dict[str, Any],
    recs: Sequence[RunRecord],
    declared: Sequence[Mapping[str, Any]],
    out: Path,
    tolerance: float,
    boot: dict,
    costs: Mapping[int, Mapping[str, float]] | None = None,
) -> list[str]:
    """Robustness against compute for all epoch caps of a setting (against plain-step
    equivalents too, with step ``costs``), and its matched pairs."""
    pairs = matched_pairs(recs, declared, **boot)
    plain = None
    if costs is not None:
        plain = {row["record"].run_id: row["plain_steps"] for row in convergence_rows(recs, costs)
                 if row["plain_steps"] is not None}
    where = (
        f"{setting['model']} on {setting['dataset']} (train subset {setting['train_subset']}, "
        f"test subset {setting['test_subset']}, seed {setting['seed']}, all epoch caps)"
    )
    slug = figure_slug({**setting, "epochs": None})
    fig = plot_compute(recs, fair_choice(recs, tolerance), out / f"compute_{slug}.png",
                       f"{where}: robustness against compute", plain)
    md = [f"## Matched compute: {where}", ""]
    md += [f"![robustness against compute]({fig.name})", ""]
    if not pairs:
        return md + ["No matched-compute pairs declared for this setting.", ""]
    header = ("run", "reference", "matched by", "acc run / ref", "R run / ref")
    header += ("grad. steps run / ref", "train s run / ref")
    rows = (
        [
            f"{run_name(a)} ({a.config['epochs']} ep)",
            f"{run_name(b)} ({b.config['epochs']} ep)",
            d["by"],
            f"{a.accuracy:.4f} / {b.accuracy:.4f}",
            f"{a.robustness:.4f} / {b.robustness:.4f}",
            f"{a.results.get('gradient_steps')} / {b.results.get('gradient_steps')}",
            f"{_train_s(a):.1f} / {_train_s(b):.1f}",
        ]
        for a, b, d, _ in pairs
    )
    md += [md_table(header, rows), ""]
    for a, b, _, iv in pairs:
        md += _comparison_lines(f"{a.label()} vs {b.label()} (matched compute)", iv)
    return md + [""]


def _left_out_section(left_out: Sequence[LeftOutRun]) -> list[str]:
    md = ["## Runs left out", ""]
    if not left_out:
        return md + ["None: every run folder holds complete, finite results.", ""]
    md += [
        f"Run folders in no table above: {len(left_out)}. They failed or diverged (an "
        "`error.json` and no complete results) or their results are not finite.",
        "",
    ]
    rows = (
        [r.run_id, r.label, r.kind, "" if r.epoch is None else r.epoch, r.error.replace("|", "/")]
        for r in left_out
    )
    return md + [md_table(("run id", "run", "kind", "epoch", "error"), rows), ""]


def write_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    tolerances: Mapping[str, float] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    step_costs: Mapping[int, Mapping[str, float]] | None = None,
) -> Path:
    """Write ``results.csv``, the figures, ``summary.json`` and ``report.md`` for every run
    below ``results_dir`` into ``out_dir`` (default ``RESULTS_DIR/report``).

    ``tolerances`` override :data:`~experiments.report.compare.DEFAULT_TOLERANCE` per data
    set; ``n_boot``, ``level`` and ``seed`` are those of every paired bootstrap;
    ``step_costs`` (:func:`~experiments.report.stepcost.read_step_costs`) add each
    setting's compute to convergence.

    Returns the path of ``report.md``.

    Raises:
        FileNotFoundError: ``results_dir`` missing.
        ValueError: no complete run below it.
    """
    root = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else root / "report"
    records, left_out = collect_runs(root)
    if not records:
        raise ValueError(
            f"no finished run (results.json + per_image.npz) below {root}"
            + (f" ({len(left_out)} failed or diverged)" if left_out else "")
        )
    out.mkdir(parents=True, exist_ok=True)
    tol = {**DEFAULT_TOLERANCE, **(tolerances or {})}
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    version = rundir.package_version()
    header = [
        f"momentkit {version} report of {root} at {stamp}",
        f"{len(records)} runs ({len(left_out)} left out); tolerances {tol}; "
        f"bootstrap {BOOTSTRAP_METHOD} n={n_boot} level={level} seed={seed}",
    ]
    write_csv(results_table(records), out / "results.csv", header)
    md = [
        "# Robustness comparison report",
        "",
        f"Generated by `python -m experiments report {root}` (momentkit {version}, {stamp}).",
        f"{len(records)} finished runs; full table: [results.csv](results.csv). "
        f"Run folders left out: {len(left_out)} (see the last section).",
        "Robustness R is the area under the Eq. 6 curve divided by the sigma range; intervals are "
        f"{int(round(100 * level))}% paired {BOOTSTRAP_METHOD} bootstrap intervals over test "
        f"images ({n_boot} resamples, seed {seed}). They reflect test-set sampling only, not "
        "training seed variation.",
        "",
    ]
    summary: dict[str, Any] = {"header": header, "settings": [], "certified": []}
    for key, recs in group_by_setting(records).items():
        setting = dict(key)
        section, entry, certified = _setting_section(
            setting, recs, out, tol.get(str(setting["dataset"]), 0.0), boot, step_costs
        )
        md += section
        if entry is not None:
            summary["settings"].append(entry)
        if certified is not None:
            summary["certified"].append(certified)
    summary["seeds"] = []
    by_setting: dict[tuple, list[RunRecord]] = {}
    for r in records:  # settings up to the seed
        by_setting.setdefault(setting_without_seed(r.config), []).append(r)
    for key, recs in by_setting.items():
        setting = dict(key)
        seed_md, seed_entry = seeds_section(
            setting, recs, tol.get(str(setting["dataset"]), 0.0), level
        )
        md += seed_md
        if seed_entry is not None:
            summary["seeds"].append(seed_entry)
    declared = read_matched(root)
    for key, recs in group_by_setting(records, with_epochs=False).items():
        setting = dict(key)
        md += _matched_section(
            setting, recs, declared, out, tol.get(str(setting["dataset"]), 0.0), boot,
            step_costs,
        )
    md += _left_out_section(left_out)
    summary["left_out"] = [
        {"run_id": r.run_id, "path": str(r.path), "kind": r.kind, "epoch": r.epoch}
        | {"error": r.error}
        for r in left_out
    ]
    rundir.write_json_atomic(out / "summary.json", summary)
    path = out / "report.md"
    rundir.write_text_atomic(path, "\n".join(md) + "\n")
    return path
