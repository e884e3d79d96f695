"""Suite ``deep``: how good are the analytic moments of deep networks, and where do
they break.

Networks, each with random weights (PyTorch's default initialization; BatchNorm running
statistics from forward passes over training images) and trained weights (a short Adam
run on a few thousand images; synthetic images when the data set is missing, which
every output then says): MLPs with one and three hidden layers, a LeNet-shaped network
(the paper's LeNet at full width), the same LeNet with 2x2 average pools in place of
its max-pools, a small ResNet with BatchNorm (:func:`validation.networks.small_resnet`)
and, in full runs, the paper's AlexNet on 32x32 CIFAR-10 images. For each noise level
``sigma_x`` (pixel units, 1e-3 to 20), these estimates of the output's mean and
variance under ``n ~ N(0, sigma_x^2 I)`` are compared with Monte Carlo:

- ``surrogate``: ``Omega(mu3)`` of the regularizer
  (:func:`momentkit.regularizer.expected_prediction`), mean only; for the first ReLU it
  is also the two-stage linearization's mean (the identity is re-checked here);
- ``linearization_last``: the two-stage linearization around the last ReLU
  (:func:`momentkit.references.linearization.two_stage_linearization`), mean only, for
  sequential networks with more than one ReLU;
- ``nm_diagonal``, ``nm_factor``, ``nm_full``: :func:`momentkit.network_moments` in
  each of its modes (mean and variance); a mode that ``network_moments`` refuses, or
  one the grid skips for time, is a row that says why. ``default_mode`` names the mode
  that ``covariance="auto"`` picks for the network;
- ``plug_in``: the noise-free output ``Phi(x)``, the baseline that ignores the noise;
- ``monte_carlo``: the reference itself (its time and resolution).

Monte Carlo is plain sampling (:func:`~momentkit.references.montecarlo.monte_carlo_moments`);
antithetic pairs would resolve far smaller errors at small ``sigma_x``, but their
standard error misses kinks that no sample crosses, so they are not used for a
verdict. Mean error: ``||m - m_mc|| / ||m_mc||`` over the logits of one image (median
and maximum over the images), next to the Monte Carlo resolution
``||stderr|| / ||m_mc||``. Variance error: the median of ``|v - v_mc| / v_mc`` over
outputs and images, next to its resolution ``sqrt(2 / (N - 1))`` (the relative standard
error of a sample variance of ``N`` Gaussian values). Seconds: wall clock of each call
for the batch of images, interleaved in one loop.

The small ResNet's goal (``RESNET_GOAL``) is checked at ``sigma_x = 0.1`` for the
default mode with random and trained weights.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import nn

from momentkit import network_moments
from momentkit.errors import MomentInputError
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments
from momentkit.regularizer import expected_prediction
from validation.networks import (
    ImageData,
    lenet_shaped,
    load_cifar10_subset,
    load_mnist_subset,
    mlp,
    set_batchnorm_statistics,
    small_resnet,
    train_quickly,
)
from validation.reporting import SuiteConfig, SuiteReport, markdown_table, progress

NAME = "deep"
#: Relative floor of the comparison: float64 rounding of the forward passes.
ROUNDING = 1e-12
#: ``network_moments`` modes compared (``"auto"`` is one of them, named per network).
MODES = ("diagonal", "factor", "full")
#: The small ResNet's goal for the default mode at ``sigma_x = 0.1``: normwise mean
#: error (every image) and median variance error against Monte Carlo.
RESNET_GOAL = {"sigma": 0.1, "mean_err": 0.02, "var_err": 0.25}


def grid(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "sigmas": [1e-3, 0.1, 20.0],
            "mlp_depths": [1, 3],
            "mlp_width": 64,
            "lenet_width": 0.125,
            "resnet_width": 3,
            "alexnet": False,
            "points": 1,
            "mc_samples_mlp": 2000,
            "mc_samples_lenet": 1000,
            "mc_samples_resnet": 1000,
            "mc_samples_alexnet": 500,
            "n_train": 2000,
            "epochs": 1,
            "skip_factor": [],
        }
    return {
        "sigmas": [1e-3, 0.1, 1.0, 20.0],
        "mlp_depths": [1, 3],
        "mlp_width": 128,
        "lenet_width": 1.0,
        "resnet_width": 8,
        "alexnet": True,
        "points": 1,
        "mc_samples_mlp": 4000,
        "mc_samples_lenet": 1000,
        "mc_samples_resnet": 2000,
        "mc_samples_alexnet": 500,
        "n_train": 2000,
        "epochs": 1,
        "skip_factor": ["alexnet"],
    }


def _networks(g: dict, seed: int) -> list[dict[str, Any]]:
    """Name, model, Monte Carlo samples and data set of each network; the k-th
    network's random initialization is drawn with ``torch.manual_seed(seed + k)``."""
    specs: list[tuple[str, Any, int, str]] = [
        (f"mlp-{d}", lambda d=d: mlp(d, g["mlp_width"]), g["mc_samples_mlp"], "mnist")
        for d in g["mlp_depths"]
    ]
    specs += [
        ("lenet", lambda: lenet_shaped(g["lenet_width"]), g["mc_samples_lenet"], "mnist"),
        (
            "lenet-avgpool",
            lambda: lenet_shaped(g["lenet_width"], pool="avg"),
            g["mc_samples_lenet"],
            "mnist",
        ),
        ("resnet", lambda: small_resnet(g["resnet_width"]), g["mc_samples_resnet"], "mnist"),
    ]
    if g["alexnet"]:
        from experiments.models import alexnet

        specs.append(("alexnet", lambda: alexnet("cifar10"), g["mc_samples_alexnet"], "cifar10"))
    nets = []
    for k, (name, build, n_mc, dataset) in enumerate(specs):
        torch.manual_seed(seed + k)
        nets.append({"name": name, "model": build(), "mc": n_mc, "data": dataset, "k": k})
    return nets


