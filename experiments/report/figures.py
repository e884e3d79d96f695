"""Figures of the report (PNG, drawn with matplotlib's object API, no display needed).

* :func:`plot_accuracy_robustness`: the paper's Figure 3;
* :func:`plot_fair`: Figures 4 and 5 (robustness curves and R with intervals);
* :func:`plot_compute`: R against training time and gradient steps;
* :func:`plot_certified`: certified accuracy against radius (randomized smoothing).

Runs whose predictions are flagged as (nearly) constant are drawn with an ``x`` marker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.config import METHODS
from experiments.report.certificates import Certificate
from experiments.report.compare import COMPARED_METHODS, FairComparison
from experiments.report.records import RunRecord, method_order, surrogate_of
from experiments.report.stats import Interval

__all__ = [
    "certified_curve_points",
    "figure_slug",
    "figure3_lines",
    "plot_accuracy_robustness",
    "plot_certified",
    "plot_compute",
    "plot_fair",
]

_COLORS = {"baseline": "black", "augment": "tab:blue", "moment": "tab:red", "gaussian": "tab:green"}


def figure_slug(setting: Mapping[str, Any]) -> str:
    """File-name part for a setting, e.g. ``lenet-mnist-n500-e3-s0``."""
    parts = [str(setting["model"]), str(setting["dataset"])]
    if setting.get("train_subset"):
        parts.append(f"n{setting['train_subset']}")
    if setting.get("epochs") is not None:
        parts.append(f"e{setting['epochs']}")
    parts.append(f"s{setting.get('seed', 0)}")
    return "-".join(parts)


def _shade(cmap_name: str, i: int, n: int) -> Any:
    from matplotlib import colormaps

    return colormaps[cmap_name](0.45 + 0.55 * (i + 1) / max(n, 1))


def _mark_flagged(ax: Any, records: Sequence[RunRecord], attr: str) -> None:
    flagged = [r for r in records if r.degenerate and r.method != "baseline"]
    if flagged:
        ax.scatter(
            [float(r.config["sigma"]) for r in flagged],
            [getattr(r, attr) for r in flagged],
            marker="x",
            s=80,
            color="k",
            zorder=5,
            label="degenerate predictions",
        )


def figure3_lines(records: Sequence[RunRecord]) -> list[tuple[str, str, list[RunRecord]]]:
    """The lines of Figure 3, in drawing order: ``(method, label, runs by sigma)``, one per
    augmentation level, per regularizer alpha and surrogate (runs on whole-network moments
    never share a line with the paper's ``first_relu`` surrogate) and one for Gaussian
    noise training."""
    lines: dict[tuple[str, float, str], list[RunRecord]] = {}
    for r in records:
        if r.method == "augment":
            key = ("augment", float(r.config["folds"]), "")
        elif r.method == "moment":
            network = surrogate_of(r.config) == "network"
            key = ("moment", float(r.config["alpha"]), " network" if network else "")
        elif r.method == "gaussian":
            key = ("gaussian", 0.0, "")
        else:
            continue
        lines.setdefault(key, []).append(r)
    names = {
        "augment": lambda k: f"augment N~={k[1]:g}",
        "moment": lambda k: f"moment{k[2]} alpha={k[1]:g}",
        "gaussian": lambda k: "gaussian",
    }
    return [
        (k[0], names[k[0]](k), sorted(lines[k], key=lambda r: float(r.config["sigma"])))
        for k in sorted(lines, key=lambda k: (method_order(k[0]), k[2], k[1]))
    ]


def plot_accuracy_robustness(records: Sequence[RunRecord], path: Path, title: str) -> Path:
    """Figure 3: clean accuracy and robustness R against training sigma, one line per
    :func:`figure3_lines` (whole-network regularizer lines dashed); the baseline as a
    dashed horizontal line; runs with degenerate predictions also marked with a cross."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    lines = figure3_lines(records)
    styles = {"augment": ("Blues", "o"), "moment": ("Reds", "s"), "gaussian": ("Greens", "^")}
    for ax, attr, ylabel in (
        (axes[0], "accuracy", "clean test accuracy"),
        (axes[1], "robustness", "robustness R (Eq. 6)"),
    ):
        for method, (cmap, marker) in styles.items():
            family = [(label, rs) for m, label, rs in lines if m == method]
            for i, (label, rs) in enumerate(family):
                ax.plot(
                    [float(r.config["sigma"]) for r in rs],
                    [getattr(r, attr) for r in rs],
                    marker=marker,
                    ls="--" if " network" in label else "-",
                    color=_shade(cmap, i, len(family)),
                    label=label,
                )
        _mark_flagged(ax, records, attr)
        for r in records:
            if r.method == "baseline":
                ax.axhline(getattr(r, attr), color="black", ls="--", lw=1, label="baseline")
        ax.set_xscale("log")
        train_sigmas = sorted({float(r.config["sigma"]) for r in records if r.method != "baseline"})
        if train_sigmas:
            ax.set_xticks(train_sigmas, [f"{s:g}" for s in train_sigmas])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training sigma_x")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _single_ci(fc: FairComparison, method: str) -> Interval | None:
    """The interval of one chosen run's R, taken from a comparison that involves it."""
    for name, ivs in fc.comparisons.items():
        a, _, b = name.split(" ")
        if a == method:
            return ivs["robustness_a"]
        if b == method:
            return ivs["robustness_b"]
    return None


def plot_fair(fc: FairComparison, path: Path, title: str) -> Path:
    """Figures 4/5: robustness curves of the baseline and each method's best qualifying run,
    and their R with bootstrap intervals."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_curve, ax_bar = fig.subplots(1, 2)
    entries = [("baseline", fc.baseline)] + [(m, fc.best[m]) for m in COMPARED_METHODS]
    names, values, errs, colors = [], [], [[], []], []
    for method, rec in entries:
        if rec is None:
            continue
        ax_curve.plot(
            rec.sigmas,
            rec.results["robustness"]["curve"],
            color=_COLORS[method],
            label=f"{rec.label()} (acc {rec.accuracy:.4f}, R {rec.robustness:.3f})",
        )
        ci = _single_ci(fc, method)
        names.append(method if method == "baseline" else rec.label().replace(" sigma", "\nsigma"))
        values.append(rec.robustness)
        errs[0].append(rec.robustness - ci.low if ci else 0.0)
        errs[1].append(ci.high - rec.robustness if ci else 0.0)
        colors.append(_COLORS[method])
    level = next(iter(fc.comparisons.values()))["robustness_a"].level if fc.comparisons else 0.95
    ax_curve.set_xlabel("test noise sigma")
    ax_curve.set_ylabel("fraction of predictions unchanged")
    ax_curve.legend(fontsize=7)
    ax_curve.grid(alpha=0.3)
    ax_bar.bar(range(len(values)), values, yerr=errs, color=colors, capsize=6)
    ax_bar.set_xticks(range(len(values)), names, fontsize=7)
    ax_bar.set_ylabel(f"robustness R, {round(100 * level)}% paired-bootstrap CI")
    ax_bar.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_compute(
    records: Sequence[RunRecord],
    choice: FairComparison | None,
    path: Path,
    title: str,
    plain_steps: Mapping[str, float] | None = None,
) -> Path:
    """Robustness R against training time and against gradient steps, per method; hollow
    markers: runs that do not qualify under ``choice`` (below the accuracy bar, or flagged
    predictions); all filled when ``choice`` is None (no baseline).

    With ``plain_steps`` (run id to plain-step equivalents: gradient steps times the cost
    of the run's kind of step, :mod:`~experiments.report.stepcost`), a third panel shows R
    against that, the one compute axis on which methods with steps of different cost
    compare fairly; runs without an entry are left out of that panel only.
    """
    from matplotlib.figure import Figure

    panels: list[tuple[str, Callable[[RunRecord], Any]]] = [
        ("training time (s)", lambda r: r.results.get("train_time_s")),
        ("gradient steps", lambda r: r.results.get("gradient_steps")),
    ]
    if plain_steps is not None:
        panels.append(("plain-step equivalents", lambda r: plain_steps.get(r.run_id)))
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (xlabel, x_of) in zip(axes, panels, strict=True):
        for method in METHODS:
            rs = [r for r in records if r.method == method and x_of(r)]
            ok = [r for r in rs if choice is None or choice.qualifies(r)]
            bad = [r for r in rs if r not in ok]
            ax.scatter(
                [x_of(r) for r in ok],
                [r.robustness for r in ok],
                color=_COLORS[method],
                label=method,
            )
            ax.scatter(
                [x_of(r) for r in bad],
                [r.robustness for r in bad],
                facecolors="none",
                edgecolors=_COLORS[method],
                label=f"{method} (not qualifying)" if bad else None,
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robustness R")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def certified_curve_points(cert: Certificate, points: int = 501) -> tuple[np.ndarray, np.ndarray]:
    """``(radii, accuracy)`` of the certified-accuracy curve, exact at every point.

    ``radii`` is a grid of ``points`` radii from 0 to 1.05 times the largest certified
    radius, joined with every distinct radius of a correct image (where the step function
    jumps); ``accuracy`` is :meth:`Certificate.curve` there. The curve is constant on each
    ``(radii[k-1], radii[k]]``, so drawing it with ``drawstyle="steps-pre"`` is exact.
    """
    good = cert.radius[cert.correct]
    top = float(good.max()) if good.size else 0.0
    radii = np.union1d(np.linspace(0.0, max(1.05 * top, 1e-3), points), good)
    return radii, cert.curve(radii)


def plot_certified(
    certified: Sequence[tuple[RunRecord, Certificate]], path: Path, title: str
) -> Path:
    """Certified accuracy against radius, one step curve per (run, certificate); the
    legend gives each run's ACR, certified images and ``n``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for rec, cert in certified:
        radii, acc = certified_curve_points(cert)
        ax.plot(
            radii,
            acc,
            drawstyle="steps-pre",
            color=_COLORS.get(rec.method),
            ls="-" if rec.method != "augment" else "--",
            label=f"{rec.label()} (ACR {cert.acr:.3f}, {cert.n_images} images, n={cert.n})",
        )
    ax.set_xlabel("radius (pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)
    return path
