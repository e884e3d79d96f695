"""Command line of the experiments: ``python -m experiments <command> ...``.

Every command lives in a module with ``register(subparsers)``, which adds its parser and
sets ``func`` (``handler(args) -> exit code``); this module only lists them in
:data:`REGISTRARS`. Commands: ``train`` and ``evaluate`` (:mod:`experiments.commands`),
``demo`` (:mod:`experiments.demo`), ``grid`` (:mod:`experiments.grid_cli`), ``report``.

Exit codes: 0 success; 1 a run failed (a diverged ``train``, failed runs of a
``grid run``); 2 an error the user can fix (missing data, a bad option, an unusable
device, an unreadable checkpoint), printed as one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from experiments import certify, commands, demo, grid_cli
from experiments.checkpoints import CheckpointError
from experiments.cli import apply_runtime_args
from experiments.data import DatasetNotFoundError
from experiments.report import cli as report_cli
from experiments.rundir import package_version
from experiments.training import RunDiverged

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    commands.register,
    demo.register,
    grid_cli.register,
    report_cli.register,
    certify.register,
]
"""Functions that each add one command (or a group of commands) to the parser."""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments`` parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="momentkit experiments: Gaussian-robust training with the analytic "
        "moment regularizer, noisy augmentation and baselines.",
    )
    parser.add_argument("--version", action="version", version=package_version())
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; see the module docstring for exit codes."""
    args = build_parser().parse_args(argv)
    try:
        apply_runtime_args(args)
        return int(args.func(args) or 0)
    except RunDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DatasetNotFoundError, CheckpointError, FileNotFoundError, ImportError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