def _relus(model: nn.Module) -> int:
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


def default_mode(model: nn.Module, x: torch.Tensor) -> str:
    """The mode ``network_moments(model, x, sigma)`` picks with ``covariance="auto"``
    (its own rule, read without running it)."""
    from momentkit.network.propagate import _choose_mode, _trace

    return _choose_mode("auto", _trace(model), x)


def _timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _prepare(net: dict, weights: str, data: ImageData, g: dict, seed: int, dev) -> nn.Module:
    """A copy of the network's random initialization, trained or not, with its
    BatchNorm statistics set, in float64 eval mode."""
    model = copy.deepcopy(net["model"]).to(dev)
    if weights == "trained":
        net["accuracy"] = train_quickly(model, data, g["epochs"], seed + net["k"], dev)
    elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        set_batchnorm_statistics(model, data.train_x[:500].to(dev))
    # Evaluate in float64, so that float32 rounding (1e-7 relative) does not pose as
    # approximation error where Monte Carlo resolves below it.
    return model.double().eval()


def run(cfg: SuiteConfig, overrides: dict[str, Any] | None = None) -> SuiteReport:
    """Run the suite; ``overrides`` replaces entries of :func:`grid` (for tests)."""
    start = time.perf_counter()
    g = {**grid(cfg.quick), **(overrides or {})}
    dev = cfg.torch_device
    networks = _networks(g, cfg.seed)
    datasets: dict[str, ImageData] = {
        "mnist": load_mnist_subset(cfg.data_root, g["n_train"], 500, cfg.seed)
    }
    if any(n["data"] == "cifar10" for n in networks):
        datasets["cifar10"] = load_cifar10_subset(cfg.data_root, g["n_train"], 500, cfg.seed)
    report = SuiteReport(
        NAME,
        {
            "data": "; ".join(d.source for d in datasets.values()),
            **{f"grid_{k}": v for k, v in g.items()},
        },
    )
    jobs = [(w, net) for w in ("random", "trained") for net in networks]
    identity: list[float] = []
    accuracy: dict[str, float] = {}
    modes_used: dict[str, str] = {}
    bar = progress(range(len(jobs) * len(g["sigmas"])), cfg, NAME)
    for weights, net in jobs:
        name, n_mc = net["name"], net["mc"]
        data = datasets[net["data"]]
        model = _prepare(net, weights, data, g, cfg.seed, dev)
        acc = net.get("accuracy", float("nan")) if weights == "trained" else float("nan")
        if weights == "trained":
            accuracy[name] = acc
        x = data.test_x[: g["points"]].to(dev, torch.float64)
        auto = default_mode(model, x)
        modes_used[name] = auto
        n_relu = _relus(model)
        try:
            lin0 = two_stage_linearization(model, x[:1], 0.1, relu_index=0, compute_cov=False)
            with torch.no_grad():
                sur0 = expected_prediction(model, x[:1], 0.1).surrogate
            identity.append(float((lin0.mean - sur0).abs().max() / sur0.abs().max()))
        except MomentInputError:
            pass  # not a sequential network of the linearization's layers (said below)
        for j, sigma in enumerate(g["sigmas"]):
            base = {
                "network": name,
                "weights": weights,
                "relu_layers": n_relu,
                "default_mode": auto,
                "test_accuracy": acc,
                "sigma": sigma,
            }
            skip = {}
            if name in g["skip_factor"]:
                skip["factor"] = (
                    f"skipped for time: {x[0].numel()} noise columns through every layer "
                    "(momentkit accepts it)"
                )
            rows = compare_methods(
                model, x, sigma, n_mc, seed=cfg.seed * 7919 + 31 * net["k"] + j, skip=skip
            )
            report.rows += [{**base, **r} for r in rows]
            next(bar, None)
    report.config["test_accuracy"] = accuracy
    report.config["default_modes"] = modes_used
    report.config["resnet_goal"] = resnet_goal(report.rows)
    report.config["identity_max_rel_diff"] = max(identity) if identity else float("nan")
    report.summary = _summary(report.rows, g, datasets, identity, accuracy)
    report.figure = _figure(report.rows, g)
    report.seconds = time.perf_counter() - start
    return report


