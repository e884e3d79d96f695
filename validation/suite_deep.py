"""Suite ``deep``: how good is the paper's approximation on deep networks, and where
does it break.

For MLP-shaped networks of several depths and a LeNet-shaped network, each with
random (PyTorch default initialization) and trained weights (a short Adam run on a
few thousand MNIST images, or on synthetic digits when MNIST is missing, which every
output then says), three estimates of the expected output ``E[Phi(x + n)]``,
``n ~ N(0, sigma_x^2 I)`` in pixel units, are compared with Monte Carlo:

- ``surrogate``: ``Omega(mu3)`` of the regularizer
  (:func:`momentkit.regularizer.expected_prediction`); for the first ReLU it is also
  the two-stage linearization's mean (the identity is re-checked here);
- ``linearization_last``: the two-stage linearization around the last ReLU
  (:func:`momentkit.references.linearization.two_stage_linearization`), for networks
  with more than one ReLU;
- ``plug_in``: the noise-free output ``Phi(x)``, the baseline that ignores the noise.

Monte Carlo is plain sampling (:func:`~momentkit.references.montecarlo.monte_carlo_moments`);
antithetic pairs would resolve far smaller errors at small ``sigma_x``, but their
standard error misses kinks that no sample crosses, so they are not used for a
verdict. The relative error ``||estimate - MC|| / ||MC||`` (over the logits of one image; median and
maximum over the images) is tabulated against ``sigma_x`` from 1e-3 to 20 (the paper's
range) next to the Monte Carlo resolution ``||stderr|| / ||MC||``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments
from momentkit.regularizer import expected_prediction
from validation.networks import ImageData, lenet_shaped, load_mnist_subset, mlp, train_quickly
from validation.reporting import SuiteConfig, SuiteReport, markdown_table, progress

NAME = "deep"
#: Relative floor of the comparison: float64 rounding of the forward passes.
ROUNDING = 1e-12


def grid(quick: bool) -> dict[str, object]:
    if quick:
        return {
            "sigmas": [1e-3, 1e-2, 0.1, 1.0, 20.0],
            "mlp_depths": [1, 3],
            "mlp_width": 128,
            "lenet_width": 0.25,
            "points": 2,
            "mc_samples_mlp": 2000,
            "mc_samples_lenet": 500,
            "n_train": 2000,
            "epochs": 1,
        }
    return {
        "sigmas": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0],
        "mlp_depths": [1, 2, 4],
        "mlp_width": 512,
        "lenet_width": 1.0,
        "points": 4,
        "mc_samples_mlp": 40_000,
        "mc_samples_lenet": 4000,
        "n_train": 10_000,
        "epochs": 2,
    }


def _networks(g: dict, seed: int) -> list[tuple[str, int, nn.Module, int]]:
    """(name, number of ReLU layers, model, Monte Carlo samples); the k-th network's
    random initialization is drawn with ``torch.manual_seed(seed + k)``."""
    specs = [
        (f"mlp-{d}", d, lambda d=d: mlp(d, g["mlp_width"]), g["mc_samples_mlp"])
        for d in g["mlp_depths"]
    ]
    specs.append(("lenet", 3, lambda: lenet_shaped(g["lenet_width"]), g["mc_samples_lenet"]))
    nets = []
    for k, (name, n_relu, build, n_mc) in enumerate(specs):
        torch.manual_seed(seed + k)
        nets.append((name, n_relu, build(), n_mc))
    return nets


def _rel(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image ``||est - ref|| / ||ref||`` over the logits."""
    return (est - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


def run(cfg: SuiteConfig, overrides: dict[str, Any] | None = None) -> SuiteReport:
    """Run the suite; ``overrides`` replaces entries of :func:`grid` (for tests)."""
    start = time.perf_counter()
    g = {**grid(cfg.quick), **(overrides or {})}
    dev = cfg.torch_device
    data: ImageData = load_mnist_subset(cfg.data_root, g["n_train"], 500, cfg.seed)
    report = SuiteReport(NAME, {"data": data.source, **{f"grid_{k}": v for k, v in g.items()}})
    x = data.test_x[: g["points"]].to(dev, torch.float64)
    networks = _networks(g, cfg.seed)
    jobs = [(w, net) for w in ("random", "trained") for net in range(len(networks))]
    identity: list[float] = []
    accuracy: dict[str, float] = {}
    bar = progress(range(len(jobs) * len(g["sigmas"])), cfg, NAME)
    for weights, k in jobs:
        name, n_relu, model, n_mc = networks[k]
        model = copy.deepcopy(model)  # each weights kind starts from the same random init
        model = model.to(dev).eval()
        acc = float("nan")
        if weights == "trained":
            acc = train_quickly(model, data, g["epochs"], cfg.seed + k, dev)
            accuracy[name] = acc
        # Evaluate in float64, so that float32 rounding (1e-7 relative) does not pose as
        # approximation error where Monte Carlo resolves below it.
        model = model.double()
        with torch.no_grad():
            clean = model(x)
        lin0 = two_stage_linearization(model, x[:1], 0.1, relu_index=0, compute_cov=False)
        with torch.no_grad():
            sur0 = expected_prediction(model, x[:1], 0.1).surrogate
        identity.append(float((lin0.mean - sur0).abs().max() / sur0.abs().max()))
        for j, sigma in enumerate(g["sigmas"]):
            mc = monte_carlo_moments(
                model,
                x,
                sigma**2,
                n_mc,
                seed=cfg.seed * 7919 + 31 * k + j,
                batch_size=2048,
            )
            # Resolution: the Monte Carlo standard error, but never below float64
            # rounding of the forward passes (about width * eps = 1e-13 relative).
            scale = mc.mean.abs().amax(dim=1, keepdim=True)
            se = torch.sqrt(mc.stderr**2 + (ROUNDING * scale) ** 2)
            floor = se.norm(dim=1) / mc.mean.norm(dim=1)
            with torch.no_grad():
                estimates = {
                    "surrogate": expected_prediction(model, x, sigma).surrogate,
                    "plug_in": clean,
                }
            if n_relu > 1:  # (for one ReLU the linearization is the surrogate)
                lin = two_stage_linearization(model, x, sigma, n_relu - 1, compute_cov=False)
                estimates["linearization_last"] = lin.mean
            for est_name, est in estimates.items():
                rel = _rel(est.double(), mc.mean)
                z = ((est.double() - mc.mean).abs() / se).max()
                report.rows.append(
                    {
                        "network": name,
                        "weights": weights,
                        "relu_layers": n_relu,
                        "test_accuracy": acc,
                        "sigma": sigma,
                        "estimator": est_name,
                        "rel_err_median": float(rel.median()),
                        "rel_err_max": float(rel.max()),
                        "mc_rel_stderr_median": float(floor.median()),
                        "max_abs_z": float(z),
                        "resolved": bool((rel > 3 * floor).all()),
                        "mc_samples": n_mc,
                        "points": g["points"],
                    }
                )
            next(bar, None)
    report.config["identity_max_rel_diff"] = max(identity)
    report.config["test_accuracy"] = accuracy
    report.summary = _summary(report.rows, g, data, identity, accuracy)
    report.figure = _figure(report.rows, g)
    report.seconds = time.perf_counter() - start
    return report


def _summary(rows, g, data, identity, accuracy) -> list[str]:
    lines = [
        f"Relative error of the surrogate Omega(mu3) against Monte Carlo on "
        f"{g['points']} test images; data: {data.source}.",
        "",
        f"- relu_index=0 identity (linearization mean vs surrogate): largest relative "
        f"difference {max(identity):.1e} over all networks (float64).",
        "- trained test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()),
        "",
    ]
    if data.synthetic:
        lines.insert(0, "**Note: MNIST was not found; trained networks used synthetic digits.**\n")
    shown = [s for s in g["sigmas"] if s in (1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0)]
    table = []
    for weights in ("random", "trained"):
        for net in dict.fromkeys(r["network"] for r in rows):
            row = {"network": net, "weights": weights}
            for s in shown:
                match = [
                    r
                    for r in rows
                    if r["network"] == net
                    and r["weights"] == weights
                    and r["sigma"] == s
                    and r["estimator"] == "surrogate"
                ]
                if match:
                    r = match[0]
                    row[f"{s:g}"] = (
                        f"{r['rel_err_median']:.1e}"
                        if r["resolved"]
                        else f"<{3 * r['mc_rel_stderr_median']:.0e}"
                    )
            table.append(row)
    lines += [
        "Surrogate, median relative error by sigma_x (`<e`: below the Monte Carlo resolution e):",
        "",
        *markdown_table(table, ["network", "weights", *[f"{s:g}" for s in shown]]),
        "",
    ]
    breaks = []
    for weights in ("random", "trained"):
        for net in dict.fromkeys(r["network"] for r in rows):
            sel = sorted(
                (
                    r
                    for r in rows
                    if r["network"] == net
                    and r["weights"] == weights
                    and r["estimator"] == "surrogate"
                ),
                key=lambda r: r["sigma"],
            )
            bad = [r["sigma"] for r in sel if r["resolved"] and r["rel_err_median"] > 0.1]
            breaks.append(
                f"{net}/{weights}: "
                + (
                    f"above 10% from sigma_x = {bad[0]:g}"
                    if bad
                    else "within 10% over the whole range"
                )
            )
    lines += ["Where it breaks (median relative error above 10%):", "", *[f"- {b}" for b in breaks]]
    lin = [r for r in rows if r["estimator"] == "linearization_last"]
    if lin:
        better = sum(
            1
            for r in lin
            for s in rows
            if s["estimator"] == "surrogate"
            and (s["network"], s["weights"], s["sigma"]) == (r["network"], r["weights"], r["sigma"])
            and r["rel_err_median"] < s["rel_err_median"]
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
    fig, axes = plt.subplots(2, len(nets), figsize=(4 * len(nets), 7), sharex=True, squeeze=False)
    styles = {"surrogate": "C0o-", "linearization_last": "C1s-", "plug_in": "C2^--"}
    for i, weights in enumerate(("random", "trained")):
        for j, net in enumerate(nets):
            ax = axes[i, j]
            sel = [r for r in rows if r["network"] == net and r["weights"] == weights]
            for est, style in styles.items():
                pts = sorted((r for r in sel if r["estimator"] == est), key=lambda r: r["sigma"])
                if pts:
                    ax.plot(
                        [r["sigma"] for r in pts],
                        [r["rel_err_median"] for r in pts],
                        style,
                        ms=4,
                        label=est,
                    )
            floor = sorted(
                (r for r in sel if r["estimator"] == "surrogate"), key=lambda r: r["sigma"]
            )
            ax.fill_between(
                [r["sigma"] for r in floor],
                1e-12,
                [3 * r["mc_rel_stderr_median"] for r in floor],
                color="grey",
                alpha=0.3,
                label="MC resolution (3 se)",
            )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-9, min(3 * r["mc_rel_stderr_median"] for r in floor) / 10))
            ax.set_title(f"{net}, {weights} weights")
            ax.set_xlabel("sigma_x (pixel units)")
            if j == 0:
                ax.set_ylabel("relative error vs Monte Carlo")
    axes[0, -1].legend(fontsize=7)  # the last network has every estimator
    fig.tight_layout()
    return fig
