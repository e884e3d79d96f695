"""The ``report`` command: ``python -m experiments report RESULTS_DIR [options]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from experiments.cli import add_runtime_args
from experiments.report.markdown import write_report
from experiments.report.stepcost import read_step_costs

__all__ = ["register"]


def parse_tolerances(items: Sequence[str]) -> dict[str, float]:
    """``["cifar10=0.0039", ...]`` -> ``{"cifar10": 0.0039}``.

    Raises:
        ValueError: an item is not ``DATASET=FRACTION`` with a finite fraction in [0, 1).
    """
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            fraction = float(value)
            if not 0.0 <= fraction < 1.0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--tolerance expects DATASET=FRACTION with 0 <= FRACTION < 1 "
                f"(e.g. cifar10=0.0039), got {item!r}"
            ) from None
        out[name.strip()] = fraction
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    if args.bootstrap < 10:
        raise ValueError(f"--bootstrap must be at least 10, got {args.bootstrap}")
    if not 0.0 < args.level < 1.0:
        raise ValueError(f"--level must be in (0, 1), got {args.level}")
    path = write_report(
        args.results_dir,
        args.out,
        tolerances=parse_tolerances(args.tolerance),
        n_boot=args.bootstrap,
        level=args.level,
        seed=args.seed,
        step_costs=None if args.step_costs is None else read_step_costs(args.step_costs),
    )
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` command (tables, fair comparison, figures, report.md)."""
    p = subparsers.add_parser(
        "report",
        help="tables, fair comparison, figures and report.md",
        description="Read every run folder below RESULTS_DIR and write results.csv, "
        "summary.json, PNG figures and report.md into --out. Failed or diverged runs are "
        "left out of every table and listed at the end of report.md.",
    )
    p.add_argument("results_dir", help="directory holding run folders (searched recursively)")
    p.add_argument("--out", default=None, help="default: RESULTS_DIR/report")
    p.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="DATASET=FRACTION",
        help="accuracy tolerance of the fair comparison (default mnist=0, cifar10=0.0039, "
        "cifar100=0.0075)",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="confidence level")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--step-costs",
        default=None,
        metavar="FILE",
        help="JSON of benchmarks/bench_train_step.py: adds each run's compute to "
        "convergence in plain-step equivalents and equal-compute pairs",
    )
    add_runtime_args(p, device=False, data_root=False)
    p.set_defaults(func=_cmd_report)
