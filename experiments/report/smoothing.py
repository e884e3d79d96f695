"""The "Certified robustness (randomized smoothing)" section of ``report.md``.

For the runs of one setting that hold certificates
(:mod:`~experiments.report.certificates`), :func:`certified_section` writes:

* a table, one row per run and certification sigma: the certified accuracy at the radii of
  :data:`~experiments.report.certificates.CERTIFIED_RADII`, the ACR, the abstention rate,
  the number of certified images and ``n``, side by side with the run's clean accuracy and
  Eq. 6 robustness R;
* per certification sigma, a figure of certified accuracy against radius
  (``certified_<setting>-cs<sigma>.png``): every certified run when at most
  :data:`MAX_CURVES` are, otherwise the fair comparison's chosen runs (the baseline and each
  method's best) that are certified;
* per certification sigma, paired bootstrap intervals of the ACR difference between the
  chosen runs (:func:`~experiments.report.stats.compare_certificates`), where both runs
  certified the same images (at least 2) at the same sigma, n and alpha.

A setting whose runs hold no certificates gets no section.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.report.certificates import CERTIFIED_RADII, Certificate
from experiments.report.compare import FairComparison, chosen_pairs
from experiments.report.figures import figure_slug, plot_certified
from experiments.report.mdtable import by_method, md_table, run_name
from experiments.report.records import RunRecord
from experiments.report.stats import (
    Interval,
    certificates_comparable,
    compare_certificates,
    intervals_json,
)

__all__ = ["MAX_CURVES", "certified_section", "curve_runs"]

MAX_CURVES = 6
"""Up to this many certified runs per sigma, the figure draws them all."""

_HEADER = ("run", "cert. sigma", "images", "n", "alpha")
_HEADER += tuple(f"cert. acc. r={r:g}" for r in CERTIFIED_RADII)
_HEADER += ("ACR", "abstain", "clean acc.", "R (Eq. 6)", "run id")


def _row(r: RunRecord, c: Certificate) -> list[Any]:
    return (
        [run_name(r), f"{c.sigma:g}", c.n_images, c.n, f"{c.alpha:g}"]
        + [f"{a:.4f}" for a in c.curve(CERTIFIED_RADII)]
        + [f"{c.acr:.4f}", f"{c.abstain_rate:.4f}", f"{r.accuracy:.4f}", f"{r.robustness:.4f}"]
        + [r.run_id]
    )


def _entry(r: RunRecord, c: Certificate) -> dict[str, Any]:
    """The ``summary.json`` entry of one run's certificates (strict JSON)."""
    return {
        "run_id": r.run_id,
        "run": r.label(),
        "sigma": c.sigma,
        "n0": c.n0,
        "n": c.n,
        "alpha": c.alpha,
        **c.summary(),
        "test_accuracy": r.accuracy,
        "robustness": r.robustness,
    }


def curve_runs(
    certified: Sequence[tuple[RunRecord, Certificate]], fc: FairComparison | None
) -> list[tuple[RunRecord, Certificate]]:
    """The (run, certificate) pairs drawn in one sigma's figure (see the module docstring)."""
    if len(certified) <= MAX_CURVES or fc is None:
        return list(certified)
    chosen = {fc.baseline.run_id} | {r.run_id for r in fc.best.values() if r is not None}
    return [(r, c) for r, c in certified if r.run_id in chosen] or list(certified)


def _comparison_line(name: str, sigma: float, n: int, iv: Mapping[str, Interval]) -> str:
    acc = iv["certified_accuracy_diff"]
    return (
        f"- **{name}** at sigma {sigma:g}: ACR difference {iv['acr_diff'].fmt(4)}, ratio "
        f"{iv['acr_ratio'].fmt(3)}, certified accuracy (radius 0) difference "
        f"{acc.fmt(2, pct=True)} points ({round(100 * acc.level)}% paired bootstrap over "
        f"the {n} certified images)"
    )


def certified_section(
    setting: Mapping[str, Any],
    recs: Sequence[RunRecord],
    fc: FairComparison | None,
    out: Path,
    title: str,
    boot: Mapping[str, Any],
) -> tuple[list[str], dict[str, Any] | None]:
    """The section's markdown lines and its ``summary.json`` entry (``[]``, ``None`` when no
    run of the setting holds certificates). ``boot`` holds ``n_boot``, ``level``, ``seed``."""
    certified = [(r, c) for r in by_method(recs) for c in r.certificates]
    if not certified:
        return [], None
    md = [
        "### Certified robustness (randomized smoothing)",
        "",
        "Certificates of the smoothed classifier (Cohen et al. 2019, "
        "`python -m experiments certify`), recomputed from the per-image radii: certified "
        "accuracy at radius r is the fraction of images classified correctly with a "
        "certified radius >= r (abstentions count as errors); ACR is the mean certified "
        "radius (0 for wrong or abstained images). Clean accuracy and R (Eq. 6) are those "
        "of the same run, for comparison.",
        "",
        md_table(_HEADER, (_row(r, c) for r, c in certified)),
        "",
    ]
    entry: dict[str, Any] = {
        "setting": dict(setting),
        "runs": [_entry(r, c) for r, c in certified],
        "figures": [],
        "comparisons": [],
    }
    for sigma in sorted({c.sigma for _, c in certified}):
        at_sigma = [(r, c) for r, c in certified if c.sigma == sigma]
        drawn = curve_runs(at_sigma, fc)
        name = f"certified_{figure_slug(setting)}-cs{sigma:g}.png"
        fig = plot_certified(drawn, out / name, f"{title}\ncertification sigma {sigma:g}")
        entry["figures"].append(fig.name)
        md += [f"![certified accuracy against radius, sigma {sigma:g}]({fig.name})", ""]
        certs = {r.run_id: c for r, c in at_sigma}
        pairs = [
            (pair, a, b, certs[a.run_id], certs[b.run_id])
            for pair, a, b in (chosen_pairs(fc) if fc is not None else [])
            if a.run_id in certs and b.run_id in certs
        ]
        if not pairs:
            md += [f"No paired comparison at sigma {sigma:g}: no two of the fair comparison's "
                   "chosen runs are certified at it.", ""]
            continue
        for pair, a, b, ca, cb in pairs:
            if not certificates_comparable(ca, cb) or ca.n_images < 2:
                md += [f"- **{pair}** at sigma {sigma:g}: not compared (the runs were not "
                       "certified on the same images, at least 2, with the same n and alpha)"]
                continue
            iv = compare_certificates(ca, cb, **boot)
            md += [_comparison_line(pair, sigma, ca.n_images, iv)]
            entry["comparisons"].append(
                {
                    "sigma": sigma,
                    "name": pair,
                    "a": a.run_id,
                    "b": b.run_id,
                    "intervals": intervals_json(iv),
                }
            )
        md += [""]
    return md, entry
