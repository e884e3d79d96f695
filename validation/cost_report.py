"""The ``cost`` suite's report: the frontier summary and the figure of its rows
(:mod:`validation.suite_cost` computes the rows)."""

from __future__ import annotations

import math

from validation.reporting import markdown_table


def _frontier_summary(rows: list[dict], verdicts: list[dict]) -> list[str]:
    first = rows[0]
    lines = [
        f"Accuracy against time on the {first['network']}, {first['points']} test "
        f"image(s) of {first.get('data', 'MNIST')}: errors against a long Monte Carlo run "
        f"of {first['reference_samples']} "
        "samples per sigma_x (its own relative standard error: the `ref. se` columns, "
        "normwise for the mean, sqrt(2/(N-1)) for a variance). Mean error: "
        "||m - m_ref|| / ||m_ref||; variance error: median |v - v_ref| / v_ref over the "
        "outputs.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            {
                "sigma_x": f"{r['sigma']:g}",
                "method": r["estimator"] + (f" {r['samples']:g}" if r["samples"] else ""),
                "seconds": r.get("seconds", r["status"].split(":")[0]),
                "mean error": r.get("mean_err", ""),
                "variance error": r.get("var_err", ""),
                "ref. se (mean / var)": f"{r['reference_mean_rel_stderr']:.1e} / "
                f"{r['reference_var_rel_stderr']:.1e}",
            }
        )
    lines += markdown_table(
        table,
        ["sigma_x", "method", "seconds", "mean error", "variance error", "ref. se (mean / var)"],
    )
    reasons = {r["estimator"]: r["status"] for r in rows if r["status"] != "ok"}
    lines += ["", *[f"- {k}: {v}" for k, v in reasons.items()]]
    lines += [
        "",
        f'Default mode (`covariance="auto"` = {verdicts[0]["mode"]}) against Monte Carlo '
        "given the same wall time (Monte Carlo's error interpolated in log-log between its "
        "measured points; `extrap.`: outside them, scaled as time^-1/2; `unresolved`: both "
        "errors below three reference standard errors):",
        "",
    ]

    def word(v: dict, key: str) -> str:
        better = v[f"{key}_auto_better"]
        text = "unresolved" if better is None else ("**yes**" if better else "no")
        return text + (" (extrap.)" if v[f"{key}_extrapolated"] else "")

    table = [
        {
            "sigma_x": f"{v['sigma']:g}",
            "auto seconds": v["seconds"],
            "auto mean err": v["mean_err_auto"],
            "MC mean err, same time": v["mean_err_mc_same_time"],
            "auto better (mean)": word(v, "mean_err"),
            "auto var err": v["var_err_auto"],
            "MC var err, same time": v["var_err_mc_same_time"],
            "auto better (variance)": word(v, "var_err"),
        }
        for v in verdicts
    ]
    lines += markdown_table(table, list(table[0]))
    return lines


def _figure(rows: list[dict], g: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frontier = [r for r in rows if "reference_samples" in r]
    sigmas = list(dict.fromkeys(r["sigma"] for r in frontier))
    cols = max(2, len(sigmas))
    fig = plt.figure(figsize=(4 * cols, 4.5 + (7 if sigmas else 0)))
    grid_spec = fig.add_gridspec(3 if sigmas else 1, 2 * cols)
    ax1 = fig.add_subplot(grid_spec[0, :cols])
    ax2 = fig.add_subplot(grid_spec[0, cols:])
    for i, key in enumerate(("mean_err", "var_err")):
        for j, sigma in enumerate(sigmas):
            ax = fig.add_subplot(grid_spec[1 + i, 2 * j : 2 * j + 2])
            sel = [r for r in frontier if r["sigma"] == sigma and r["status"] == "ok"]
            mc = [r for r in sel if r["estimator"] == "monte_carlo"]
            ax.loglog([r["seconds"] for r in mc], [r[key] for r in mc], "k.-", label="Monte Carlo")
            for r in mc:
                ax.annotate(f"{r['samples']:.0e}", (r["seconds"], r[key]), fontsize=6)
            for k, r in enumerate(x for x in sel if x["estimator"] != "monte_carlo"):
                if math.isfinite(r[key]):
                    ax.loglog(
                        r["seconds"], max(r[key], 1e-12), "o", color=f"C{k}", label=r["estimator"]
                    )
            floor = sel[0]["reference_mean_rel_stderr" if i == 0 else "reference_var_rel_stderr"]
            ax.axhline(floor, color="grey", ls=":", label="reference stderr")
            ax.set_title(
                f"sigma_x = {sigma:g}: {'mean' if i == 0 else 'variance'} error", fontsize=9
            )
            ax.set_xlabel("seconds")
            if j == 0:
                ax.set_ylabel("relative error vs long Monte Carlo")
                ax.legend(fontsize=6)
    for net, ax in zip(
        [
            n
            for n in dict.fromkeys(r["network"] for r in rows)
            if "reference_samples" not in next(r for r in rows if r["network"] == n)
        ],
        (ax1, ax2),
        strict=False,
    ):
        sel = [r for r in rows if r["network"] == net]
        for k, est in enumerate(dict.fromkeys(r["estimator"] for r in sel)):
            pts = [r for r in sel if r["estimator"] == est]
            acc = [
                r.get("max_stderr_mean", r.get("max_abs_err_mean", float("nan"))) or 1e-16
                for r in pts
            ]
            acc = [max(a, 1e-16) for a in acc]
            ax.loglog([r["seconds"] for r in pts], acc, "o-", color=f"C{k}", label=est)
            for r, a in zip(pts, acc, strict=True):
                ax.annotate(
                    f"{r['peak_mib']:.0f} MiB",
                    (r["seconds"], a),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axhline(g["target"], color="k", ls=":", label=f"target {g['target']:g}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("error (exact) or standard error (Monte Carlo)")
        ax.set_title(net)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
