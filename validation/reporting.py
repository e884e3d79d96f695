"""Shared plumbing of the validation suites: configuration, output files, progress.

Every suite writes three files into the output folder: ``<suite>.csv`` (rows of
results, preceded by ``# key: value`` comment lines that record the configuration,
the package version and the seed; read it with ``pandas.read_csv(path, comment="#")``),
``<suite>.png`` (a figure) and ``<suite>.md`` (a short summary).
"""

from __future__ import annotations

import csv
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from experiments.rundir import package_version

T = TypeVar("T")


@dataclass(frozen=True)
class SuiteConfig:
    """What every suite receives from the command line."""

    out_dir: Path
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    data_root: Path | None = None
    progress: bool = True

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class SuiteReport:
    """Rows, configuration and summary lines of one suite, and where they were written."""

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    figure: Any = None  # a matplotlib Figure
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def progress(
    items: Iterable[T], cfg: SuiteConfig, desc: str, total: int | None = None
) -> Iterator[T]:
    """A tqdm progress bar on stderr (off with ``cfg.progress = False``)."""
    return iter(
        tqdm(
            items,
            desc=desc,
            total=total,
            disable=not cfg.progress,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
    )


def header(cfg: SuiteConfig, suite: str, config: dict[str, Any]) -> dict[str, Any]:
    run = {k: str(v) for k, v in asdict(cfg).items() if k != "progress"}
    return {
        "suite": suite,
        "momentkit_version": package_version(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **run,
        **{k: v for k, v in config.items()},
    }


def write_report(cfg: SuiteConfig, report: SuiteReport) -> SuiteReport:
    """Write ``<name>.csv``, ``<name>.png`` and ``<name>.md`` into ``cfg.out_dir``."""
    import matplotlib.pyplot as plt

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    meta = header(cfg, report.name, report.config)
    csv_path = cfg.out_dir / f"{report.name}.csv"
    columns: list[str] = []
    for row in report.rows:
        columns.extend(k for k in row if k not in columns)
    with csv_path.open("w", newline="") as fh:
        for key, value in meta.items():
            fh.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    report.paths["csv"] = csv_path
    if report.figure is not None:
        png_path = cfg.out_dir / f"{report.name}.png"
        report.figure.savefig(png_path, dpi=120, bbox_inches="tight")
        plt.close(report.figure)
        report.paths["png"] = png_path
    md_path = cfg.out_dir / f"{report.name}.md"
    lines = [f"# Validation suite `{report.name}`", ""]
    lines += [
        f"momentkit {meta['momentkit_version']}, torch {meta['torch_version']}, seed {cfg.seed}, "
        f"device {cfg.device}, {'quick' if cfg.quick else 'full'} run, "
        f"{report.seconds:.1f} s; data: `{csv_path.name}`, figure: `{report.name}.png`.",
        "",
    ]
    lines += report.summary
    md_path.write_text("\n".join(lines) + "\n")
    report.paths["md"] = md_path
    return report


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"{float(value):.6g}"
    return value


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """A small markdown table of ``columns`` of ``rows`` (floats to 3 significant digits)."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return out
