"""Markdown building blocks shared by the sections of ``report.md``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from experiments.report.records import RunRecord, method_order

__all__ = ["FLAG", "by_method", "md_table", "run_name"]

FLAG = "**[degenerate predictions]**"
"""Mark of a run whose predictions are flagged as (nearly) constant."""


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats with 4 significant digits, ``None`` as an empty cell."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_name(r: RunRecord) -> str:
    """The run's label, with :data:`FLAG` when its predictions are flagged."""
    return f"{r.label()} {FLAG}" if r.degenerate else r.label()


def by_method(records: Iterable[RunRecord]) -> list[RunRecord]:
    """Records sorted by method (:func:`~experiments.report.records.method_order`), label, id."""
    return sorted(records, key=lambda r: (method_order(r.method), r.label(), r.run_id))
