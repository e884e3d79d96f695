"""Accuracy of ``network_moments`` against Monte Carlo on the paper's LeNet (MNIST).

For a randomly initialized LeNet (fixed seed) and one trained briefly (Adam on MNIST),
MNIST test images and each ``sigma_x``: the normwise relative mean error
``||m - m_mc|| / ||m_mc||`` (mean over images) and the median relative variance error
``|v - v_mc| / v_mc`` (over images and outputs), per mode. The Monte Carlo floor
columns give Monte Carlo's own standard errors on the same scale (relative standard
error of the mean, normwise, and ``sqrt(2 / n)`` for a variance): differences below
them are not resolved.

    python -m benchmarks.network_accuracy --images 3 --samples 10000
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from experiments.data import load_dataset
from experiments.models import lenet
from momentkit.network import network_moments, pooling
from momentkit.references.montecarlo import monte_carlo_moments


def train_briefly(model, data, steps: int, seed: int, device) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train), (64,), generator=gen)
        x, y = data.train.batch(idx)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def errors(model, x, sigma, modes, samples, seed):
    mc = monte_carlo_moments(model, x, sigma * sigma, samples, seed=seed, compute_cov=True)
    v_mc = torch.diagonal(mc.cov, dim1=-2, dim2=-1)
    floor_mean = float((mc.stderr.norm(dim=1) / mc.mean.norm(dim=1)).mean())
    row = {"mc_mean_floor": floor_mean, "mc_var_floor": math.sqrt(2.0 / samples)}
    for mode in modes:
        t0 = time.perf_counter()
        with torch.no_grad():
            res = network_moments(model, x, sigma, covariance=mode)
        row[f"{mode}_time_per_image"] = (time.perf_counter() - t0) / x.shape[0]
        m, v = res.mean.double(), res.var.double()
        row[f"{mode}_mean"] = float(((m - mc.mean).norm(dim=1) / mc.mean.norm(dim=1)).mean())
        row[f"{mode}_var"] = float(((v - v_mc).abs() / v_mc).median())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.1, 0.5, 1.0])
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of the trained net")
    ap.add_argument("--modes", nargs="+", default=["diagonal", "factor"])
    ap.add_argument("--order", choices=pooling.CHAIN_ORDERS, default="mean")
    ap.add_argument(
        "--remainder", choices=pooling.REMAINDER_MODELS, default="independent",
        help="covariance of the factor remainders inside a max-pool window",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    pooling.chain_order = args.order
    pooling.remainder_model = args.remainder
    device = torch.device(args.device)
    data = load_dataset("mnist", args.data_root)
    x = data.test.batch(torch.arange(args.images))[0].to(device)
    torch.manual_seed(args.seed)
    nets = {"random": lenet("mnist").to(device).eval()}
    trained = lenet("mnist").to(device)
    train_briefly(trained, data, args.steps, args.seed, device)
    nets["trained"] = trained
    rows = []
    print("| net | sigma_x | " + " | ".join(
        f"{m} mean | {m} var" for m in args.modes) + " | MC floor mean / var | s/image |")
    print("|" + " --- |" * (3 + 2 * len(args.modes)))
    for name, net in nets.items():
        for sigma in args.sigmas:
            row = errors(net, x, sigma, args.modes, args.samples, args.seed)
            row.update(net=name, sigma=sigma, order=args.order)
            rows.append(row)
            cells = " | ".join(
                f"{100 * row[f'{m}_mean']:.2f}% | {100 * row[f'{m}_var']:.1f}%"
                for m in args.modes
            )
            times = ", ".join(f"{row[f'{m}_time_per_image']:.2f}" for m in args.modes)
            print(
                f"| {name} | {sigma:g} | {cells} | {100 * row['mc_mean_floor']:.2f}% / "
                f"{100 * row['mc_var_floor']:.1f}% | {times} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
