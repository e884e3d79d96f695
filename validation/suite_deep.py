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
from momentkit.network import network_mode
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments
from momentkit.regularizer import expected_prediction
from validation.deep_report import (  # noqa: F401  (part of this suite's interface)
    METHODS,
    RESNET_GOAL,
    _figure,
    _pick,
    _summary,
    resnet_goal,
)
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
from validation.reporting import SuiteConfig, SuiteReport, progress

NAME = "deep"
#: Relative floor of the comparison: float64 rounding of the forward passes.
ROUNDING = 1e-12
#: ``network_moments`` modes compared (``"auto"`` is one of them, named per network).
MODES = ("diagonal", "factor", "full")


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
    (:func:`momentkit.network.network_mode`: its own rule, without running it)."""
    return network_mode(model, x, "auto")


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