def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    n_mc: int,
    seed: int,
    skip: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per method for ``model`` at ``x`` (float64) and noise ``sigma``, against
    ``n_mc`` Monte Carlo samples: the surrogate, the linearization around the last ReLU
    (sequential networks with more than one ReLU), ``network_moments`` in each of
    :data:`MODES` (``skip`` maps a mode to the reason it is not run), the plug-in
    estimate and Monte Carlo itself. A method that raises ``MomentInputError`` is a row
    with ``status = "refused: <message>"``; the others have ``status = "ok"``, their
    errors and seconds, and every row the Monte Carlo resolution columns."""
    skip = skip or {}
    n_relu = _relus(model)
    mc, mc_seconds = _timed(
        monte_carlo_moments, model, x, sigma**2, n_mc, seed=seed, batch_size=2048
    )
    # Resolution: the Monte Carlo standard error, but never below float64
    # rounding of the forward passes (about width * eps = 1e-13 relative).
    ref = mc.mean.flatten(1)
    scale = ref.abs().amax(dim=1, keepdim=True)
    se = torch.sqrt(mc.stderr.flatten(1) ** 2 + (ROUNDING * scale) ** 2)
    floor = se.norm(dim=1) / ref.norm(dim=1)
    mc_var = mc.stderr**2 * n_mc
    res = {
        "mc_rel_stderr_median": float(floor.median()),
        "mc_var_rel_stderr": math.sqrt(2 / (n_mc - 1)),
        "mc_samples": n_mc,
        "mc_seconds": mc_seconds,
        "points": len(x),
    }
    estimates: dict[str, tuple[Any, Any, float] | str] = {}
    try:
        out, t = _timed(_no_grad, expected_prediction, model, x, sigma)
        estimates["surrogate"] = (out.surrogate, None, t)
    except MomentInputError as exc:
        estimates["surrogate"] = f"refused: {exc}"
    if n_relu > 1:  # (for one ReLU the linearization is the surrogate)
        try:
            out, t = _timed(two_stage_linearization, model, x, sigma, n_relu - 1, compute_cov=False)
            estimates["linearization_last"] = (out.mean, None, t)
        except MomentInputError as exc:
            estimates["linearization_last"] = f"refused: {exc}"
    for mode in MODES:
        if mode in skip:
            estimates[f"nm_{mode}"] = skip[mode]
            continue
        try:
            out, t = _timed(_no_grad, network_moments, model, x, sigma, covariance=mode)
            estimates[f"nm_{mode}"] = (out.mean, out.var, t)
        except MomentInputError as exc:
            estimates[f"nm_{mode}"] = f"refused: {exc}"
    estimates["plug_in"] = _timed(_no_grad, model, x)
    estimates["plug_in"] = (estimates["plug_in"][0], None, estimates["plug_in"][1])
    rows = []
    for est_name, est in estimates.items():
        row: dict[str, Any] = {"estimator": est_name}
        if isinstance(est, str):
            rows.append({**row, "status": est, **res})
            continue
        mean, var, seconds = est
        diff = mean.double().flatten(1) - ref
        rel = diff.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
        var_err = float("nan")
        if var is not None:
            var_err = float(((var.double() - mc_var).abs() / mc_var.clamp_min(1e-300)).median())
        row.update(
            status="ok",
            rel_err_median=float(rel.median()),
            rel_err_max=float(rel.max()),
            var_err_median=var_err,
            seconds=seconds,
            max_abs_z=float((diff.abs() / se).max()),
            resolved=bool((rel > 3 * floor).all()),
        )
        rows.append({**row, **res})
    rows.append({"estimator": "monte_carlo", "status": "ok", "seconds": mc_seconds, **res})
    return rows


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


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
