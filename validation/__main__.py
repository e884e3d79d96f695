"""``python -m validation [SUITE ...] [--quick] [--device D] [--seed S] [--out DIR]``.

Runs the named suites (all four when none is named) and writes each suite's CSV,
PNG and markdown summary into ``--out`` (default ``out/validation``). See
``docs/validation.md`` for what each suite measures and how to read its output.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from experiments.data import resolve_data_root
from validation.reporting import SuiteConfig, SuiteReport, write_report

SuiteRunner = Callable[[SuiteConfig], SuiteReport]


def suite_runner(name: str) -> SuiteRunner:
    """The ``run`` function of ``validation.suite_<name>`` (imported on demand)."""
    return importlib.import_module(f"validation.suite_{name}").run


SUITE_NAMES = ("shallow", "deep", "covariance", "cost")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m validation",
        description="Check momentkit's analytic moments against independent references.",
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run, any of {', '.join(SUITE_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small grids: every suite in under two minutes on 2 CPU cores",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device for module evaluations (cpu, cuda, cuda:1, ...)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/validation"),
        help="output folder (default: out/validation)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="dataset root for the 'deep' suite (default: $MOMENTKIT_DATA, else ./data; "
        "without MNIST there the suite uses synthetic digits and says so)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    for name in args.suites:
        if name not in SUITE_NAMES:
            parser.error(f"unknown suite {name!r}; choose from {', '.join(SUITE_NAMES)}")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        print(f"--device {args.device!r} is not usable here: {exc}", file=sys.stderr)
        return 2
    cfg = SuiteConfig(
        out_dir=args.out,
        quick=args.quick,
        device=args.device,
        seed=args.seed,
        data_root=resolve_data_root(args.data_root),
        progress=not args.no_progress,
    )
    total = time.perf_counter()
    for name in args.suites or SUITE_NAMES:
        report = write_report(cfg, suite_runner(name)(cfg))
        first = report.summary[0] if report.summary else ""
        print(f"[{name}] {report.seconds:.1f} s -> {report.paths['md']}\n  {first}")
    print(f"total {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
