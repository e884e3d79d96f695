"""The ``deep`` suite's report: the small-ResNet goal, the summary tables and the figure
of its rows (:mod:`validation.suite_deep` computes the rows)."""

from __future__ import annotations

import math
from typing import Any

from validation.reporting import markdown_table

#: The small ResNet's goal for the default mode at ``sigma_x = 0.1``: normwise mean
#: error (every image) and median variance error against Monte Carlo.
RESNET_GOAL = {"sigma": 0.1, "mean_err": 0.02, "var_err": 0.25}


def _pick(rows, **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def resnet_goal(rows: list[dict]) -> dict[str, Any]:
    """The small ResNet's goal (``RESNET_GOAL``) for its default mode, per weights:
    the measured errors, the Monte Carlo floors and ``met`` (``None`` when the grid has
    no ResNet at that ``sigma_x``)."""
    out: dict[str, Any] = {}
    for weights in ("random", "trained"):
        sel = _pick(rows, network="resnet", weights=weights, sigma=RESNET_GOAL["sigma"])
        if not sel:
            out[weights] = {"met": None}
            continue
        mode = sel[0]["default_mode"]
        r = _pick(sel, estimator=f"nm_{mode}")[0]
        if r["status"] != "ok":
            out[weights] = {"met": False, "mode": mode, "status": r["status"]}
            continue
        out[weights] = {
            "mode": mode,
            "mean_err_max": r["rel_err_max"],
            "var_err_median": r["var_err_median"],
            "mc_mean_floor": r["mc_rel_stderr_median"],
            "mc_var_floor": r["mc_var_rel_stderr"],
            "mc_samples": r["mc_samples"],
            "met": bool(
                r["rel_err_max"] <= RESNET_GOAL["mean_err"]
                and r["var_err_median"] <= RESNET_GOAL["var_err"]
            ),
        }
    return out


METHODS = ("surrogate", "linearization_last", "nm_diagonal", "nm_factor", "nm_full")


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    mean = (
        f"{r['rel_err_median']:.1e}" if r["resolved"] else f"<{3 * r['mc_rel_stderr_median']:.0e}"
    )
    if math.isnan(r["var_err_median"]):
        return mean
    return f"{mean} / {100 * r['var_err_median']:.3g}%"


def _summary(rows, g, datasets, identity, accuracy) -> list[str]:
    nets = list(dict.fromkeys(r["network"] for r in rows))
    sources = "; ".join(d.source for d in datasets.values())
    lines = [
        f"Analytic moments against Monte Carlo on {g['points']} test images per network; "
        f"data: {sources}.",
        "",
        "- relu_index=0 identity (linearization mean vs surrogate): largest relative "
        f"difference {max(identity) if identity else float('nan'):.1e} over the sequential "
        "networks (float64).",
        "- trained test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()),
        '- default mode (`covariance="auto"`): '
        + ", ".join(f"{n} {_pick(rows, network=n)[0]['default_mode']}" for n in nets),
        "",
    ]
    for d in datasets.values():
        if d.synthetic:
            lines.insert(0, f"**Note: {d.source}: trained networks used synthetic images.**\n")
    shown = [s for s in g["sigmas"] if s in (1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0)]
    table = []
    for weights in ("random", "trained"):
        for net in nets:
            row = {"network": net, "weights": weights}
            for s in shown:
                match = _pick(rows, network=net, weights=weights, sigma=s, estimator="surrogate")
                if match and match[0]["status"] == "ok":
                    row[f"{s:g}"] = _cell(match[0])
                elif match:
                    row[f"{s:g}"] = "refused"
            table.append(row)
    lines += [
        "Surrogate, median relative error by sigma_x (`<e`: below the Monte Carlo resolution e):",
        "",
        *markdown_table(table, ["network", "weights", *[f"{s:g}" for s in shown]]),
        "",
        "Every method: median mean error / median variance error (`<e`: mean error below "
        "the Monte Carlo resolution e; the variance resolution is the last column):",
        "",
    ]
    table = []
    for net in nets:
        for weights in ("random", "trained"):
            for s in g["sigmas"]:
                sel = _pick(rows, network=net, weights=weights, sigma=s)
                if not sel:
                    continue
                row = {"network": net, "weights": weights, "sigma_x": f"{s:g}"}
                for m in METHODS:
                    match = _pick(sel, estimator=m)
                    row[m] = _cell(match[0]) if match else ""
                row["MC var res."] = f"{100 * sel[0]['mc_var_rel_stderr']:.2g}%"
                table.append(row)
    lines += [*markdown_table(table, ["network", "weights", "sigma_x", *METHODS, "MC var res."])]
    reasons = {}
    for r in rows:
        if r["status"] != "ok":
            reasons.setdefault((r["network"], r["estimator"]), r["status"])
    if reasons:
        lines += ["", "Refused or skipped:", ""]
        lines += [f"- {net}, {est}: {why}" for (net, est), why in reasons.items()]
    table = []
    for net in nets:
        for weights in ("random", "trained"):
            sel = _pick(rows, network=net, weights=weights)
            row = {"network": net, "weights": weights}
            for m in (*METHODS, "monte_carlo"):
                t = [r["seconds"] for r in _pick(sel, estimator=m) if r["status"] == "ok"]
                row[m] = f"{sorted(t)[len(t) // 2]:.3g}" if t else ""
            row["MC samples"] = str(sel[0]["mc_samples"])
            table.append(row)
    lines += [
        "",
        f"Seconds per call for the {g['points']} images (median over sigma_x; wall clock on "
        "the machine that ran the suite, interleaved):",
        "",
        *markdown_table(table, ["network", "weights", *METHODS, "monte_carlo", "MC samples"]),
        "",
    ]
    goal = resnet_goal(rows)
    lines += [
        f"Small ResNet goal at sigma_x = {RESNET_GOAL['sigma']:g}, default mode: mean error "
        f"at most {100 * RESNET_GOAL['mean_err']:g}% on every image and median variance "
        f"error at most {100 * RESNET_GOAL['var_err']:g}%:",
        "",
    ]
    for weights, v in goal.items():
        if v["met"] is None:
            lines.append(f"- {weights}: not measured (no ResNet at this sigma_x in the grid)")
        elif "status" in v:
            lines.append(f"- {weights}: **missed**: mode {v['mode']} {v['status']}")
        else:
            lines.append(
                f"- {weights} ({v['mode']}): mean error {100 * v['mean_err_max']:.3g}% "
                f"(largest over images), variance error {100 * v['var_err_median']:.3g}%: "
                f"**{'met' if v['met'] else 'missed'}**. Monte Carlo floor "
                f"({v['mc_samples']} samples): {100 * v['mc_mean_floor']:.2g}% (mean), "
                f"{100 * v['mc_var_floor']:.2g}% (variance)."
            )
    breaks = []
    for weights in ("random", "trained"):
        for net in nets:
            sel = sorted(
                _pick(rows, network=net, weights=weights, estimator="surrogate", status="ok"),
                key=lambda r: r["sigma"],
            )
            if not sel:
                continue
            bad = [r["sigma"] for r in sel if r["resolved"] and r["rel_err_median"] > 0.1]
            breaks.append(
                f"{net}/{weights}: "
                + (
                    f"above 10% from sigma_x = {bad[0]:g}"
                    if bad
                    else "within 10% over the whole range"
                )
            )
    lines += [
        "",
        "Where the surrogate breaks (median relative error above 10%):",
        "",
        *[f"- {b}" for b in breaks],
    ]
    lin = _pick(rows, estimator="linearization_last", status="ok")
    if lin:
        better = sum(
            1
            for r in lin
            for s in _pick(
                rows,
                network=r["network"],
                weights=r["weights"],
                sigma=r["sigma"],
                estimator="surrogate",
                status="ok",
            )
            if r["rel_err_median"] < s["rel_err_median"]
        )
        lines += [
            "",
            f"Linearization around the last ReLU beats the surrogate in {better} of "
            f"{len(lin)} (network, weights, sigma) cells.",
        ]
    return lines


def _figure(rows, g):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(
        4, len(nets), figsize=(3.6 * len(nets), 12), sharex=True, squeeze=False
    )
    styles = {
        "surrogate": "C0o-",
        "linearization_last": "C1s-",
        "nm_diagonal": "C3v-",
        "nm_factor": "C4D-",
        "nm_full": "C5P-",
        "plug_in": "C2^--",
    }
    for i, (weights, key, floor_key, what) in enumerate(
        [
            ("random", "rel_err_median", "mc_rel_stderr_median", "mean"),
            ("trained", "rel_err_median", "mc_rel_stderr_median", "mean"),
            ("random", "var_err_median", "mc_var_rel_stderr", "variance"),
            ("trained", "var_err_median", "mc_var_rel_stderr", "variance"),
        ]
    ):
        for j, net in enumerate(nets):
            ax = axes[i, j]
            sel = _pick(rows, network=net, weights=weights, status="ok")
            for est, style in styles.items():
                pts = sorted(
                    (r for r in sel if r["estimator"] == est and not math.isnan(r[key])),
                    key=lambda r: r["sigma"],
                )
                if pts:
                    ax.plot(
                        [r["sigma"] for r in pts],
                        [max(r[key], 1e-12) for r in pts],
                        style,
                        ms=4,
                        label=est,
                    )
            floor = sorted(_pick(sel, estimator="monte_carlo"), key=lambda r: r["sigma"])
            if floor:
                ax.fill_between(
                    [r["sigma"] for r in floor],
                    1e-12,
                    [3 * r[floor_key] for r in floor],
                    color="grey",
                    alpha=0.3,
                    label="MC resolution (3 se)",
                )
                ax.set_ylim(bottom=max(1e-9, min(3 * r[floor_key] for r in floor) / 10))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{net}, {weights}: {what}", fontsize=9)
            if i == 3:
                ax.set_xlabel("sigma_x (pixel units)")
            if j == 0:
                ax.set_ylabel(f"relative {what} error vs MC")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig
