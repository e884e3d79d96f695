"""Helpers shared by the ``python -m experiments`` sub-commands."""

from __future__ import annotations

import argparse
from typing import Any


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--data-root``, ``--no-progress``, ``--threads``: shared by all commands."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding the data sets (default: $MOMENTKIT_DATA, else ./data)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is often faster on a "
        "machine whose cores are busy with other work",
    )


def apply_runtime_args(args: argparse.Namespace) -> None:
    """Act on the runtime arguments that change process state (``--threads``)."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def format_robustness(results: dict[str, Any]) -> str:
    """``auc [ci_low, ci_high]`` of a results dict's ``robustness`` entry, for printing."""
    rob = results["robustness"]
    return f"{rob['auc']:.4f} [{rob['ci'][0]:.4f}, {rob['ci'][1]:.4f}]"
