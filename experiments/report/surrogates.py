"""The regularizer on whole-network moments against the paper's surrogate.

A regularizer run with ``moments="network"`` (the output mean of ``network_moments``) is
set against its *twin*: the run with the paper's first-ReLU surrogate at the same alpha
and sigma in the same setting. :func:`surrogate_pairs` finds the twins and
:func:`surrogate_section` writes the paired comparison of ``report.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from experiments.report.mdtable import md_table, run_name
from experiments.report.records import RunRecord, surrogate_of
from experiments.report.stats import compare_records

__all__ = ["surrogate_pairs", "surrogate_section"]


def surrogate_pairs(records: Iterable[RunRecord]) -> list[tuple[RunRecord, RunRecord]]:
    """``(network run, first_relu twin)`` for every regularizer run on whole-network
    moments that has a run with the paper's surrogate at the same alpha and sigma among
    ``records`` (the runs of one setting), by label; runs without a twin are left out."""
    moments = [r for r in records if r.method == "moment"]
    twins = {
        (r.config.get("alpha"), r.config.get("sigma")): r
        for r in sorted(moments, key=lambda r: r.run_id, reverse=True)
        if surrogate_of(r.config) == "first_relu"
    }
    pairs = []
    for r in sorted(moments, key=lambda r: (r.label(), r.run_id)):
        twin = twins.get((r.config.get("alpha"), r.config.get("sigma")))
        if surrogate_of(r.config) == "network" and twin is not None:
            pairs.append((r, twin))
    return pairs


def surrogate_section(recs: Sequence[RunRecord], boot: dict) -> list[str]:
    """Every whole-network regularizer run against its twin with the paper's surrogate
    (:func:`surrogate_pairs`), paired; nothing without one."""
    pairs = surrogate_pairs(recs)
    if not pairs:
        return []
    rows = []
    for net, twin in pairs:
        iv = compare_records(net, twin, **boot)
        rows.append(
            [
                run_name(net),
                run_name(twin),
                f"{net.accuracy:.4f} / {twin.accuracy:.4f}",
                iv["accuracy_diff"].fmt(2, pct=True),
                f"{net.robustness:.4f} / {twin.robustness:.4f}",
                iv["robustness_diff"].fmt(4),
                iv["robustness_ratio"].fmt(3),
            ]
        )
    header = ("whole-network run", "first-ReLU twin", "accuracy net. / twin",
              "acc. difference (points)", "R net. / twin", "R difference", "R ratio")
    return [
        "### Whole-network moments against the paper's surrogate",
        "",
        'Every regularizer run on whole-network moments (`moments="network"`) against the '
        "run with the paper's first-ReLU surrogate at the same alpha and sigma, paired "
        "(network minus twin):",
        "",
        md_table(header, rows),
        "",
    ]
