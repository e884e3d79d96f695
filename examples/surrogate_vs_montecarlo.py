"""How far are the analytic approximations of ``E[f(x + n)]`` from Monte Carlo, for your network?

What you learn: for a network ``f`` and Gaussian input noise ``n ~ N(0, sigma^2 I)``
(pixel units) at a few noise levels, how far two cheap approximations of the expected
output are from a Monte Carlo estimate, measured in the estimate's own standard errors:

* the paper's surrogate ``Omega(mu3)`` (:func:`momentkit.expected_prediction`): exact
  moments up to the first ReLU, then the rest of the network evaluated at the mean;
* the two-stage linearization of Bibi et al.
  (:func:`momentkit.references.linearization.two_stage_linearization`) around the
  network's last ReLU: the layers before it are replaced by their first-order Taylor
  expansion at the clean input. (Around the first ReLU its mean is the surrogate's:
  Theorem 1 of the linearized network gives ``Omega(mu3)`` again.)

Both are exact when the network has a single ReLU layer (``--hidden-layers 0``): then
every difference is Monte Carlo noise and ``max|z|`` stays below about 4. Behind a
second ReLU they are approximations; ``max|z|`` well above 4 means the error is real
and resolved by the Monte Carlo sample, and ``err`` says how large it is. Use this to
decide up to which noise level the surrogate is a faithful stand-in for the expectation
it replaces.

Run (a few seconds on a CPU)::

    python examples/surrogate_vs_montecarlo.py
    python examples/surrogate_vs_montecarlo.py --hidden-layers 0     # exact case
    python examples/surrogate_vs_montecarlo.py --model my_model.pt --inputs my_images.pt

``--model`` loads a whole module saved with ``torch.save(model, path)`` (unpickling runs
code: load only files you trust); it must be an ``nn.Sequential`` of the layers the
linearization supports (``Linear``, ``Conv2d``, ``ReLU``, pooling, ``Flatten``,
``Normalize``) with a ``Linear`` or ``Conv2d`` before its first ReLU. ``--inputs`` is a
saved tensor ``(N, *in_shape)`` in pixel units; without it, ``--points`` random images
of ``--input-shape`` in ``[0, 1]`` are used.

Columns: ``mc_se`` is the median Monte Carlo standard error over all outputs; ``err``
the mean absolute difference from Monte Carlo; ``max|z|`` the largest difference in
units of its standard error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn

import momentkit as mk
from momentkit.references.linearization import two_stage_linearization
from momentkit.references.montecarlo import monte_carlo_moments


def small_conv_net(
    hidden_layers: int, seed: int, in_shape: Sequence[int] = (1, 10, 10)
) -> nn.Module:
    """A small conv net (conv, ReLU, then ``hidden_layers`` Linear-ReLU, then 10 logits)."""
    torch.manual_seed(seed)
    channels, height, width = in_shape
    layers: list[nn.Module] = [
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    ]
    width_in = 4 * height * width
    for _ in range(hidden_layers):
        layers += [nn.Linear(width_in, 32), nn.ReLU()]
        width_in = 32
    layers.append(nn.Linear(width_in, 10))
    return nn.Sequential(*layers)


def compare(
    model: nn.Module, x: torch.Tensor, sigmas: Sequence[float], n_samples: int, seed: int
) -> list[dict[str, float]]:
    """One row per sigma: Monte Carlo standard error and each approximation's error.

    The linearization is taken around the last ReLU of ``model``. ``x`` is
    ``(N, *in_shape)`` in pixel units, in the dtype and on the device of ``model``.
    Keys: ``sigma``, ``mc_se`` (median standard error), and for ``surrogate`` and
    ``linearization``: ``<name>_err`` (mean absolute difference from Monte Carlo) and
    ``<name>_maxz`` (largest ``|difference| / standard error``).
    """
    rows = []
    model.eval()
    last_relu = sum(isinstance(m, nn.ReLU) for m in model.modules()) - 1
    for k, sigma in enumerate(sigmas):
        with torch.no_grad():
            surrogate = mk.expected_prediction(model, x, sigma).surrogate
        linear = two_stage_linearization(model, x, sigma, last_relu, compute_cov=False).mean
        mc = monte_carlo_moments(model, x, sigma**2, n_samples, seed=seed + k)
        stderr = mc.stderr.reshape(x.shape[0], -1)
        row = {"sigma": float(sigma), "mc_se": float(stderr.median())}
        for name, approx in (("surrogate", surrogate), ("linearization", linear)):
            diff = (approx.reshape(x.shape[0], -1) - mc.mean.reshape(x.shape[0], -1)).abs()
            row[f"{name}_err"] = float(diff.mean())
            row[f"{name}_maxz"] = float((diff / stderr).max())
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, float]]) -> str:
    """The rows of :func:`compare` as a fixed-width text table."""
    head = f"{'sigma':>6} {'mc_se':>9} | {'surrogate err':>13} {'max|z|':>7} | "
    head += f"{'linearization err':>17} {'max|z|':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['sigma']:>6.3g} {r['mc_se']:>9.2e} | {r['surrogate_err']:>13.3e} "
            f"{r['surrogate_maxz']:>7.1f} | {r['linearization_err']:>17.3e} "
            f"{r['linearization_maxz']:>7.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Parse ``argv``, print the table, return its rows (see :func:`compare`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and noise")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--samples", type=int, default=5_000, help="Monte Carlo samples")
    parser.add_argument("--points", type=int, default=2, help="random input images")
    parser.add_argument("--hidden-layers", type=int, default=1, help="Linear-ReLU after the conv")
    parser.add_argument("--input-shape", default="1,10,10", help="C,H,W of random images")
    parser.add_argument("--model", help="a module saved with torch.save(model, path)")
    parser.add_argument("--inputs", help="a tensor (N, *in_shape) saved with torch.save")
    args = parser.parse_args(argv)

    in_shape = tuple(int(s) for s in args.input_shape.split(","))
    if args.model:
        model = torch.load(args.model, map_location="cpu", weights_only=False)
    else:
        model = small_conv_net(args.hidden_layers, args.seed, in_shape)
    if args.inputs:
        x = torch.load(args.inputs, map_location="cpu")
    else:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.rand((args.points, *in_shape), generator=generator)
    # float64 so that the approximations' own rounding is far below the Monte Carlo error
    model = model.to(device=args.device, dtype=torch.float64)
    x = x.to(device=args.device, dtype=torch.float64)

    rows = compare(model, x, args.sigmas, args.samples, args.seed)
    print(f"{x.shape[0]} inputs {tuple(x.shape[1:])}, {args.samples} Monte Carlo samples each")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
